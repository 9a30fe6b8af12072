"""The Triton LoRA kernels against the torch reference, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set by conftest.py before anything imports triton), on small shapes: mixed ranks x
hidden x dtype x adapter popularity, prefill and decode layouts, and the column slice of a packed output."""

import os

import pytest
import torch

from loraplex.adapters import ops
from loraplex.adapters.segments import compute_segments
from test_lora_ops import MAX_RANK, SLOT_RANKS, TOLERANCE, make_batch

assert os.environ.get("TRITON_INTERPRET") == "1", "these tests need Triton's CPU interpreter"

triton_ops = pytest.importorskip("loraplex.adapters.triton_ops")
if not triton_ops.available():   # the test extras install triton; without it this module must not pass
    pytest.fail("triton is not installed (pip install -e '.[test]')", pytrace=False)


@pytest.mark.parametrize("layout", ["prefill", "decode"])
@pytest.mark.parametrize("kind", ["distinct", "uniform", "skewed", "identical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("hidden", [64, 96])
def test_triton_kernels_match_reference(hidden, dtype, kind, layout):
    segments, x, base, (a_stack, b_stack, a_list, b_list) = make_batch(kind, layout, hidden, dtype, seed=hidden)
    ranks = torch.tensor(SLOT_RANKS)
    y = torch.full((segments.num_tokens, MAX_RANK), float("nan"), dtype=dtype)
    out = base.clone()
    triton_ops.shrink(x, a_stack, segments.token_slots, ranks, y)
    triton_ops.expand(y, b_stack, segments.token_slots, ranks, out)

    token_slots = segments.token_slots.tolist()
    expected = base.float() + ops.reference_lora(x, a_list, b_list, token_slots)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    for t, s in enumerate(token_slots):                 # shrink wrote each token's live ranks only
        if s < 0:
            assert torch.isnan(y[t]).all() and torch.equal(out[t], base[t])
        else:
            r = SLOT_RANKS[s]
            torch.testing.assert_close(y[t, :r].float(), x[t].float() @ a_list[s].float().T, atol=atol, rtol=rtol)
            assert torch.isnan(y[t, r:]).all()


def test_triton_expand_into_a_packed_column_slice():
    segments, x, _, (a_stack, b_stack, a_list, b_list) = make_batch("uniform", "decode", 64, torch.float32, 7)
    ranks = torch.tensor(SLOT_RANKS)
    packed = torch.randn(segments.num_tokens, 3 * 64, generator=torch.Generator().manual_seed(1))
    out = packed.clone()
    y = triton_ops.shrink(x, a_stack, segments.token_slots, ranks, torch.zeros(segments.num_tokens, MAX_RANK))
    triton_ops.expand(y, b_stack, segments.token_slots, ranks, out[:, 64:128])
    delta = ops.reference_lora(x, a_list, b_list, segments.token_slots.tolist())
    torch.testing.assert_close(out[:, 64:128], packed[:, 64:128] + delta, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[:, :64], packed[:, :64]) and torch.equal(out[:, 128:], packed[:, 128:])


def test_facade_picks_triton_on_cuda_only():
    segments = compute_segments(list(range(16)), [1] * 16)
    assert ops._pick(segments, [16] * 16, torch.zeros(16, 576), 576) != "triton"
    if torch.cuda.is_available():
        assert ops._pick(segments, [16] * 16, torch.zeros(16, 576, device="cuda"), 576) == "triton"
