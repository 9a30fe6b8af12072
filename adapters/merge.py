"""Merging an adapter into a copy of the base's weights: the merged modules of one adapter version.

Only the packed linears the adapter targets get a merged module; it is built beside the original (which
is never written) from the original's dense weight, through the quantization backend:
- `requantize`: dense base + delta, quantized again with the base's own settings. These are the bytes
  PEFT's `merge_and_unload` makes on a 4-bit base, and they keep only part of a small delta (the new
  codes round most of it away), which `retained` measures: the share of the delta the merged weight moves
  along, <dense(merged) - dense(base), delta> / ||delta||^2. (Not the norm ratio ||dense(merged) -
  dense(base)|| / ||delta||: for a small delta the codes stay and only each block's absmax moves, which
  rescales the block along the base weight, so that ratio stays near 0.44 however small the delta, measured
  on a tiny Llama, while the share kept along the delta is 1.5%: tests/test_merge.py.)
- `dense`: dense base + delta kept in the compute dtype, equal to the unmerged adapter up to float
  rounding (retained is 1 up to that rounding), at the compute dtype's size instead of 4 bits.
- `exact`: a QA-LoRA adapter's update is constant over each group of input columns; on a base with float
  zero points per group of the same size (int4) it folds into the zeros, Z' = Z + delta per (row, group),
  the codes and scales kept (shared with the base, not copied): equal to the unmerged adapter up to float
  rounding, and the copy is only the zero tensors. `preferred_method` makes it the default where it applies.
DoRA's merged weight is (W + delta) * m / ||W + delta|| per output row, its output scale folded in.
"""

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..server.errors import FailedPreconditionError
from ..server.model import layout
from ..server.model.loader import bias_of, dense_weight, module_bytes, packed_linear
from ..server.model.quant import QuantBackend
from ..server.model.row_padding import RowPadded
from .canonical import Adapter

METHODS = ("dense", "requantize", "exact")
MOVABLE = ("dense", "exact")     # methods whose merged copy computes what the LoRA path does (up to rounding)


def movable(method: str) -> bool:
    """Whether a merge by `method` computes what the LoRA path does ("": the preferred one, dense or exact)."""
    return method in ("", *MOVABLE)


@dataclass(frozen=True)
class MergedWeights:
    """One adapter version merged: (layer, packed path) -> the module that replaces the base's there."""
    key: tuple[str, int, str]                # (adapter id, version, method): the weight set's name
    method: str
    modules: dict[tuple[int, str], nn.Module]
    retained_by_layer: tuple[float, ...]     # per decoder layer the adapter targets, in layer order
    retained: float                          # over all merged modules: the share of the delta kept
    nbytes: int                              # the merged modules' memory, beside the originals'
    seconds: float                           # time to build them


def merge_into_copy(model: nn.Module, adapter: Adapter, key: tuple[str, int, str], method: str,
                    backend: QuantBackend, dtype: torch.dtype) -> MergedWeights:
    """The merged modules of `adapter` over `model`'s LoRA-wrapped packed linears (read, never written),
    computing in `dtype` as the base does."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r} (methods: {', '.join(METHODS)})")
    if method == "exact":
        check_exact(adapter, backend)
    started = time.monotonic()
    modules, changed, wanted, by_layer = {}, 0.0, 0.0, {}
    for index, layer in enumerate(model.model.layers):
        for path in layout.PACKED:
            lora = layer.get_submodule(path)
            if not any((index, target) in adapter.modules for target, _, _ in lora.targets):
                continue
            module, kept, delta = _merge_module(lora, index, adapter, method, backend, dtype)
            modules[(index, path)] = module
            changed, wanted = changed + kept, wanted + delta
            got = by_layer.setdefault(index, [0.0, 0.0])
            got[0], got[1] = got[0] + kept, got[1] + delta
    return MergedWeights(key, method, modules, tuple(_share(k, d) for k, d in by_layer.values()),
                         _share(changed, wanted), sum(module_bytes(m, backend) for m in modules.values()),
                         time.monotonic() - started)


def _merge_module(lora: nn.Module, index: int, adapter: Adapter, method: str, backend: QuantBackend,
                  dtype: torch.dtype):
    """(merged module, <its change, delta>, ||delta||^2) for one LoRA-wrapped packed linear."""
    if method == "exact":
        return _exact_module(lora, index, adapter, backend)
    base = dense_weight(lora.base, backend)                 # [out, in] float32, what the base multiplies by
    merged = base.clone()
    for target, offset, size in lora.targets:
        update = adapter.modules.get((index, target))
        if update is None:
            continue
        rows = merged[offset:offset + size]
        rows += update.delta_weight().to(rows.device, torch.float32)   # the adapter's tensors are on the host
        if update.output_scale is not None:
            rows *= update.output_scale.to(rows.device, torch.float32)[:, None]
    bias = bias_of(lora.base)
    device = base.device
    if method == "dense":
        module = RowPadded(_dense_linear(merged.to(dtype), bias, device))
    else:
        parts = [(merged[offset:offset + size].to(dtype), None if bias is None else bias[offset:offset + size])
                 for _, offset, size in lora.targets]
        module = packed_linear(parts, device, dtype, backend)
    now = dense_weight(module, backend)
    delta = merged - base
    return module, float(((now - base) * delta).sum()), float(delta.square().sum())


def _exact_module(lora: nn.Module, index: int, adapter: Adapter, backend: QuantBackend):
    """The exact merge of one packed linear: its zeros shifted by each part's update (constant over each
    group, so its mean there). Only the adapter's factors are multiplied; no base weight is dequantized."""
    inner, group = lora.base.inner, backend.zero_group_size()
    shift = torch.zeros(inner.out_features, inner.in_features // group)
    along = delta_sq = 0.0
    for target, offset, size in lora.targets:
        update = adapter.modules.get((index, target))
        if update is None:
            continue
        delta = update.delta_weight().float()
        part = delta.reshape(size, -1, group).mean(-1)
        shift[offset:offset + size] = part
        along += float((part.repeat_interleave(group, dim=1) * delta).sum())
        delta_sq += float(delta.square().sum())
    return RowPadded(backend.shift_zeros(inner, shift)), along, delta_sq


def check_exact(adapter: Adapter, backend: QuantBackend) -> None:
    """Raises FailedPreconditionError unless every module of `adapter` folds exactly into `backend`'s zeros."""
    group = backend.zero_group_size()
    sizes = sorted({m.group_size or 0 for m in adapter.modules.values()})
    theirs = ", ".join(str(g) if g else "none (not QA-LoRA)" for g in sizes)
    if group is None:
        raise FailedPreconditionError(
            f"an exact merge needs a base with zero points per group; the base is {backend.describe()} (none) and "
            f"adapter {adapter.adapter_id!r} has QA-LoRA group size {theirs}: use dense (equal to the adapter) or "
            f"requantize, or serve the base as --quant int4 --quant-group-size {sizes[-1] or 64}")
    if sizes != [group] or any(m.output_scale is not None for m in adapter.modules.values()):
        raise FailedPreconditionError(
            f"an exact merge needs a QA-LoRA adapter of the base's group size: adapter {adapter.adapter_id!r} has "
            f"group size {theirs}, the base is {backend.describe()}: use dense (equal to the adapter) or requantize")


def preferred_method(adapter: Adapter, backend: QuantBackend, default: str = "dense") -> str:
    """`exact` where it applies to `adapter` on `backend`, else `default`."""
    try:
        check_exact(adapter, backend)
    except FailedPreconditionError:
        return default
    return "exact"


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, device) -> nn.Linear:
    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=bias is not None)
    linear.weight = nn.Parameter(weight.to(device), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device=device, dtype=weight.dtype), requires_grad=False)
    return linear


def _share(along: float, delta_sq: float) -> float:
    return along / delta_sq if delta_sq > 0 else 1.0


def install(model: nn.Module, merged: MergedWeights) -> None:
    """Puts the merged modules beside the originals: a step whose weight set is merged.key uses them."""
    for (index, path), module in merged.modules.items():
        model.model.layers[index].get_submodule(path).alternates[merged.key] = module


def uninstall(model: nn.Module, key: tuple[str, int, str]) -> None:
    """Drops the merged modules of `key`; the originals were never touched."""
    for layer in model.model.layers:
        for path in layout.PACKED:
            layer.get_submodule(path).alternates.pop(key, None)
