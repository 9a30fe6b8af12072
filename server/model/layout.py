"""The packed-linear layout of a Llama-family decoder layer, in one place.

A checkpoint (and an adapter) names seven linears per layer, its targets; our model packs those that
share an input into one module each, stacking their weights along out_features. The loader stacks the
checkpoint's rows by this table, the LoRA layers find each target's output slice by it, the adapter readers
check shapes by it and DoRA dequantizes one packed module for all its parts by it.
"""

from .config import ModelConfig

# Path of each linear under a decoder layer -> the targets its output stacks, in output order.
PACKED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}

# The linears an adapter may target, packed module by packed module (the parts of one module adjacent).
TARGETS = tuple(target for targets in PACKED.values() for target in targets)


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


def in_widths(model: ModelConfig) -> tuple[int, ...]:
    """The distinct in_features of the layer's linears (each packed module's parts share one)."""
    return tuple(dict.fromkeys(in_out_features(model, targets[0])[0] for targets in PACKED.values()))


def slices(model: ModelConfig, path: str) -> list[tuple[str, int, int]]:
    """(target, output offset, output size) for each part of the packed linear at `path`, in order."""
    out, offset = [], 0
    for target in PACKED[path]:
        size = in_out_features(model, target)[1]
        out.append((target, offset, size))
        offset += size
    return out


def checkpoint_paths(path: str) -> list[str]:
    """The checkpoint linears (under the same decoder layer) that the linear at `path` stacks, in order:
    "self_attn.qkv_proj" -> ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]."""
    parent = path.rpartition(".")[0]
    return [f"{parent}.{target}" for target in PACKED[path]]
