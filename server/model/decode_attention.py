"""Decode attention: each decoding query over its own sequence's cached keys and values.

A sequence's numbers must not depend on what else is in its step (the greedy answers of the batch-invariance
tests rely on it). On a CPU with the native kernels (float32) one call per layer does the whole batch: it
reads each sequence's K/V in place through its block table and computes every (sequence, head) alone in a
fixed order, so batch invariance holds by construction (`adapters/csrc/decode_attention_cpu.cpp`; on a
2-core AMD EPYC at batch 16, context 96: 115 us a layer for its 2.4 MB of K/V, against 690 us for the
gather and one torch call per sequence below).

Elsewhere (CUDA, no compiler, `--no-native-kernels`) K/V are gathered and torch's kernel runs. Sequences of
different context lengths are never padded into one call (a masked call rounds differently from the row
alone: measured, 29 of 32 rows differed in their last bits). Sequences of equal length can share one call
where torch's CPU kernel gives each row the bits it gives the row alone. That held on a 2-core Intel Xeon
with AMX (torch 2.13, every batch and length tried) but not on a 2-core AMD EPYC (42 of 42 outputs
differed), so it is checked once per shape on the machine itself, and where it fails each sequence gets a
call of its own. On the Intel machine sharing the call cut decode attention at batch
16 from 325 to 91 us a layer (context 100).
"""

import functools

import torch
import torch.nn.functional as F

from ...adapters import native

PAGED_DIMS = (32, 64, 80, 96, 128, 256)      # the head dims the native kernel is built for
_PROBE_BATCHES = (2, 3, 8, 16, 33)
_PROBE_LENGTHS = (1, 7, 64, 129, 300)


def attend_decode(q, k_cache, v_cache, ctx) -> torch.Tensor:
    """q: [batch, heads, dim]; k_cache, v_cache: [kv rows, kv_heads, dim]; ctx: the step's StepContext."""
    if _paged_kernel_fits(q, k_cache):
        return torch.ops.loraplex.paged_decode_attention(q.contiguous(), k_cache, v_cache, ctx.block_tables,
                                                         ctx.context_lengths, ctx.block_size, q.shape[-1] ** -0.5)
    batch, kv_heads, dim = q.shape[0], k_cache.shape[1], k_cache.shape[2]
    keys = k_cache.index_select(0, ctx.gather_rows).view(batch, -1, kv_heads, dim)
    values = v_cache.index_select(0, ctx.gather_rows).view(batch, -1, kv_heads, dim)
    return attend_groups(q, keys, values, ctx.decode_groups)


def _paged_kernel_fits(q, k_cache) -> bool:
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32 and q.shape[-1] in PAGED_DIMS
            and q.shape[1] % k_cache.shape[1] == 0 and native.available())


def attend(q, keys, values, length: int) -> torch.Tensor:
    """q: [n, heads, dim]; keys, values: [n, context, kv_heads, dim] -> [n, heads, dim], over :length."""
    k = keys[:, :length].transpose(1, 2)      # [n, kv_heads, length, dim]
    v = values[:, :length].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def attend_groups(q, keys, values, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """groups: runs (start, end, length) of rows with equal context length."""
    batch, heads, dim = q.shape
    if batch == 1:
        return attend(q, keys, values, groups[0][2])
    shared = batch_shares_exactly(heads, keys.shape[2], dim, q.dtype, q.device)
    out = torch.empty_like(q)
    for start, end, length in groups:
        step = end - start if shared else 1
        for i in range(start, end, step):
            out[i:i + step] = attend(q[i:i + step], keys[i:i + step], values[i:i + step], length)
    return out


@functools.cache
def batch_shares_exactly(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether one call over equal-length sequences gives every row the bits of the row alone, on random
    inputs of this shape over several batch sizes and lengths (checked once per process and shape)."""
    gen = torch.Generator().manual_seed(0)
    for length in _PROBE_LENGTHS:
        for batch in _PROBE_BATCHES:
            q = torch.randn(batch, heads, dim, generator=gen).to(device, dtype)
            keys, values = (torch.randn(batch, length + 3, kv_heads, dim, generator=gen).to(device, dtype)
                            for _ in "kv")
            together = attend(q, keys, values, length)
            for i in range(batch):
                if not torch.equal(together[i:i + 1], attend(q[i:i + 1], keys[i:i + 1], values[i:i + 1], length)):
                    return False
    return True
