"""The best mixed-adapter / base-only ratio a machine allows, from its measured read bandwidth."""

import pathlib
import time

import torch

from loraplex.adapters.canonical import TARGETS
from loraplex.server.config import ServerConfig

from .engine_bench import isolated


def bandwidth_floor(base_tok_s: float, batch: int, rank: int) -> dict:
    """The best ours-distinct/ours-base ratio this machine allows: a step must at least read every distinct
    adapter's factors once (float32, as served), at the read bandwidth measured here."""
    from transformers import AutoConfig

    from loraplex.adapters.peft_lora import in_out_features
    from loraplex.server.model.config import ModelConfig
    from loraplex.server.model.store import default_model_dir

    model_dir = default_model_dir(pathlib.Path(ServerConfig().resolved_cache_dir()))
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir))
    per_layer = sum(rank * (i + o) for i, o in (in_out_features(cfg, t) for t in TARGETS))
    adapter_bytes = per_layer * cfg.num_layers * 4
    bandwidth = max(isolated(_read_rate) for _ in range(3))
    base_step = batch / base_tok_s
    lora_step = batch * adapter_bytes / bandwidth
    return {"adapter_bytes": adapter_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
            "adapter_read_ms_per_step": lora_step * 1e3, "base_step_ms": base_step * 1e3,
            "floor_ratio_vs_base": base_step / (base_step + lora_step)}


def _read_rate() -> float:
    t = torch.ones(64 * 2**20)       # 256 MiB, far past the caches; made here, off the main thread
    t.sum()
    started = time.perf_counter()
    t.sum()
    return t.numel() * t.element_size() / (time.perf_counter() - started)
