"""Segmented LoRA ops against the plain per-token reference loop.

Sweep: mixed ranks (4, 8, 16, 64 in one batch) x hidden (64, 576) x dtype x adapter popularity
(distinct, uniform, skewed, identical; every batch also has base-only sequences) x layout (prefill, decode)
x implementation (segment loop, gather-bmm, facade).
"""

import math

import pytest
import torch

from loraplex.adapters import native, ops
from loraplex.adapters.segments import compute_segments

SLOT_RANKS = [4, 8, 16, 64, 4, 8, 16, 64]  # one live rank per device slot; max_rank 64
MAX_RANK = max(SLOT_RANKS)
NUM_SEQS = 8
BASE_SEQS = (2, 5)  # these sequences carry no adapter
STALE = 1e3  # fills A rows / B columns past a slot's rank: must never reach a result
# (atol, rtol) of out = base + delta, against the float32 reference on the same (rounded) inputs.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 1e-2)}
IMPLS = {
    "loop": (ops.shrink_loop, ops.expand_loop),
    "gather": (ops.shrink_gather, ops.expand_gather),
    "native": (ops.shrink_native, ops.expand_native),
    "facade": (ops.lora_shrink, ops.lora_expand),
}


@pytest.fixture(autouse=True)
def native_built(request):
    """The CPU kernels must build here (make install builds them); LORAPLEX_NATIVE_KERNELS=0 is the only opt-out."""
    if "native" in request.node.name:
        if not native.enabled():
            pytest.skip("native kernels turned off (LORAPLEX_NATIVE_KERNELS=0)")
        assert native.available(), native.error()


def popularity_slots(kind: str, gen: torch.Generator) -> list[int]:
    """Slot id per sequence (-1 = base) for one popularity pattern."""
    if kind == "distinct":
        slots = list(range(NUM_SEQS))
    elif kind == "uniform":
        slots = [i % math.ceil(math.sqrt(NUM_SEQS)) for i in range(NUM_SEQS)]
    elif kind == "skewed":  # Zipf(1.5) over the slots
        weights = torch.tensor([1.0 / k**1.5 for k in range(1, len(SLOT_RANKS) + 1)])
        slots = torch.multinomial(weights, NUM_SEQS, replacement=True, generator=gen).tolist()
    else:  # identical; slot 3 has the largest rank
        slots = [3] * NUM_SEQS
    return [-1 if i in BASE_SEQS else s for i, s in enumerate(slots)]


def make_stacks(hidden: int, dtype, gen):
    """Stacked slot buffers with stale values past each rank, plus the live per-slot A/B for the oracle."""
    a_stack = torch.full((len(SLOT_RANKS), MAX_RANK, hidden), STALE)
    b_stack = torch.full((len(SLOT_RANKS), hidden, MAX_RANK), STALE)
    for s, r in enumerate(SLOT_RANKS):
        a_stack[s, :r] = torch.randn(r, hidden, generator=gen) / math.sqrt(hidden)  # shrink output ~ O(1)
        b_stack[s, :, :r] = torch.randn(hidden, r, generator=gen) / math.sqrt(r)
    a_stack, b_stack = a_stack.to(dtype), b_stack.to(dtype)
    a_list = [a_stack[s, :r] for s, r in enumerate(SLOT_RANKS)]
    b_list = [b_stack[s, :, :r] for s, r in enumerate(SLOT_RANKS)]
    return a_stack, b_stack, a_list, b_list


def make_batch(kind: str, layout: str, hidden: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    seq_slots = popularity_slots(kind, gen)
    lens = [1] * NUM_SEQS if layout == "decode" else torch.randint(1, 7, (NUM_SEQS,), generator=gen).tolist()
    segments = compute_segments(seq_slots, lens)
    x = torch.randn(segments.num_tokens, hidden, generator=gen).to(dtype)
    base = torch.randn(segments.num_tokens, hidden, generator=gen).to(dtype)  # the base layer's output
    return segments, x, base, make_stacks(hidden, dtype, gen)


# The native kernels are float32 only (bfloat16 steps take the torch implementations).
IMPL_DTYPES = [pytest.param(impl, dtype, id=f"{impl}-{name}") for impl in IMPLS
               for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
               if not (impl == "native" and dtype != torch.float32)]
POPULARITY = ["distinct", "uniform", "skewed", "identical"]


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("layout", ["prefill", "decode"])
@pytest.mark.parametrize("kind", POPULARITY)
@pytest.mark.parametrize("hidden", [64, 576])
def test_shrink_expand_match_reference(hidden, dtype, kind, layout, impl):
    segments, x, base, (a_stack, b_stack, a_list, b_list) = make_batch(kind, layout, hidden, dtype, seed=hidden)
    shrink, expand = IMPLS[impl]
    y = torch.full((segments.num_tokens, MAX_RANK), float("nan"), dtype=dtype)  # NaN = never written
    out = base.clone()
    shrink(x, a_stack, segments, SLOT_RANKS, y)
    expand(y, b_stack, segments, SLOT_RANKS, out)

    token_slots = segments.token_slots.tolist()
    expected = base.float() + ops.reference_lora(x, a_list, b_list, token_slots)
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and y.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    _check_shrink(x, y, a_list, token_slots, atol, rtol)
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base_rows], base[base_rows])  # base-only rows untouched, bit for bit


def _check_shrink(x, y, a_list, token_slots, atol, rtol):
    """Adapter rows hold x @ A.T in their first `rank` columns and NaN past it; base rows stay NaN."""
    for t, s in enumerate(token_slots):
        if s < 0:
            assert torch.isnan(y[t]).all()
            continue
        r = SLOT_RANKS[s]
        torch.testing.assert_close(y[t, :r].float(), x[t].float() @ a_list[s].float().T, atol=atol, rtol=rtol)
        assert torch.isnan(y[t, r:]).all()


def run_native(segments, x, base, a_stack, b_stack):
    y, out = torch.full((segments.num_tokens, MAX_RANK), float("nan")), base.clone()
    ops.shrink_native(x, a_stack, segments, torch.tensor(SLOT_RANKS), y)
    ops.expand_native(y, b_stack, segments, torch.tensor(SLOT_RANKS), out)
    return y, out


@pytest.mark.parametrize("kind", POPULARITY)
@pytest.mark.parametrize("hidden", [64, 576])
def test_native_multi_token_segments_are_bit_for_bit_the_segment_loop(hidden, kind):
    """A segment of several tokens goes through the BLAS routine torch's matmul calls, with the same
    arguments: the bits of the segment loop."""
    segments, x, base, (a_stack, b_stack, _, _) = make_batch(kind, "prefill", hidden, torch.float32, seed=hidden + 1)
    y_loop, out_loop = torch.full((segments.num_tokens, MAX_RANK), float("nan")), base.clone()
    ops.expand_loop(ops.shrink_loop(x, a_stack, segments, SLOT_RANKS, y_loop), b_stack, segments, SLOT_RANKS, out_loop)
    y, out = run_native(segments, x, base, a_stack, b_stack)
    rows = [t for s, e in zip(segments.starts, segments.ends) if e - s > 1 for t in range(s, e)]
    assert len(rows) > segments.num_tokens // 2
    assert torch.equal(y[rows].nan_to_num(7.0), y_loop[rows].nan_to_num(7.0)) and torch.equal(out[rows], out_loop[rows])


@pytest.mark.parametrize("kind", POPULARITY)
@pytest.mark.parametrize("hidden", [64, 72, 576])    # 72: rows and columns past the last whole 16 lanes
def test_native_one_token_rows_do_not_depend_on_the_batch(hidden, kind):
    """A one-token segment (decode) sums in a fixed order of its own: each token's bits are the ones it gets
    alone, and at one thread, whatever shares its call; and they are the product within float32 rounding."""
    segments, x, base, (a_stack, b_stack, a_list, b_list) = make_batch(kind, "decode", hidden, torch.float32, seed=hidden)
    y, out = run_native(segments, x, base, a_stack, b_stack)
    token_slots = segments.token_slots.tolist()
    expected = base + ops.reference_lora(x, a_list, b_list, token_slots)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    _check_shrink(x, y, a_list, token_slots, 1e-5, 1e-5)
    for t, slot in enumerate(token_slots):
        alone = compute_segments([slot], [1])
        y_t, out_t = run_native(alone, x[t:t + 1], base[t:t + 1], a_stack, b_stack)
        assert torch.equal(out_t[0], out[t]) and torch.equal(y_t[0].nan_to_num(7.0), y[t].nan_to_num(7.0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run_native(segments, x, base, a_stack, b_stack)[1], out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_expand_into_packed_slice_with_tensor_ranks(impl):
    """Adding into one column block of a packed q|k|v output leaves the other blocks alone
    (facade: out_slice; forced implementations: the column view the facade hands them)."""
    segments, x, _, (a_stack, b_stack, a_list, b_list) = make_batch("uniform", "decode", 64, torch.float32, 7)
    shrink, expand = IMPLS[impl]
    ranks = torch.tensor(SLOT_RANKS) if impl in ("facade", "native") else SLOT_RANKS
    packed = torch.randn(segments.num_tokens, 3 * 64, generator=torch.Generator().manual_seed(1))
    out = packed.clone()
    y = shrink(x, a_stack, segments, ranks, torch.zeros(segments.num_tokens, MAX_RANK))
    if impl == "facade":
        expand(y, b_stack, segments, ranks, out, out_slice=(64, 64))
    else:
        expand(y, b_stack, segments, ranks, out[:, 64:128])

    delta = ops.reference_lora(x, a_list, b_list, segments.token_slots.tolist())
    torch.testing.assert_close(out[:, 64:128], packed[:, 64:128] + delta, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[:, :64], packed[:, :64]) and torch.equal(out[:, 128:], packed[:, 128:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_facade_on_many_decode_segments(dtype):
    """128 decode tokens cycling over the slots (no merging): without native kernels the rule picks gather;
    the facade (native where built) stays correct."""
    gen = torch.Generator().manual_seed(3)
    seq_slots = [-1 if i % 10 == 9 else i % len(SLOT_RANKS) for i in range(128)]
    segments = compute_segments(seq_slots, [1] * 128)
    a_stack, b_stack, a_list, b_list = make_stacks(64, dtype, gen)
    assert ops.choose(segments.num_adapter_tokens, len(segments), MAX_RANK * 64, dtype) == "gather"
    x, base = torch.randn(128, 64, generator=gen).to(dtype), torch.randn(128, 64, generator=gen).to(dtype)
    out, y = base.clone(), torch.full((128, MAX_RANK), float("nan"), dtype=dtype)
    ops.lora_expand(ops.lora_shrink(x, a_stack, segments, SLOT_RANKS, y), b_stack, segments, SLOT_RANKS, out)
    expected = base.float() + ops.reference_lora(x, a_list, b_list, seq_slots)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])
    _check_shrink(x, y, a_list, seq_slots, *TOLERANCE[dtype])


def test_all_base_batch_is_a_no_op():
    segments = compute_segments([-1, -1], [3, 1])
    x, out = torch.randn(4, 64), torch.randn(4, 64)
    y = torch.full((4, MAX_RANK), float("nan"))
    a_stack, b_stack, _, _ = make_stacks(64, torch.float32, torch.Generator().manual_seed(0))
    before = out.clone()
    ops.lora_expand(ops.lora_shrink(x, a_stack, segments, SLOT_RANKS, y), b_stack, segments, SLOT_RANKS, out)
    assert torch.equal(out, before) and torch.isnan(y).all()


# (num_adapter_tokens, num_segments, weight_elems, dtype, expected) without the native kernels; rule from
# ops' measurement table.
CHOOSE_CASES = [
    (1, 1, 576 * 16, torch.float32, "loop"),  # one decode token
    (2048, 4, 576 * 16, torch.float32, "loop"),  # few long prefill segments
    (128, 128, 576 * 16, torch.float32, "gather"),  # many distinct decode tokens
    (32, 32, 576 * 16, torch.float32, "loop"),  # float32 needs >= 64 segments
    (32, 32, 576 * 16, torch.bfloat16, "gather"),  # bf16 small matmuls are slow: gather earlier
    (512, 64, 576 * 16, torch.bfloat16, "loop"),  # 8 tokens per segment
    (128, 128, 2048 * 64, torch.float32, "loop"),  # gathered weights too large
]
# (tokens per sequence, number of sequences, dtype, expected) with them: native for every float32 step.
NATIVE_CASES = [
    (1, 1, torch.float32, "native"),
    (1, 128, torch.float32, "native"),
    (512, 4, torch.float32, "native"),
    (1, 32, torch.bfloat16, "gather"),  # float32 only
    (512, 4, torch.bfloat16, "loop"),
]


@pytest.mark.parametrize("tokens,segs,elems,dtype,expected", CHOOSE_CASES)
def test_choose_table(tokens, segs, elems, dtype, expected):
    assert ops.choose(tokens, segs, elems, dtype) == expected


@pytest.mark.parametrize("tokens,seqs,dtype,expected", NATIVE_CASES)
def test_pick_with_native_kernels(tokens, seqs, dtype, expected):
    segments = compute_segments(list(range(seqs)), [tokens] * seqs)     # one slot per sequence, rank 16
    x = torch.zeros(segments.num_tokens, 576, dtype=dtype)
    assert ops._pick(segments, [16] * seqs, x, 576) == expected
