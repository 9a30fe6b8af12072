"""Decode attention over runs of equal context lengths gives each row the bits of the row alone, whether the
machine's kernel allows one call per run or not (then one call per sequence)."""

import types

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model import decode_attention

HEADS, KV_HEADS, DIM = 9, 3, 64


def _inputs(batch: int, context: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, DIM, generator=gen)
    keys, values = (torch.randn(batch, context, KV_HEADS, DIM, generator=gen) for _ in "kv")
    return q, keys, values


def _alone(q, keys, values, groups):
    rows = [decode_attention.attend(q[i:i + 1], keys[i:i + 1], values[i:i + 1], length)
            for start, end, length in groups for i in range(start, end)]
    return torch.cat(rows)


def _batch_dependent_sdpa(q, k, v, **kwargs):
    """A kernel whose rounding depends on the batch, as some machines' kernels do."""
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out * (1 + 2**-20 * (q.shape[0] - 1))


@pytest.fixture
def fresh_probe():
    decode_attention.batch_shares_exactly.cache_clear()
    yield
    decode_attention.batch_shares_exactly.cache_clear()


@pytest.mark.parametrize("groups", [[(0, 16, 40)], [(0, 3, 9), (3, 4, 30), (4, 12, 77)]])
def test_runs_answer_as_rows_alone(groups, fresh_probe):
    q, keys, values = _inputs(groups[-1][1], 80)
    assert torch.equal(decode_attention.attend_groups(q, keys, values, groups), _alone(q, keys, values, groups))


def test_a_batch_dependent_kernel_gets_one_call_per_sequence(monkeypatch, fresh_probe):
    fake = types.SimpleNamespace(scaled_dot_product_attention=_batch_dependent_sdpa)
    monkeypatch.setattr(decode_attention, "F", fake)
    assert not decode_attention.batch_shares_exactly(HEADS, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    groups = [(0, 16, 40)]
    q, keys, values = _inputs(16, 40)
    together = decode_attention.attend(q, keys, values, 40)
    assert not torch.equal(together, _alone(q, keys, values, groups))      # the kernel is batch-dependent
    assert torch.equal(decode_attention.attend_groups(q, keys, values, groups), _alone(q, keys, values, groups))


# The native paged kernel (adapters/csrc/decode_attention_cpu.cpp), against torch's attention in float64 on
# the same rows. Tolerance: 2e-6 absolute on outputs of size ~0.1-1 (float32 sums over up to 300 keys;
# measured 2.3e-7 on these inputs).
BLOCK = 16
SHAPES = [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 80)]      # heads, kv_heads, head_dim


def _paged(batch: int, heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int = 0):
    """A cache of a few more blocks than the sequences need, each sequence given shuffled blocks:
    (q, k_cache, v_cache, tables, lengths)."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-max(lengths) // BLOCK)
    k_cache, v_cache = (torch.randn((batch * width + 5) * BLOCK, kv_heads, dim, generator=gen) for _ in "kv")
    tables = torch.randperm(batch * width + 5, generator=gen)[:batch * width].view(batch, width).contiguous()
    q = torch.randn(batch, heads, dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lengths)


def _kernel(q, k_cache, v_cache, tables, lengths):
    return torch.ops.loraplex.paged_decode_attention(q, k_cache, v_cache, tables, lengths, BLOCK, q.shape[-1] ** -0.5)


def _reference(q, k_cache, v_cache, tables, lengths):
    rows = []
    for b, length in enumerate(lengths.tolist()):
        cache_rows = (tables[b][:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]
        k, v = (c[cache_rows].transpose(0, 1)[None].double() for c in (k_cache, v_cache))
        rows.append(F.scaled_dot_product_attention(q[b:b + 1, :, None].double(), k, v, enable_gqa=True)[0, :, 0])
    return torch.stack(rows)


@pytest.fixture
def kernels():
    from loraplex.adapters import native
    assert native.available(), native.error()


@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
def test_paged_kernel_matches_attention_over_the_sequences_rows(kernels, heads, kv_heads, dim):
    lengths = [1, 15, 16, 17, 100, 300, 33, 2]
    inputs = _paged(len(lengths), heads, kv_heads, dim, lengths)
    assert (_kernel(*inputs).double() - _reference(*inputs)).abs().max() < 2e-6


def test_paged_kernel_gives_each_row_its_bits_alone_at_any_thread_count(kernels):
    lengths = [40, 40, 7, 129, 40, 1, 64, 300]
    q, k_cache, v_cache, tables, n = _paged(len(lengths), *SHAPES[0], lengths, seed=1)
    together = _kernel(q, k_cache, v_cache, tables, n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = _kernel(q, k_cache, v_cache, tables, n)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, single_thread)
    for b in range(len(lengths)):
        alone = _kernel(q[b:b + 1].contiguous(), k_cache, v_cache, tables[b:b + 1].contiguous(), n[b:b + 1])
        assert torch.equal(alone[0], together[b]), b


@pytest.mark.parametrize("change,message", [
    (lambda t, n: (t.fill_(9), n), "outside the cache"),
    (lambda t, n: (t.fill_(-1), n), "outside the cache"),
    (lambda t, n: (t, n.fill_(0)), "outside 1.."),
    (lambda t, n: (t, n.fill_(10_000)), "outside 1.."),
])
def test_paged_kernel_refuses_rows_outside_the_cache(kernels, change, message):
    q, k_cache, v_cache, tables, n = _paged(2, *SHAPES[0], [20, 30])
    tables, n = change(tables, n)
    with pytest.raises(RuntimeError, match=message):
        _kernel(q, k_cache, v_cache, tables, n)


def test_paged_kernel_refuses_an_unbuilt_head_dim(kernels):
    q, k_cache, v_cache, tables, n = _paged(2, 4, 2, 48, [20, 30])
    with pytest.raises(RuntimeError, match="head_dim"):
        _kernel(q, k_cache, v_cache, tables, n)


def test_decode_attention_uses_the_kernel_and_falls_back_to_the_gather(kernels, monkeypatch, fresh_probe):
    """The step's decode attention with the kernel and without it (gathered K/V, torch's call)."""
    lengths = [9, 30, 30, 77]
    q, k_cache, v_cache, tables, n = _paged(len(lengths), *SHAPES[0], lengths)
    rows = (tables[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)[:, :max(lengths)].flatten()
    ctx = types.SimpleNamespace(block_tables=tables, context_lengths=n, block_size=BLOCK, gather_rows=rows,
                                decode_groups=[(0, 1, 9), (1, 3, 30), (3, 4, 77)])
    paged = decode_attention.attend_decode(q, k_cache, v_cache, ctx)
    assert torch.equal(paged, _kernel(q, k_cache, v_cache, tables, n))
    monkeypatch.setattr(decode_attention.native, "available", lambda: False)
    gathered = decode_attention.attend_decode(q, k_cache, v_cache, ctx)
    assert not torch.equal(paged, gathered)           # the other path did run
    assert (paged - gathered).abs().max() < 2e-6
