"""PEFT `peft_type: ADALORA` adapters (Zhang et al., 2023): per module lora_A [r, in], lora_E [r, 1] (the
singular values) and lora_B [out, r]; PEFT computes x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5).

Budget allocation prunes ranks by zeroing entries of E. A config with `rank_pattern` (masks per module,
written once allocation has run) comes with tensors already cut to the kept ranks, and modules may be cut to
rank 0. Either way, every rank whose E is zero is dropped here, so each module carries only its live rank,
with E folded into A. The scaling is PEFT's: lora_alpha (or the module's rank when lora_alpha is 0) over
ranknum, which PEFT keeps at init_r when it cuts a module to its rank_pattern.
"""

from pathlib import Path

import torch

from loraplex.adapters.canonical import Adapter, LoraModule
from loraplex.server.model.config import ModelConfig

from .peft_files import (CONFIG_FILE, AdapterFormatError, check_layers, check_rank, check_shapes, finite_number,
                         group_factors, positive_int, read_weights, refuse_unsupported)

STORED_RANK_FACTOR = 4


def read(adapter_dir: Path, adapter_id: str, config: dict, model: ModelConfig, max_rank: int,
         dtype: torch.dtype, keep_16bit: bool = False) -> Adapter:
    """keep_16bit is ignored: the singular values are multiplied into A, so the factors are not as saved."""
    refuse_unsupported(config, extra=(("use_dora", False, "AdaLoRA with DoRA is not supported"),))
    init_r = positive_int(config, "init_r")
    alpha = finite_number(config, "lora_alpha", config.get("lora_alpha", 8))
    masks = config.get("rank_pattern") or {}
    if not isinstance(masks, dict):
        raise AdapterFormatError(f"{CONFIG_FILE}: rank_pattern must be an object of module -> rank mask")
    factors, paths = group_factors(read_weights(adapter_dir, model, _stored_rank(init_r, max_rank)), config,
                                   {"A": "lora_A", "B": "lora_B", "E": "lora_E"})
    ranknum = torch.tensor(float(init_r)) + 1e-5          # float32, as PEFT's ranknum parameter
    modules = {}
    for key, found in factors.items():
        layer, target = key
        where = f"layer {layer} {target}"
        a, b, e = found["A"], found["B"], found["E"]
        rank = check_shapes(key, a, b, model)
        if tuple(e.shape) != (rank, 1):
            raise AdapterFormatError(f"{where} lora_E: shape {tuple(e.shape)} does not fit (expected [{rank}, 1])")
        mask = masks.get(f"{paths[key]}.lora_E")
        if mask is not None:
            kept = _kept(where, mask, init_r)
            if kept != rank:
                raise AdapterFormatError(f"{where}: {rank} ranks stored but {CONFIG_FILE} rank_pattern keeps {kept}")
        elif rank != init_r:
            raise AdapterFormatError(f"{where}: rank {rank} differs from the config's init_r={init_r} and "
                                     "rank_pattern does not name this module")
        live = e[:, 0] != 0
        if not live.any():
            continue                                          # every rank pruned: the module adds nothing
        check_rank(f"{CONFIG_FILE} ({where})", int(live.sum()), max_rank)
        # PEFT's update_layer: scaling = lora_alpha, or r (the module's size as loaded) when lora_alpha is 0.
        scaling = torch.tensor(alpha if alpha > 0 else float(rank)) / ranknum
        a_live = (a.to(torch.float32) * e.to(torch.float32))[live]
        b_live = b.to(torch.float32)[:, live] * scaling
        modules[key] = LoraModule(a=a_live.to(dtype).contiguous(), b=b_live.to(dtype).contiguous())
    if not modules:
        raise AdapterFormatError(f"every rank of every module is pruned (lora_E is zero): the adapter changes "
                                 "nothing")
    check_layers(modules, config.get("layers_to_transform"), model)
    return Adapter(adapter_id=adapter_id, modules=modules, alpha=alpha, source=str(adapter_dir), format="adalora")


def _stored_rank(init_r: int, max_rank: int) -> int:
    """The rank the files may hold: init_r ranks are stored and only the live ones must fit max_rank. PEFT's
    default init_r is 1.5x its target_r; more than STORED_RANK_FACTOR x max_rank is never a servable budget,
    so the size limit stops there."""
    return max(max_rank, min(init_r, STORED_RANK_FACTOR * max_rank))


def _kept(where: str, mask, init_r: int) -> int:
    if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(v, bool) for v in mask):
        raise AdapterFormatError(f"{where}: {CONFIG_FILE} rank_pattern entry must be {init_r} booleans")
    return sum(mask)
