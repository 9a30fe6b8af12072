"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a flat token layout.

Plain math: RMSNorm, rotary embeddings, grouped-query attention with a paged KV cache, SwiGLU.
Linear layers are created as `nn.Linear` and swapped for 4-bit ones at load (see loader.py);
this file does not know about quantization or adapters. On a CPU in float32 inference, RMSNorm and rotary
are one native call each (`adapters/csrc/layer_ops_cpu.cpp`) instead of several torch calls.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import native
from .config import ModelConfig
from .context import StepContext
from .decode_attention import attend_decode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(1) == 1 and _native_fits(x) and self.weight.dtype == torch.float32:
            return torch.ops.loraplex.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Precomputed cos/sin tables for every position, so a step only indexes them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        with torch.device("cpu"):   # real tables even when the model is built on the meta device
            cos, sin = self._tables(cfg)
        self.register_buffer("cos", cos, persistent=False)   # [max_pos, head_dim]
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if cfg.rope_type == "default":
            base = cfg.hf_config.rope_parameters["rope_theta"] if hasattr(cfg.hf_config, "rope_parameters") \
                else cfg.hf_config.rope_theta
            inv_freq = 1.0 / (base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[cfg.rope_type](cfg.hf_config, "cpu")
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.float())      # [max_pos, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _native_fits(x: torch.Tensor) -> bool:
    """A float32 CPU tensor outside autograd, with the native kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and native.available()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, head_dim]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v projections packed into one matmul: [q_size + 2 * kv_size, hidden] (see layout.PACKED)
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Set by the model runner: [num_kv_rows, num_kv_heads, head_dim] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos, sin, ctx: StepContext) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k = self._rotated_qk(qkv, cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].reshape(n, self.num_kv_heads, self.head_dim)
        self.k_cache[ctx.write_rows] = k
        self.v_cache[ctx.write_rows] = v
        if ctx.pieces is not None:
            out = self._mixed(q, k, v, ctx)
        else:
            out = self._prefill(q, k, v, ctx) if ctx.is_prefill else self._decode(q, ctx)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def _rotated_qk(self, qkv: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, heads, dim] and k [n, kv_heads, dim] of the packed projection, rotated."""
        n = qkv.shape[0]
        if _native_fits(qkv):      # q and k side by side, rotated in one call
            qk = qkv[:, :self.q_size + self.kv_size].reshape(n, self.num_heads + self.num_kv_heads, self.head_dim)
            torch.ops.loraplex.rotary_(qk, cos, sin)
            return qk[:, :self.num_heads], qk[:, self.num_heads:]
        q, k = qkv[:, :self.q_size], qkv[:, self.q_size:self.q_size + self.kv_size]
        return (apply_rotary(q.reshape(n, self.num_heads, self.head_dim), cos, sin),
                apply_rotary(k.reshape(n, self.num_kv_heads, self.head_dim), cos, sin))

    def _prefill(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        # Prompts attend only to themselves (no cached prefix), causally, one sequence at a time.
        out = torch.empty_like(q)
        bounds = ctx.cu_seqlens
        for start, end in zip(bounds[:-1], bounds[1:]):
            out[start:end] = _causal(q[start:end], k[start:end], v[start:end])
        return out

    def _mixed(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        """The decode rows as in a decode step, then each prompt piece: a first piece attends to itself as a
        whole prompt does (so a prompt within one piece computes exactly as unchunked), a later one to the
        cached start of its prompt and to itself, causally."""
        pieces, out = ctx.pieces, torch.empty_like(q)
        if pieces.offset:
            out[:pieces.offset] = self._decode(q[:pieces.offset], ctx)
        for j, (start, key_rows) in enumerate(zip(pieces.starts, pieces.key_rows)):
            rows = slice(pieces.offset + pieces.bounds[j], pieces.offset + pieces.bounds[j + 1])
            if key_rows is None:
                out[rows] = _causal(q[rows], k[rows], v[rows])
            else:
                out[rows] = _after_prefix(q[rows], self.k_cache[key_rows], self.v_cache[key_rows], start)
        return out

    def _decode(self, q, ctx: StepContext) -> torch.Tensor:
        return attend_decode(q, self.k_cache, self.v_cache, ctx)     # q: [batch, heads, dim]


def _causal(q, k, v) -> torch.Tensor:
    """One sequence's tokens attending to each other causally: [len, heads, dim] each (k, v: kv heads)."""
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))            # [1, heads, len, dim]
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)


def _after_prefix(q, keys, values, start: int) -> torch.Tensor:
    """A piece's queries (positions start ..) over the keys of positions 0 .. piece end: [len, heads, dim]."""
    length, context = q.shape[0], keys.shape[0]
    positions = torch.arange(start, start + length, device=q.device)
    visible = torch.arange(context, device=q.device)[None] <= positions[:, None]       # [len, context]
    qs, ks, vs = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, enable_gqa=True)[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # gate and up projections packed into one matmul: [2 * intermediate, hidden]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names match HF checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids: [num_tokens] -> final hidden states [len(ctx.logits_index), hidden] of the rows whose
        next token is wanted; the output head (lm_head.py) turns them into logits."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(ctx.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        return self.model.norm(x[ctx.logits_index])
