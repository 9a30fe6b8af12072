"""PEFT `peft_type: LORA` adapters: plain LoRA and QLoRA (the same files: QLoRA only trained on a 4-bit
base), rsLoRA (`use_rslora`: alpha / sqrt(r)), per-module `rank_pattern` / `alpha_pattern`, DoRA
(`use_dora`, see dora.py) and QA-LoRA (see qalora.py). Each module's scaling is folded into its `b`, unless
16-bit factors are kept as saved (`keep_16bit`), with the scaling beside them.
"""

import math
import re
from pathlib import Path

import torch

from loraplex.adapters.canonical import Adapter, LoraModule
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.layout import in_out_features

from . import dora, qalora
from .peft_files import (CONFIG_FILE, AdapterFormatError, check_layers, check_rank, check_shapes, finite_number,
                         group_factors, positive_int, read_weights, refuse_unsupported)


def read(adapter_dir: Path, adapter_id: str, config: dict, model: ModelConfig, max_rank: int,
         dtype: torch.dtype, keep_16bit: bool = False) -> Adapter:
    refuse_unsupported(config)
    rank = positive_int(config, "r")
    alpha = finite_number(config, "lora_alpha", config.get("lora_alpha", rank))
    rslora = bool(config.get("use_rslora"))
    rank_pattern = _pattern(config, "rank_pattern", integer=True)
    alpha_pattern = _pattern(config, "alpha_pattern", integer=False)
    use_dora = bool(config.get("use_dora"))
    group = qalora.declared_group_size(config)
    if use_dora and group is not None:
        raise AdapterFormatError(f"{CONFIG_FILE}: use_dora together with QA-LoRA is not supported")
    allowed = {"A": "lora_A", "B": "lora_B"}
    if use_dora:
        allowed["magnitude"] = "lora_magnitude_vector"
    factors, paths = group_factors(read_weights(adapter_dir, model, max_rank), config, allowed)
    if group is None and not use_dora:
        group = qalora.detect_group_size(factors, model)
    keep = keep_16bit and group is None and _saved_in_16bit(factors)
    modules = {}
    for key, found in factors.items():
        layer, target = key
        where = f"layer {layer} {target}"
        path = paths[key]
        module_rank, rank_from = _lookup(rank_pattern, path, rank, "rank_pattern", "r")
        module_alpha, _ = _lookup(alpha_pattern, path, alpha, "alpha_pattern", "lora_alpha")
        in_features, _ = in_out_features(model, target)
        width = qalora.pooled_width(where, in_features, group) if group else None
        got = check_shapes(key, found["A"], found["B"], model, width)
        if got != module_rank:
            raise AdapterFormatError(f"{where}: rank of lora_A {tuple(found['A'].shape)} / lora_B "
                                     f"{tuple(found['B'].shape)} differs from the config's {rank_from}={module_rank}")
        check_rank(f"{CONFIG_FILE} ({where})", module_rank, max_rank)
        scaling = module_alpha / (math.sqrt(module_rank) if rslora else module_rank)
        a = found["A"]
        if group:
            a = qalora.widen(a, group, qalora.pool_factor(config, in_features, group))
        magnitude = dora.magnitude(where, found, model, target) if use_dora else None
        if keep:        # as saved; the LoRA op widens both and scales b (see canonical.py)
            modules[key] = LoraModule(a=a.contiguous(), b=found["B"].contiguous(), magnitude=magnitude,
                                      b_scale=float(scaling))
            continue
        # Fold the scaling into b in float32, then cast once: the hot path computes x @ a.T @ b.T only.
        modules[key] = LoraModule(a=a.to(dtype).contiguous(), b=(found["B"].to(torch.float32) * scaling).to(dtype),
                                  magnitude=magnitude, group_size=group)
    check_layers(modules, config.get("layers_to_transform"), model)
    kind = "dora" if use_dora else "qalora" if group else "rslora" if rslora else "lora"
    return Adapter(adapter_id=adapter_id, modules=modules, alpha=alpha, source=str(adapter_dir), format=kind)


def _saved_in_16bit(factors: dict) -> bool:
    """Every A and B of the file is of one 16-bit dtype (a file mixing dtypes is widened whole)."""
    dtypes = {found[name].dtype for found in factors.values() for name in ("A", "B")}
    return len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}


def _pattern(config: dict, name: str, integer: bool) -> dict:
    pattern = config.get(name) or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{CONFIG_FILE}: {name} must be an object of module pattern -> value")
    for key, value in pattern.items():
        if integer:
            positive_int(config, f"{name}[{key!r}]", value)
        else:
            finite_number(config, f"{name}[{key!r}]", value)
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterFormatError(f"{CONFIG_FILE}: {name} key {key!r} is not a valid pattern: {e}") from None
    return pattern


def _lookup(pattern: dict, path: str, default, name: str, field: str):
    """PEFT's rule: the first key that matches the end of the module path, at a dot boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value, f"{name}[{key!r}]"
    return default, field
