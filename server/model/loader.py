"""Builds the model from a checkpoint directory: plain modules first, then the 4-bit swap, then weights.

Linear layers inside the decoder become bitsandbytes NF4 `Linear4bit` modules, quantized from the
checkpoint's weights on the target device. Embeddings, norms and lm_head keep the compute dtype.
"""

import pathlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from . import nf4_cpu
from .row_padding import RowPadded
from .config import ModelConfig
from .llama import LlamaForCausalLM


# Our packed modules and the checkpoint modules whose weights they stack, in order (along out_features).
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            _set_module(model, name, _linear(weights, name, module, device, dtype, quant))
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


def _linear(weights, name, module: nn.Linear, device, dtype, quant: QuantSpec | None) -> nn.Module:
    return RowPadded(_base_linear(weights, name, module, device, dtype, quant))


def _base_linear(weights, name, module: nn.Linear, device, dtype, quant: QuantSpec | None) -> nn.Module:
    weight, bias = _stacked(weights, name, module)
    weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    parts = len(PACKED.get(name.rpartition(".")[2], ())) or 1
    if quant is not None and parts > 1 and module.in_features % quant.blocksize:
        # 4-bit blocks would straddle rows of different parts: quantize each part on its own
        return StackedLinear([quantize_linear(w, b, device, dtype, quant)
                              for w, b in _split(weight, bias, weights, name, module)])
    if quant is None:
        dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=device, dtype=dtype)
        dense.weight.data.copy_(weight)
        if bias is not None:
            dense.bias.data.copy_(bias)
        return dense
    return quantize_linear(weight, bias, device, dtype, quant)


def _stacked(weights, name: str, module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checkpoint's weight (and bias) for one of our linears, stacking the parts of a packed one.

    Stacking rows before quantizing gives the same 4-bit blocks as quantizing each part alone when
    in_features is a multiple of the block size (blocks never straddle rows), which the loader checks.
    """
    parent, _, leaf = name.rpartition(".")
    parts = [f"{parent}.{p}" for p in PACKED.get(leaf, (leaf,))]
    w = [_take(weights, p + ".weight", (None, module.in_features)) for p in parts]
    b = [_take(weights, p + ".bias", (t.shape[0],)) for p, t in zip(parts, w)] if module.bias is not None else None
    weight = torch.cat(w) if len(w) > 1 else w[0]
    if weight.shape[0] != module.out_features:
        raise ValueError(f"checkpoint {', '.join(parts)} stack to {weight.shape[0]} rows, expected {module.out_features}")
    return weight, (torch.cat(b) if b and len(b) > 1 else (b[0] if b else None))


class StackedLinear(nn.Module):
    """Several linears over the same input whose outputs are concatenated: a packed module whose parts
    could not be quantized as one."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _split(weight, bias, weights, name, module):
    parent, _, leaf = name.rpartition(".")
    sizes = [weights[f"{parent}.{p}.weight"].shape[0] for p in PACKED[leaf]]
    biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
    return list(zip(weight.split(sizes), biases))


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
