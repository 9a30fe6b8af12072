"""Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into an `Adapter`.

All PEFT knowledge lives here: key names, config fields, alpha / r. Everything is validated against the
base model's shape before anything reaches a device, and the scaling is folded into `b` once.
"""

import json
import math
import re
from pathlib import Path

import torch

from loraplex.adapters.canonical import TARGETS, Adapter, LoraModule
from loraplex.adapters.tensor_file import TensorFileError, read_tensors
from loraplex.server.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", optionally with an adapter name
# before ".weight" (".lora_A.default.weight"). Group 1 is the module path, 2 the factor.
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Config fields this reader cannot honour yet: (field, value that is fine, why refused).
_REFUSED = (
    ("use_dora", False, "DoRA adapters are not supported"),
    ("use_rslora", False, "rsLoRA scaling is not yet supported"),
    ("use_qalora", False, "QA-LoRA adapters are not supported"),
    ("lora_bias", False, "LoRA bias terms are not supported"),
    ("modules_to_save", None, "modules_to_save (fully trained extra modules) is not supported"),
    ("rank_pattern", None, "per-module ranks via rank_pattern are not yet supported"),
    ("alpha_pattern", None, "per-module alphas via alpha_pattern are not yet supported"),
    ("layer_replication", None, "layer_replication is not supported"),
    ("target_parameters", None, "target_parameters (non-Linear targets) is not supported"),
    ("fan_in_fan_out", False, "fan_in_fan_out (transposed weights) is not supported"),
    ("trainable_token_indices", None, "trainable_token_indices (embedding changes) is not supported"),
    ("alora_invocation_tokens", None, "activated LoRA (aLoRA) is not supported"),
    ("arrow_config", None, "Arrow routing is not supported"),
    ("kasa_config", None, "KaSA adapters are not supported"),
    ("use_bdlora", None, "block-diagonal LoRA is not supported"),
)


class AdapterFormatError(ValueError):
    pass


class AdapterTooLarge(AdapterFormatError):
    """The adapter's rank is above the server's configured maximum."""


def load_peft_lora(adapter_dir: Path, adapter_id: str, model: ModelConfig, max_rank: int,
                   dtype: torch.dtype = torch.float32) -> Adapter:
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    rank, alpha = _check_config(config, max_rank)
    tensors = _read_tensors(adapter_dir)
    pairs = _pair_tensors(tensors, config.get("target_modules"))
    _check_finite(pairs)
    scaling = alpha / rank
    modules = {key: _module(key, a, b, model, rank, scaling, dtype) for key, (a, b) in pairs.items()}
    _check_layers(modules, config.get("layers_to_transform"), model)
    return Adapter(adapter_id=adapter_id, modules=modules, alpha=alpha, source=str(adapter_dir))


def in_out_features(model: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of `target`'s base weight, which is [out, in]."""
    q_out = model.num_heads * model.head_dim
    kv_out = model.num_kv_heads * model.head_dim
    return {
        "q_proj": (model.hidden_size, q_out),
        "k_proj": (model.hidden_size, kv_out),
        "v_proj": (model.hidden_size, kv_out),
        "o_proj": (q_out, model.hidden_size),
        "gate_proj": (model.hidden_size, model.intermediate_size),
        "up_proj": (model.hidden_size, model.intermediate_size),
        "down_proj": (model.intermediate_size, model.hidden_size),
    }[target]


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing in {adapter_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(config: dict, max_rank: int) -> tuple[int, float]:
    """(r, lora_alpha) after refusing every field this reader cannot honour."""
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported "
                                 "(only LORA)")
    for name, fine, why in _REFUSED:
        value = config.get(name, fine)
        if value != fine and value not in (None, False, [], {}):
            raise AdapterFormatError(f"{CONFIG_FILE}: {name}={value!r} refused: {why}")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{CONFIG_FILE}: bias={config['bias']!r} refused: only 'none' is supported")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterFormatError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{CONFIG_FILE}: lora_alpha must be a finite number, got {alpha!r}")
    if rank > max_rank:
        raise AdapterTooLarge(f"{CONFIG_FILE}: rank r={rank} is above the maximum rank {max_rank}")
    return rank, float(alpha)


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        pickled = [name for name in PICKLE_FILES if (adapter_dir / name).exists()]
        if pickled:
            # Unpickling runs arbitrary code, so these are never opened.
            raise AdapterFormatError(f"{pickled[0]} refused: safetensors only ({WEIGHTS_FILE} is missing)")
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing in {adapter_dir}")
    try:
        return read_tensors(path)
    except (TensorFileError, OSError) as e:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is corrupt or truncated: {e}") from None


def _pair_tensors(tensors: dict[str, torch.Tensor], target_modules) -> dict[tuple[int, str], tuple]:
    """{(layer, target): (lora_A, lora_B)}, checking every key names a target the base has."""
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if not match:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} is not a LoRA A/B weight of a Linear")
        path, factor = match.groups()
        target = _target_of(name, path)  # before the layer, so "lm_head" reads as a missing target
        key = (_layer_of(name, path), target)
        _check_listed(name, path, target_modules)
        factors.setdefault(key, {})[factor] = tensor
    if not factors:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA tensors")
    for (layer, target), found in factors.items():
        if set(found) != {"A", "B"}:
            missing = "lora_B" if "A" in found else "lora_A"
            raise AdapterFormatError(f"{WEIGHTS_FILE}: layer {layer} {target} has no {missing} weight")
    return {key: (found["A"], found["B"]) for key, found in factors.items()}


def _target_of(name: str, path: str) -> str:
    target = path.rsplit(".", 1)[-1]
    if target not in TARGETS:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} targets module {target!r}, which the base "
                                 f"model lacks (supported targets: {', '.join(TARGETS)})")
    return target


def _layer_of(name: str, path: str) -> int:
    match = _LAYER.search(path + ".")
    if not match:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} names no decoder layer ('layers.N')")
    return int(match.group(1))


def _check_listed(name: str, path: str, target_modules) -> None:
    """The tensor's module must be one the config's target_modules selects (PEFT's matching rules)."""
    if target_modules is None or target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        listed = re.fullmatch(target_modules, path) is not None
    else:
        listed = any(path == t or path.endswith("." + t) for t in target_modules)
    if not listed:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} is for a module not selected by "
                                 f"{CONFIG_FILE} target_modules {target_modules!r}")


def _check_finite(pairs: dict[tuple[int, str], tuple]) -> None:
    """Every factor floating point with finite values. One fused call over all tensors (loads run beside
    decoding, so their Python and dispatch time counts): a norm is finite iff every value is finite and
    the values are far below float32's range."""
    named = [(f"layer {layer} {target} {factor}", tensor) for (layer, target), pair in pairs.items()
             for factor, tensor in zip(("lora_A", "lora_B"), pair)]
    for where, tensor in named:
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{where}: dtype {tensor.dtype} is not floating point")
    norms = torch.stack(torch._foreach_norm([t.float() for _, t in named]))
    for index in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
        raise AdapterFormatError(f"{named[index][0]}: holds NaN or inf values (or values too large to serve)")


def _module(key: tuple[int, str], a: torch.Tensor, b: torch.Tensor, model: ModelConfig, rank: int,
            scaling: float, dtype: torch.dtype) -> LoraModule:
    layer, target = key
    where = f"layer {layer} {target}"
    in_features, out_features = in_out_features(model, target)
    # PEFT stores lora_A as [r, in] and lora_B as [out, r].
    if a.dim() != 2 or a.shape[1] != in_features:
        raise AdapterFormatError(f"{where} lora_A: shape {tuple(a.shape)} does not fit the base model "
                                 f"(expected [{rank}, {in_features}])")
    if b.dim() != 2 or b.shape[0] != out_features:
        raise AdapterFormatError(f"{where} lora_B: shape {tuple(b.shape)} does not fit the base model "
                                 f"(expected [{out_features}, {rank}])")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterFormatError(f"{where}: rank of lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                 f"differs from the config's r={rank}")
    # Fold alpha / r into b in float32, then cast once: the hot path computes x @ a.T @ b.T only.
    scaled_b = (b.to(torch.float32) * scaling).to(dtype)           # a new, contiguous tensor
    return LoraModule(a=a.to(dtype).contiguous(), b=scaled_b)


def _check_layers(modules: dict, layers_to_transform, model: ModelConfig) -> None:
    allowed = _as_layer_set(layers_to_transform)
    for layer, target in modules:
        if layer >= model.num_layers:
            raise AdapterFormatError(f"layer index {layer} ({target}) is out of range: the base model has "
                                     f"{model.num_layers} layers")
        if allowed is not None and layer not in allowed:
            raise AdapterFormatError(f"layer {layer} ({target}) has weights but is not in "
                                     f"{CONFIG_FILE} layers_to_transform {layers_to_transform!r}")


def _as_layer_set(layers_to_transform) -> set[int] | None:
    if layers_to_transform is None:
        return None
    if isinstance(layers_to_transform, int):
        return {layers_to_transform}
    return set(layers_to_transform)
