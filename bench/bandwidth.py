"""The ceilings a machine allows the mixed-adapter benchmark, from its measured read bandwidth: the mixed/base-only
decode ratio and the many/one-adapter ratio of an online trace."""

import time

import torch

from loraplex.server.model.layout import TARGETS

from .engine_bench import isolated


def bandwidth_floor(base_tok_s: float, batch: int, rank: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """The best ours-distinct/ours-base ratio this machine allows: a step must at least read every distinct
    adapter's factors once (in the compute dtype, as served), at the read bandwidth measured here on
    `device` (main memory, or the GPU's memory)."""
    adapter_bytes = adapter_size(rank, dtype)
    bandwidth = read_bandwidth(device)
    base_step = batch / base_tok_s
    lora_step = batch * adapter_bytes / bandwidth
    floor = {"adapter_bytes": adapter_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
             "adapter_read_ms_per_step": lora_step * 1e3, "base_step_ms": base_step * 1e3,
             "floor_ratio_vs_base": base_step / (base_step + lora_step)}
    if dtype == torch.float32:      # adapters saved in 16 bits, which the CPU engine serves as saved
        floor["floor_ratio_vs_base_16bit"] = base_step / (base_step + lora_step / 2)
    return floor


def adapter_size(rank: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one rank-`rank` adapter on every target of the embedded model, in `dtype`."""
    from transformers import AutoConfig

    from loraplex.server.model.config import ModelConfig
    from loraplex.server.model.layout import in_out_features
    from loraplex.server.model.store import embedded_model_dir

    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(embedded_model_dir()))
    per_layer = sum(rank * (i + o) for i, o in (in_out_features(cfg, t) for t in TARGETS))
    return per_layer * cfg.num_layers * torch.empty((), dtype=dtype).element_size()


def read_bandwidth(device: torch.device | str = "cpu") -> float:
    """Bytes a second a 256 MiB read runs at on `device`, best of 3, off the main thread."""
    return max(isolated(lambda: _read_rate(torch.device(device))) for _ in range(3))


def trace_ceiling(many: dict, one: dict, adapter_bytes: int, bandwidth: float) -> float:
    """The best many/one throughput ratio of an online trace: the one-adapter run's makespan plus the time
    to read the factors of every adapter the many-adapter run's steps had beyond the one run's (each step
    reads each distinct adapter in it once). many, one: the runs' results with `adapter_reads` (the sum
    over their steps of the distinct adapters in each)."""
    extra = max(0.0, many["adapter_reads"] - one["adapter_reads"]) * adapter_bytes / bandwidth
    return one["makespan_s"] / (one["makespan_s"] + extra)


def adapter_reads(metrics) -> tuple[float, float]:
    """(the sum over the steps counted in `metrics` of the distinct adapters in each, the steps)."""
    value = metrics.registry.get_sample_value
    phases = [{"phase": p} for p in ("prefill", "decode")]
    return (sum(value("loraplex_step_adapters_sum", p) or 0.0 for p in phases),
            sum(value("loraplex_step_adapters_count", p) or 0.0 for p in phases))


def _read_rate(device: torch.device) -> float:
    t = torch.ones(64 * 2**20, device=device)   # 256 MiB, far past the caches; made here, off the main thread
    t.sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    t.sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return t.numel() * t.element_size() / (time.perf_counter() - started)
