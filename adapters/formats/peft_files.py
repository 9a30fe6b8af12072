"""What every PEFT adapter directory shares, whatever its peft_type: adapter_config.json, the safetensors file
(never a pickle), tensor names, which layer and target each tensor belongs to, and the shape and value
checks against the base model. The format modules build on these; nothing here knows a format's math.
"""

import json
import math
import os
import re
from pathlib import Path

import torch

from loraplex.adapters.tensor_file import FileMissing, FileRefused, read_small, read_tensors
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.layout import TARGETS, in_out_features

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 2**20          # PEFT writes ~1 KB; patterns over every module of a large model stay far below
# The weights file's JSON header: ~150 bytes per tensor name and entry; this much per tensor and 1 MiB on top.
HEADER_BYTES_PER_TENSOR = 1024
HEADER_BYTES = 2**20

# "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", optionally with an adapter name
# ("lora_A.default.weight"); AdaLoRA's factors are bare parameters ("q_proj.lora_E"). Group 1 is the module
# path, 2 the factor.
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_E|lora_magnitude_vector)"
                  r"(?:\.[\w-]+)*$")
_EMBEDDING_KEY = re.compile(r"\.lora_embedding_[AB](?:\.[\w-]+)*$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")

# Config fields no format honours: (field, value that is fine, why refused).
REFUSED = (
    ("lora_bias", False, "LoRA bias terms are not supported"),
    ("modules_to_save", None, "modules_to_save (fully trained extra modules) is not supported"),
    ("layer_replication", None, "layer_replication is not supported"),
    ("target_parameters", None, "target_parameters (non-Linear targets) is not supported"),
    ("fan_in_fan_out", False, "fan_in_fan_out (transposed weights) is not supported"),
    ("trainable_token_indices", None, "trainable_token_indices (embedding changes) is not supported"),
    ("alora_invocation_tokens", None, "activated LoRA (aLoRA) is not supported"),
    ("arrow_config", None, "Arrow routing is not supported"),
    ("kasa_config", None, "KaSA adapters are not supported"),
    ("use_bdlora", None, "block-diagonal LoRA is not supported"),
    ("velora_config", None, "VeLoRA is not supported"),
    ("monteclora_config", None, "MonteCLoRA is not supported"),
)

Factors = dict[tuple[int, str], dict[str, torch.Tensor]]   # (layer, target) -> {"A": ..., "B": ..., ...}


class AdapterFormatError(ValueError):
    pass


class AdapterTooLarge(AdapterFormatError):
    """The adapter's rank is above the server's configured maximum."""


def factor_elements(model: ModelConfig, rank: int) -> int:
    """Elements of lora_A [rank, in] and lora_B [out, rank] on every target of every layer."""
    return rank * model.num_layers * sum(sum(in_out_features(model, t)) for t in TARGETS)


def weights_limit(model: ModelConfig, rank: int) -> int:
    """Bytes of the largest weights file a legal adapter can have: lora_A and lora_B at `rank` on every
    target of every layer, AdaLoRA's lora_E [rank, 1] and DoRA's magnitude [out] beside them, all in
    float32, and the header."""
    extra = model.num_layers * sum(rank + in_out_features(model, t)[1] for t in TARGETS)
    tensors = 4 * len(TARGETS) * model.num_layers
    return 4 * (factor_elements(model, rank) + extra) + HEADER_BYTES + HEADER_BYTES_PER_TENSOR * tensors


def read_config(adapter_dir: Path) -> dict:
    try:
        text = read_small(adapter_dir, CONFIG_FILE, MAX_CONFIG_BYTES, "a config may take")
    except FileRefused as e:
        raise AdapterFormatError(str(e)) from None
    try:
        config = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def refuse_unsupported(config: dict, extra: tuple = ()) -> None:
    """Every field that would change the math in a way no reader honours is refused by name."""
    for name, fine, why in REFUSED + extra:
        value = config.get(name, fine)
        if value != fine and value not in (None, False, [], {}):
            raise AdapterFormatError(f"{CONFIG_FILE}: {name}={value!r} refused: {why}")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{CONFIG_FILE}: bias={config['bias']!r} refused: trained bias terms are not "
                                 "supported (only 'none')")


def positive_int(config: dict, name: str, value=None) -> int:
    value = config.get(name) if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterFormatError(f"{CONFIG_FILE}: {name} must be a positive integer, got {value!r}")
    return value


def finite_number(config: dict, name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterFormatError(f"{CONFIG_FILE}: {name} must be a finite number, got {value!r}")
    return float(value)


def read_weights(adapter_dir: Path, model: ModelConfig, rank: int) -> dict[str, torch.Tensor]:
    """The weights file's tensors; refused unread when larger than any adapter of `rank` can be."""
    why = f"the largest adapter of rank {rank} for this base model takes"
    try:
        return read_tensors(adapter_dir, WEIGHTS_FILE, weights_limit(model, rank), why)
    except FileMissing:
        pickled = [name for name in PICKLE_FILES if os.path.lexists(adapter_dir / name)]
        if pickled:
            # Unpickling runs arbitrary code, so these are never opened.
            raise AdapterFormatError(f"{pickled[0]} refused: safetensors only ({WEIGHTS_FILE} is missing)") from None
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing") from None
    except FileRefused as e:
        raise AdapterFormatError(str(e)) from None


def group_factors(tensors: dict[str, torch.Tensor], config: dict, allowed: dict[str, str]) -> tuple[Factors, dict]:
    """({(layer, target): {factor: tensor}}, {(layer, target): module path}) for the factors a format
    reads. allowed maps each factor this format has (e.g. "A", "E", "magnitude") to how to name it in
    errors; any other tensor is refused by name. Checks that every module is a target the base has and
    one that the config's target_modules selects."""
    names = {"lora_A": "A", "lora_B": "B", "lora_E": "E", "lora_magnitude_vector": "magnitude"}
    factors: Factors = {}
    paths = {}
    for name, tensor in tensors.items():
        if _EMBEDDING_KEY.search(name):
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} refused: embedding adapters are not "
                                     "supported")
        match = _KEY.match(name)
        factor = names.get(match.group(2)) if match else None
        if factor not in allowed:
            what = " / ".join(allowed.values())
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} is not a {what} weight of a Linear")
        path = match.group(1)
        target = _target_of(name, path)  # before the layer, so "lm_head" reads as an unsupported target
        key = (_layer_of(name, path), target)
        _check_listed(name, path, config.get("target_modules"))
        factors.setdefault(key, {})[factor] = tensor
        paths[key] = path
    if not factors:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no LoRA tensors")
    for (layer, target), found in factors.items():
        for factor in allowed:
            if factor not in found:
                raise AdapterFormatError(f"{WEIGHTS_FILE}: layer {layer} {target} has no {allowed[factor]} weight")
    check_finite(factors, allowed)
    return factors, paths


def _target_of(name: str, path: str) -> str:
    target = path.rsplit(".", 1)[-1]
    if target in EMBEDDING_MODULES:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {name!r} targets module {target!r} refused: embedding "
                                 "and output-head adapters are not supported")
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


def check_finite(factors: Factors, allowed: dict[str, str]) -> None:
    """Every factor floating point with finite values. One fused call over all tensors (loads run beside
    decoding, so their Python and dispatch time counts): a norm is finite iff every value is finite and
    the values are far below float32's range."""
    named = [(f"layer {layer} {target} {allowed[factor]}", tensor)
             for (layer, target), found in factors.items() for factor, tensor in found.items()]
    for where, tensor in named:
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{where}: dtype {tensor.dtype} is not floating point")
    norms = torch.stack(torch._foreach_norm([t.float() for _, t in named]))
    for index in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
        raise AdapterFormatError(f"{named[index][0]}: holds NaN or inf values (or values too large to serve)")


def check_shapes(key: tuple[int, str], a: torch.Tensor, b: torch.Tensor, model: ModelConfig,
                 a_width: int | None = None) -> int:
    """The module's rank, after checking lora_A is [r, in] (or [r, a_width]) and lora_B [out, r]."""
    layer, target = key
    where = f"layer {layer} {target}"
    in_features, out_features = in_out_features(model, target)
    width = in_features if a_width is None else a_width
    rank = a.shape[0] if a.dim() == 2 else "r"
    if a.dim() != 2 or a.shape[1] != width:
        raise AdapterFormatError(f"{where} lora_A: shape {tuple(a.shape)} does not fit the base model "
                                 f"(expected [{rank}, {width}])")
    if b.dim() != 2 or b.shape[0] != out_features:
        raise AdapterFormatError(f"{where} lora_B: shape {tuple(b.shape)} does not fit the base model "
                                 f"(expected [{out_features}, {rank}])")
    if b.shape[1] != a.shape[0]:
        raise AdapterFormatError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on "
                                 "the rank")
    return a.shape[0]


def check_layers(keys, layers_to_transform, model: ModelConfig) -> None:
    allowed = _as_layer_set(layers_to_transform)
    for layer, target in keys:
        if layer >= model.num_layers:
            raise AdapterFormatError(f"layer index {layer} ({target}) is out of range: the base model has "
                                     f"{model.num_layers} layers")
        if allowed is not None and layer not in allowed:
            raise AdapterFormatError(f"layer {layer} ({target}) has weights but is not in "
                                     f"{CONFIG_FILE} layers_to_transform {layers_to_transform!r}")


def check_rank(where: str, rank: int, max_rank: int) -> None:
    if rank > max_rank:
        raise AdapterTooLarge(f"{where}: rank r={rank} is above the maximum rank {max_rank}")


def _as_layer_set(layers_to_transform) -> set[int] | None:
    if layers_to_transform is None:
        return None
    if isinstance(layers_to_transform, int):
        return {layers_to_transform}
    return set(layers_to_transform)
