"""Builds a ready engine from a ServerConfig: model files, tokenizer, 4-bit model, KV cache, scheduler."""

import logging
import pathlib
import threading
from dataclasses import dataclass

import torch

from .config import ServerConfig
from .errors import LoraplexError
from .engine.engine import Engine
from .engine.limits import EngineLimits
from .engine.kv_cache import BlockManager
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .model.loader import load_model
from .model.quant import make_backend
from .model.store import resolve_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelDescription:
    name: str
    architecture: str
    device: str
    dtype: str
    quantization: str
    max_sequence_length: int
    vocab_size: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def build_engine(config: ServerConfig) -> tuple[Engine, ModelDescription]:
    from transformers import AutoTokenizer

    from ..adapters import native

    if config.threads:
        torch.set_num_threads(config.threads)
    native.configure(config.native_kernels, config.resolved_cache_dir())
    model_dir = resolve_model_dir(config.model, config.resolved_cache_dir())
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    backend = make_backend(config.quant, config.quant_blocksize, config.quant_group_size)
    log.info("loading %s on %s (%s, %s)", model_dir, device, dtype, backend.describe())
    model = load_model(model_dir, device, dtype, backend)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    window = min(config.max_sequence_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    adapters, lora_step = _adapters(config, model, backend, device, dtype)
    try:
        runner = ModelRunner(model, device, dtype, config.kv_cache_mb, config.kv_block_size, lora_step)
    except BaseException:
        if adapters is not None:       # its threads and reader processes would outlive a failed start
            adapters.stop()
        raise
    blocks = BlockManager(runner.num_blocks, config.kv_block_size)
    scheduler = Scheduler(blocks, config.max_batch_size, config.max_prefill_tokens, config.max_queue_size,
                          config.prefill_chunk_tokens, config.prefill_step_tokens, config.max_step_tokens)
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    limits = EngineLimits(window, config.max_new_tokens, config.max_prompt_tokens)
    engine = Engine(runner, scheduler, tokenizer, limits, tuple(sorted(eos)), adapters)
    if adapters is not None:
        engine.weights = _weight_sets(config, engine, backend, dtype)
        if config.auto_merge:
            from .engine.auto_merge import AutoMergeSettings
            from .engine.auto_planner import AutoPlanner

            settings = AutoMergeSettings(max_wait_s=config.auto_merge_max_wait_seconds)
            engine.auto = AutoPlanner(engine.weights, settings, config.merge_method)
        if config.merge_adapter:
            _merge_at_start(engine, config.merge_adapter, config.merge_method)
    if adapters is not None and config.adapter_watch_seconds > 0:
        adapters.watch(config.adapter_watch_seconds)
    name = pathlib.Path(model_dir).name
    description = ModelDescription(name, cfg.model_type, str(device), str(dtype).removeprefix("torch."),
                                   backend.name, window, cfg.vocab_size)
    return engine, description


def _adapters(config: ServerConfig, model, backend, device, dtype):
    """The adapter loader (with its registry) and the LoRA layers' shared step state, or (None, None)
    with no roots. Preloads run before the engine exists, so their slot copies happen at once."""
    roots = config.adapter_root_paths()
    if not roots:
        return None, None
    from ..adapters.lora_layer import LoraStep, attach_lora, base_weights
    from .model.layout import TARGETS, in_out_features
    from ..adapters.loader import AdapterLoader, ReadSettings
    from ..adapters.registry import AdapterRegistry
    from ..adapters.roots import AdapterRoots
    from ..adapters.slots import SlotBuffers

    shapes = {t: in_out_features(model.config, t) for t in TARGETS}
    buffers = SlotBuffers(config.adapter_slots, config.max_lora_rank, model.config.num_layers, shapes, dtype, device)
    step = LoraStep(buffers)
    attach_lora(model, step)
    if device.type == "cuda":
        from ..adapters import fused_layer, triton_ops

        if triton_ops.available() and config.lora_fused:
            fused_layer.use_fused(model)      # one launch per packed module and step: see fused_layer.py
    registry = AdapterRegistry(config.adapter_slots, config.adapter_host_cache_mb * 2**20)
    reading = ReadSettings(model.config, config.max_lora_rank, dtype, base_weights(model, backend),
                           config.adapter_read_timeout_seconds or None, keep_16bit=buffers.keeps_16bit)
    adapters = AdapterLoader(registry, AdapterRoots([pathlib.Path(r) for r in roots]), buffers, reading,
                             config.adapter_loader_nice, config.adapter_reads_between_steps)
    for adapter_id in config.adapter_preload_ids():
        try:
            adapters.preload(adapter_id).result()
        except LoraplexError as exc:
            adapters.stop()
            raise ValueError(f"preloading adapter {adapter_id!r} failed: {exc}") from None
        log.info("preloaded adapter %s", adapter_id)
    return adapters, step


def _weight_sets(config: ServerConfig, engine: Engine, backend, dtype):
    """Merged adapters' copies of the weights beside the base's: built on a thread of their own (started
    here, on the engine's thread, at its priority), installed between steps by the engine's loop."""
    from functools import partial

    from ..adapters.merge import merge_into_copy, preferred_method
    from .engine.weight_sets import WeightSets

    model = engine.runner.model
    def resident(adapter_id: str):
        return engine.adapters.with_resident(lambda read: read(adapter_id))

    return WeightSets(model, resident,
                      partial(merge_into_copy, model, backend=backend, dtype=dtype), engine.between_steps,
                      config.merge_min_retained, partial(preferred_method, backend=backend))


def _merge_at_start(engine: Engine, adapter_id: str, method: str) -> None:
    """Before the loop runs, so the copy is installed at once; a failed merge stops the start."""
    try:
        status = engine.weights.merge(adapter_id, method).result()
    except LoraplexError as exc:
        engine.adapters.stop()
        raise ValueError(f"merging adapter {adapter_id!r} failed: {exc}") from None
    log.info("merged adapter %s v%d (%s): keeps %.1f%% of its update, %.1f MiB beside the base, %.2f s",
             adapter_id, status.version, status.method, 100 * status.retained, status.size_bytes / 2**20, status.seconds)


def launch_engine(config: ServerConfig) -> tuple[Engine, ModelDescription]:
    """Builds the engine on a new thread and runs its loop on that same thread.

    torch's OpenMP runtime keeps one pool of worker threads per thread that runs torch work. Loading on one
    thread and stepping on another leaves two pools on the same cores; the runtime then stops spinning
    between operations and every matmul pays a wake-up (measured: 1.5x slower steps on 2 cores). So all
    torch work of the engine, loading included, happens on one thread.
    """
    built: dict = {}
    ready = threading.Event()

    def main():
        try:
            built["engine"] = build_engine(config)
        except BaseException as exc:   # handed to the caller below
            built["error"] = exc
            return
        finally:
            ready.set()
        built["engine"][0].run()

    thread = threading.Thread(target=main, name="loraplex-engine", daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    return built["engine"]
