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
