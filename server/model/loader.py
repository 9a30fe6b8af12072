"""Builds the model from a checkpoint directory: plain modules first, then the 4-bit swap, then weights.

Linear layers inside the decoder become bitsandbytes NF4 `Linear4bit` modules, quantized from the
checkpoint's weights on the target device. Embeddings, norms and lm_head keep the compute dtype.
"""

import pathlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

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
    weight = _take(weights, name + ".weight", (module.out_features, module.in_features)).to(dtype)
    bias = _take(weights, name + ".bias", (module.out_features,)).to(dtype) if module.bias is not None else None
    if quant is None:
        dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=device, dtype=dtype)
        dense.weight.data.copy_(weight)
        if bias is not None:
            dense.bias.data.copy_(bias)
        return dense
    return quantize_linear(weight, bias, device, dtype, quant)


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
    return layer.to(device)   # moving to the device quantizes the weight


def _take(weights: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in weights:
        raise ValueError(f"checkpoint lacks {key}")
    tensor = weights[key]
    if tuple(tensor.shape) != tuple(shape):
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
