"""Builds the model from a checkpoint directory: plain modules first, then the 4-bit swap, then weights.

Linear layers inside the decoder become bitsandbytes NF4 `Linear4bit` modules, quantized from the
checkpoint's weights on the target device. Embeddings, norms and lm_head keep the compute dtype.
"""

import pathlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from . import layout, nf4_cpu
from .row_padding import RowPadded
from .config import ModelConfig
from .llama import LlamaForCausalLM


@dataclass(frozen=True)
class QuantSpec:
    blocksize: int = 64
    quant_type: str = "nf4"
    double_quant: bool = False


def load_hf_config(model_dir: pathlib.Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def load_model(model_dir: pathlib.Path, device: torch.device, dtype: torch.dtype,
               quant: QuantSpec | None = QuantSpec()) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    if quant is not None and device.type == "cpu":
        for width in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim):
            if width % quant.blocksize:
                raise ValueError(f"quant_blocksize {quant.blocksize} does not divide the layer width {width}; "
                                 f"bitsandbytes' CPU kernels need whole blocks per row: use 64")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    weights = _read_safetensors(model_dir)
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    for index, layer in enumerate(model.model.layers):
        for path in layout.PACKED:
            linear = _linear(weights, cfg, f"model.layers.{index}.", path, layer.get_submodule(path), device,
                             dtype, quant)
            _set_module(layer, path, RowPadded(linear))
    rest = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or "layernorm" in k}
    _assign_plain(model, rest, device, dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.to(device)
    return model.eval().requires_grad_(False)


def _read_safetensors(model_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return weights


def _linear(weights, cfg, prefix: str, path: str, module: nn.Linear, device, dtype,
            quant: QuantSpec | None) -> nn.Module:
    """The linear at `path` (a key of layout.PACKED) of the decoder layer whose checkpoint names start with
    `prefix`, from the weights of the checkpoint linears it stacks (rows in layout order).

    Stacking rows before quantizing gives the same 4-bit blocks as quantizing each part alone when
    in_features is a multiple of the block size (blocks never straddle rows).
    """
    parts = [_part(weights, cfg, prefix + key, target, module.bias is not None, dtype)
             for key, target in zip(layout.checkpoint_paths(path), layout.PACKED[path])]
    if quant is not None and len(parts) > 1 and module.in_features % quant.blocksize:
        # 4-bit blocks would straddle rows of different parts: quantize each part on its own
        return StackedLinear([quantize_linear(w, b, device, dtype, quant) for w, b in parts])
    weight = torch.cat([w for w, _ in parts])
    bias = torch.cat([b for _, b in parts]) if module.bias is not None else None
    if quant is None:
        dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=device, dtype=dtype)
        dense.weight.data.copy_(weight)
        if bias is not None:
            dense.bias.data.copy_(bias)
        return dense
    return quantize_linear(weight, bias, device, dtype, quant)


def _part(weights, cfg, key: str, target: str, has_bias: bool, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checkpoint's weight [out, in] (and bias [out]) of one target, in the compute dtype."""
    in_features, out_features = layout.in_out_features(cfg, target)
    weight = _take(weights, key + ".weight", (out_features, in_features)).to(dtype)
    bias = _take(weights, key + ".bias", (out_features,)).to(dtype) if has_bias else None
    return weight, bias


class StackedLinear(nn.Module):
    """Several linears over the same input whose outputs are concatenated: a packed module whose parts
    could not be quantized as one."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, device, dtype, quant: QuantSpec) -> nn.Module:
    """The quantized linear is bitsandbytes' own module, so its numerics are exactly bitsandbytes'."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                  compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                  quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=quant.blocksize,
                                     compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                     quant_storage=torch.uint8, module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    layer = layer.to(device)   # moving to the device quantizes the weight
    return nf4_cpu.FusedNF4Linear(layer) if nf4_cpu.available(layer) else layer


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """[out, in] float32: the weight a linear of ours multiplies by, dequantized (DoRA's norms need it)."""
    import bitsandbytes as bnb

    if isinstance(layer, RowPadded):
        return dense_weight(layer.inner)
    if isinstance(layer, StackedLinear):
        return torch.cat([dense_weight(part) for part in layer.parts])
    if isinstance(layer, nf4_cpu.FusedNF4Linear):
        return layer.dense_weight()
    if isinstance(layer, bnb.nn.Linear4bit):
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError("a Linear4bit repacked for the CPU kernel has no dense form here")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return layer.weight.detach().float()


def _take(weights: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in weights:
        raise ValueError(f"checkpoint lacks {key}")
    tensor = weights[key]
    if len(tensor.shape) != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        raise ValueError(f"checkpoint {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def _assign_plain(model: nn.Module, weights: dict, device, dtype) -> None:
    expected = {n: p for n, p in model.named_parameters() if n.startswith(("model.embed", "model.norm",
                                                                            "lm_head", "model.layers."))
                and p.is_meta}
    for name, param in expected.items():
        tensor = _take(weights, name, tuple(param.shape)).to(device=device, dtype=dtype)
        _set_param(model, name, nn.Parameter(tensor, requires_grad=False))


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)


def _set_param(root: nn.Module, dotted: str, param: nn.Parameter) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent), leaf, param)
