"""Builds the model from a checkpoint directory: plain modules first, then the 4-bit swap, then weights.

Linear layers inside the decoder become the quantization backend's modules (`quant.py`), quantized from
the checkpoint's weights on the target device, packed as `layout.py` says. Embeddings, norms and lm_head
keep the compute dtype.
"""

import pathlib

import torch
from safetensors import safe_open
from torch import nn

from . import layout
from .row_padding import RowPadded
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .quant import QuantBackend, make_backend


def load_hf_config(model_dir: pathlib.Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def load_model(model_dir: pathlib.Path, device: torch.device, dtype: torch.dtype,
               backend: QuantBackend | None = None) -> LlamaForCausalLM:
    """backend None: make_backend()'s, with its default settings."""
    cfg = ModelConfig.from_hf(load_hf_config(model_dir))
    backend = make_backend() if backend is None else backend
    backend.validate(cfg, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    weights = _read_safetensors(model_dir)
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    for index, layer in enumerate(model.model.layers):
        for path in layout.PACKED:
            linear = _linear(weights, cfg, f"model.layers.{index}.", path, layer.get_submodule(path), device,
                             dtype, backend)
            _set_module(layer, path, linear)
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
            backend: QuantBackend) -> nn.Module:
    """The linear at `path` (a key of layout.PACKED) of the decoder layer whose checkpoint names start with
    `prefix`, from the weights of the checkpoint linears it stacks (rows in layout order)."""
    parts = [_part(weights, cfg, prefix + key, target, module.bias is not None, dtype)
             for key, target in zip(layout.checkpoint_paths(path), layout.PACKED[path])]
    return packed_linear(parts, device, dtype, backend)


def packed_linear(parts: list[tuple[torch.Tensor, torch.Tensor | None]], device, dtype,
                  backend: QuantBackend) -> nn.Module:
    """One packed decoder linear, quantized by `backend`, from its parts' weights [out_i, in] (and biases)
    in output order: one module for all parts when the backend stacks them, else one per part."""
    if len(parts) > 1 and not backend.stacks(parts[0][0].shape[1]):   # a quantization block would span parts
        return RowPadded(StackedLinear([backend.quantize(w, b, device, dtype) for w, b in parts]))
    weight = torch.cat([w for w, _ in parts])
    biases = [b for _, b in parts]
    bias = torch.cat(biases) if biases[0] is not None else None
    return RowPadded(backend.quantize(weight, bias, device, dtype))


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


def dense_weight(layer: nn.Module, backend: QuantBackend) -> torch.Tensor:
    """[out, in] float32: the weight one of our decoder linears multiplies by, dequantized (DoRA's norms and
    merges need it): the layout's wrappers are undone here, the backend's modules are the backend's to read;
    a plain nn.Linear is a merged module kept dense."""
    if isinstance(layer, RowPadded):
        return dense_weight(layer.inner, backend)
    if isinstance(layer, StackedLinear):
        return torch.cat([dense_weight(part, backend) for part in layer.parts])
    if type(layer) is nn.Linear:
        return layer.weight.float()
    return backend.dense_weight(layer)


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """The bias [out] one of our decoder linears adds, or None."""
    if isinstance(layer, RowPadded):
        return bias_of(layer.inner)
    if isinstance(layer, StackedLinear):
        parts = [bias_of(part) for part in layer.parts]
        return None if parts[0] is None else torch.cat(parts)
    return layer.bias


def module_bytes(layer: nn.Module, backend: QuantBackend) -> int:
    """The memory one of our decoder linears holds (weights, scales, bias)."""
    if isinstance(layer, RowPadded):
        return module_bytes(layer.inner, backend)
    if isinstance(layer, StackedLinear):
        return sum(module_bytes(part, backend) for part in layer.parts)
    if type(layer) is nn.Linear:
        return sum(t.nbytes for t in layer.parameters())
    return backend.nbytes(layer)


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
