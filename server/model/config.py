"""The model's shape, read from an HF `config.json` of the Llama family (Llama, Mistral, Qwen2, SmolLM)."""

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Rope variants whose frequencies do not depend on the sequence length, so a table can be precomputed.
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_type: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hf_config: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        if hf.model_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"model_type {hf.model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf.hidden_act!r} is not supported (only silu)")
        rope = _rope_parameters(hf)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
        heads = hf.num_attention_heads
        qwen = hf.model_type == "qwen2"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=_context_window(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_type=rope_type,
            bos_token_id=hf.bos_token_id,
            eos_token_ids=_as_tuple(hf.eos_token_id),
            hf_config=hf,
        )


def _rope_parameters(hf) -> dict:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    return dict(params)


def _context_window(hf) -> int:
    window = hf.max_position_embeddings
    sliding = getattr(hf, "sliding_window", None)
    if sliding and getattr(hf, "use_sliding_window", True):
        # Sequences stay within the window, where sliding-window attention equals full attention.
        window = min(window, sliding)
    return window


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
