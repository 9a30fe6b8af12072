"""Segmented LoRA ops: the one facade the LoRA layers call (shrink to rank r, then expand back).

A step's tokens are split into `Segments` (see `segments.py`): runs of consecutive tokens on one adapter
slot. Per layer the adapters live in preallocated stacked buffers, one row per device slot:
`a_stack [num_slots, max_rank, in]` and `b_stack [num_slots, out, max_rank]` (alpha/r already folded into B).
A slot's live rank `ranks[s]` may be below `max_rank`; rows/columns beyond it are unused and may hold stale
finite values, so no implementation reads them into a result.

Four implementations, picked per call by `_pick` (callers never pick):
- "triton": the kernels of `triton_ops.py`, for CUDA tensors when triton is installed (one launch per op,
            one program per token and output block).
            `lora_apply` does a whole packed module (q|k|v: shrink and expand of each target) in one
            launch of `triton_ops.fused` for decode-sized steps; the CUDA LoRA layers (fused_layer.py) use it.
- "native": the segment loop in C++ (`csrc/lora_cpu.cpp`, built by `native.py`): one call per op for all
            segments. A multi-token segment goes through the same BLAS call as torch's matmul (bit for bit
            the loop's); a one-token segment (decode) through a product with one vector summed in a fixed
            order (`csrc/lora_token_cpu.cpp`: the bits depend on that token's row alone, not the BLAS's).
            Taken for float32 on the CPU whenever it is built; the only one that reads slots kept in 16 bits
            (`stored`, see slots.py), widening them inside the call.
- "loop":   one matmul per segment with that slot's own rank; no padding at all.
- "gather": gather per-token A/B (padded only to the largest rank among the slots present in the step,
            masked to each token's rank), then one batched matmul. Wins when there are many tiny segments.

Measurement behind `choose`: one shrink + expand, best of 10-15 runs, microseconds, on a 2-core AMD EPYC
CPU, torch 2.13 CPU build (shared machine, so single numbers are noisy; the crossovers were stable).
Segments of `tok/seg` tokens each on distinct slots.

  hidden 576, ranks {8,16}   float32 loop / gather     bfloat16 loop / gather
  segs x tok/seg
    1 x 1                        18 /   154                92 /   330
    1 x 32                       65 /  1078                96 /   613
    4 x 1                        83 /   232               312 /   307
   16 x 1                       328 /   478              1048 /   448
   16 x 2                         -                      1297 /   595
   16 x 8                         -                      1320 /  1474
   32 x 1                       637 /   651                 -
   64 x 1                      1297 /  1108              4913 /   877
   64 x 2                      2121 /  2091              5440 /  1638
   64 x 32                     4409 / 69435              6253 / 34734
  128 x 1                      2770 /  2019             12754 /  1670
  hidden 2048, rank 64 (1 token per segment)
   16 x 1                      1098 / 10982              1058 /  1518
   64 x 1                      4610 / 83680              5024 /  6003
  256 x 1                     18224 /131889             20839 / 62894

Reading: per-segment matmuls cost ~20 us (float32) / ~80 us (bfloat16, small-M bf16 matmul on CPU is slow)
each, while gather pays for copying num_tokens * rank * features weight elements. Hence: gather only for
short segments (<= 2 tokens, i.e. decode) whose gathered weights stay under ~1.5M elements, and only from
64 segments (float32) / 16 segments (bfloat16). Measured on CPU only; a GPU needs its own table.

The native loop, same machine (a later run with other work on it, float32, hidden 576, ranks {8,16}, best
of 15, microseconds): the per-segment matmuls without a Python turn each, which is why it is always taken.

  segs x tok/seg    native    loop
    1 x 1              7        15
    1 x 32            37        42
    4 x 1             12        65
   16 x 1             21       260
   16 x 8            214       467
   64 x 1             61      1136
"""

from __future__ import annotations

import torch

from loraplex.adapters import native
from loraplex.adapters.segments import Segments

Ranks = list[int] | torch.Tensor  # per-slot live rank: python ints or LongTensor [num_slots]

# Rule constants, from the table above.
GATHER_MIN_SEGMENTS = {torch.float32: 64, torch.bfloat16: 16}
GATHER_MAX_TOKENS_PER_SEGMENT = 2
GATHER_MAX_ELEMS = 1_500_000


NATIVE_DTYPES = (torch.float32,)


def choose(num_tokens: int, num_segments: int, weight_elems: int, dtype: torch.dtype) -> str:
    """The rule where neither Triton nor the native loop applies: "gather" for many tiny segments whose
    gathered weights stay small; else "loop".

    weight_elems: elements of one slot's matrix as the op reads it (present max rank * features); the
    gather path copies num_tokens of them.
    """
    if num_segments < GATHER_MIN_SEGMENTS.get(dtype, GATHER_MIN_SEGMENTS[torch.float32]):
        return "loop"
    if num_tokens > GATHER_MAX_TOKENS_PER_SEGMENT * num_segments:
        return "loop"
    return "gather" if num_tokens * weight_elems <= GATHER_MAX_ELEMS else "loop"


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, segments: Segments, ranks: Ranks,
                out: torch.Tensor, stored: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: out[s_i:e_i, :r] = x[s_i:e_i] @ a_stack[slot_i, :r].T with r = ranks[slot_i], per segment i.

    x:       [num_tokens, in], float32 or bfloat16.
    a_stack: [num_slots, max_rank, in], same dtype as x.
    ranks:   list[int] or LongTensor [num_slots], each slot's live rank (<= max_rank).
    out:     [num_tokens, max_rank], x's dtype; WRITTEN IN PLACE, only the adapter rows and only the
             first ranks[slot] columns of each; base-only rows are untouched. Returned for chaining.
    stored:  LongTensor [num_slots] or None: slots whose factors are kept in 16 bits (SlotBuffers.stored).
    """
    if not len(segments):
        return out
    impl = _pick(segments, ranks, x, x.shape[1])
    if impl == "triton":
        return _triton().shrink(x, a_stack, segments.token_slots, _as_tensor(ranks, x.device), out)
    if impl == "native":
        return shrink_native(x, a_stack, segments, ranks, out, stored)
    _refuse_16bit(stored, impl)
    ranks = _as_list(ranks)
    return (shrink_gather if impl == "gather" else shrink_loop)(x, a_stack, segments, ranks, out)


def lora_expand(y: torch.Tensor, b_stack: torch.Tensor, segments: Segments, ranks: Ranks, out: torch.Tensor,
                out_slice: tuple[int, int] | None = None, stored: torch.Tensor | None = None,
                b_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: out[s_i:e_i, o:o+n] += y[s_i:e_i, :r] @ b_stack[slot_i, :, :r].T with r = ranks[slot_i].

    y:         [num_tokens, max_rank] (from lora_shrink), same dtype as b_stack.
    b_stack:   [num_slots, n, max_rank], alpha/r folded in.
    ranks:     list[int] or LongTensor [num_slots].
    out:       [num_tokens, out_features], y's dtype; WRITTEN IN PLACE by addition, adapter rows only.
    out_slice: (o, n) to add into columns o:o+n of a packed output (q|k|v); default all n = out_features.
    stored, b_scale: [num_slots] each or None: 16-bit slots and the scaling not folded into their b.
    """
    if not len(segments):
        return out
    target = out if out_slice is None else out[:, out_slice[0]:out_slice[0] + out_slice[1]]
    impl = _pick(segments, ranks, y, b_stack.shape[1])
    if impl == "triton":
        _triton().expand(y, b_stack, segments.token_slots, _as_tensor(ranks, y.device), target)
    elif impl == "native":
        expand_native(y, b_stack, segments, ranks, target, stored, b_scale)
    else:
        _refuse_16bit(stored, impl)
        ranks = _as_list(ranks)
        (expand_gather if impl == "gather" else expand_loop)(y, b_stack, segments, ranks, target)
    return out


# Above this many tokens in a step (long prefills) the fused kernel's repeated shrink per output block costs
# more than a second launch: lora_apply takes the two kernels per target instead.
FUSED_MAX_TOKENS = 256


def lora_apply(x: torch.Tensor, targets: list, segments: Segments, out: torch.Tensor, fused=None,
               storage: list | None = None) -> torch.Tensor:
    """Semantics: for each (a_stack, b_stack, ranks, offset, n) in targets, lora_shrink then lora_expand into
    out[:, offset:offset + n]; all targets read the same x (the slices of one packed module, q|k|v).

    fused: `triton_ops.fused_args(targets)`, computed once per layer; when given, x is on CUDA and the step
    is short, one launch does every target's shrink and expand (the shrink rounded to x's dtype in between,
    as `out` of lora_shrink is). On the CPU with the native kernels, one call does every target (the same
    arithmetic as the two ops per target, one parallel region). Otherwise two ops per target with a shrink
    buffer in x's dtype. storage: (stored, b_scale) per target (SlotBuffers), or None for float32 slots.
    """
    if not len(segments):
        return out
    if fused is not None and x.is_cuda and x.shape[0] <= FUSED_MAX_TOKENS:
        _triton().fused(x, fused, segments.token_slots, out)
        return out
    if _pick(segments, targets[0][2], x, x.shape[1]) == "native":
        stored, scales = ([s for s, _ in storage], [b for _, b in storage]) if storage else ([], [])
        torch.ops.loraplex.lora_apply(x, [t[0] for t in targets], [t[1] for t in targets],
                                      [_as_tensor(t[2]) for t in targets], [t[3] for t in targets], segments.table,
                                      out, stored, scales)
        return out
    storage = storage or [(None, None)] * len(targets)
    shrunk = x.new_zeros(x.shape[0], max(a.shape[1] for a, *_ in targets))   # [num_tokens, max_rank]
    for (a, b, ranks, offset, size), (stored, b_scale) in zip(targets, storage):
        lora_shrink(x, a, segments, ranks, shrunk[:, :a.shape[1]], stored)
        lora_expand(shrunk[:, :a.shape[1]], b, segments, ranks, out, (offset, size), stored, b_scale)
    return out


def _pick(segments: Segments, ranks: Ranks, x: torch.Tensor, features: int) -> str:
    """"triton" on CUDA when installed; "native" (when built, on the CPU) for float32; else `choose`."""
    if x.is_cuda and _triton().available():
        return "triton"
    if x.device.type == "cpu" and native.available() and x.dtype in NATIVE_DTYPES:
        return "native"  # before `choose`, which needs a host pass over the ranks for `elems`
    elems = _present_rank(segments, _as_list(ranks)) * features
    return choose(segments.num_adapter_tokens, len(segments), elems, x.dtype)


def shrink_native(x, a_stack, segments: Segments, ranks: Ranks, out, stored=None):
    """One kernel call for all segments (CPU, float32); base rows and columns past each rank are untouched."""
    torch.ops.loraplex.lora_shrink(x, a_stack, segments.table, _as_tensor(ranks), out, stored)
    return out


def expand_native(y, b_stack, segments: Segments, ranks: Ranks, out, stored=None, b_scale=None):
    torch.ops.loraplex.lora_expand(y, b_stack, segments.table, _as_tensor(ranks), out, stored, b_scale)
    return out


def _refuse_16bit(stored: torch.Tensor | None, impl: str) -> None:
    """Only the native kernels widen slots kept in 16 bits; SlotBuffers keeps them only where those run."""
    if stored is not None and bool(stored.any()):
        raise RuntimeError(f"slots kept in 16 bits need the native CPU kernels, not {impl!r}")


def shrink_loop(x, a_stack, segments: Segments, ranks: list[int], out):
    """Segment loop: each segment multiplies by its own slot's rank rows only (no padding)."""
    for start, end, slot in zip(segments.starts, segments.ends, segments.slots):
        r = ranks[slot]
        out[start:end, :r] = x[start:end] @ a_stack[slot, :r].T  # [len, r]
    return out


def expand_loop(y, b_stack, segments: Segments, ranks: list[int], out):
    """Segment loop; `out` is the (possibly column-sliced) target view."""
    for start, end, slot in zip(segments.starts, segments.ends, segments.slots):
        r = ranks[slot]
        out[start:end] += y[start:end, :r] @ b_stack[slot, :, :r].T  # [len, n]
    return out


def shrink_gather(x, a_stack, segments: Segments, ranks: list[int], out):
    """Per-token gather of A padded to the largest present rank, one bmm, masked write-back."""
    rows, tok_slots, live = _adapter_tokens(segments, ranks, x.device)
    r = _present_rank(segments, ranks)
    a = a_stack[tok_slots, :r]  # [n, r, in]
    y = torch.bmm(a, x[rows].unsqueeze(-1)).squeeze(-1)  # [n, r]
    # Columns at or past a token's own rank keep their old value (the op writes only :ranks[slot]).
    out[rows, :r] = torch.where(live[:, :r], y, out[rows, :r])
    return out


def expand_gather(y, b_stack, segments: Segments, ranks: list[int], out):
    """Per-token gather of B padded to the largest present rank; y is zero-masked past each token's rank,
    so stale (finite) columns of y or B add exactly zero."""
    rows, tok_slots, live = _adapter_tokens(segments, ranks, y.device)
    r = _present_rank(segments, ranks)
    b = b_stack[tok_slots, :, :r]  # [n, out, r]
    y_live = torch.where(live[:, :r], y[rows, :r], torch.zeros((), dtype=y.dtype, device=y.device))
    out[rows] += torch.bmm(b, y_live.unsqueeze(-1)).squeeze(-1)  # [n, out]
    return out


def reference_lora(x: torch.Tensor, a_list: list[torch.Tensor], b_list: list[torch.Tensor],
                   token_adapter: list[int]) -> torch.Tensor:
    """Test oracle: delta[t] = (x[t] @ A_k.T) @ B_k.T with k = token_adapter[t] (-1: zero), in float32.

    x: [num_tokens, in]; a_list[k]: [r_k, in]; b_list[k]: [out, r_k] (scale folded).
    Returns the delta [num_tokens, out] in float32 (callers round to their dtype).
    """
    out_features = b_list[0].shape[0] if b_list else 0
    delta = torch.zeros(x.shape[0], out_features, dtype=torch.float32)
    for t, k in enumerate(token_adapter):
        if k >= 0:
            a, b = a_list[k].float(), b_list[k].float()
            delta[t] = (x[t].float() @ a.T) @ b.T
    return delta


def _triton():
    """Imported on first CUDA use only: triton is optional, and TRITON_INTERPRET is read when it loads."""
    from loraplex.adapters import triton_ops
    return triton_ops


def _as_tensor(ranks: Ranks, device: torch.device | str = "cpu") -> torch.Tensor:
    if isinstance(ranks, torch.Tensor):
        return ranks.to(device, non_blocking=True)      # the tensor itself when it is there already
    return torch.tensor(ranks, dtype=torch.long, device=device)


def _as_list(ranks: Ranks) -> list[int]:
    # One host copy per op call; the loop needs python ints for slicing anyway.
    return ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)


def _present_rank(segments: Segments, ranks: list[int]) -> int:
    """Largest rank among the slots present in this step (the gather path pads only to this)."""
    return max((ranks[s] for s in set(segments.slots)), default=0)


def _adapter_tokens(segments: Segments, ranks: list[int], device):
    """(rows [n] token indices with an adapter, their slots [n], live mask [n, max_rank] of rank columns)."""
    token_slots = segments.token_slots.to(device)
    rows = torch.nonzero(token_slots >= 0).squeeze(1)
    tok_slots = token_slots[rows]
    tok_rank = torch.tensor(ranks, dtype=torch.long, device=device)[tok_slots]  # [n]
    cols = torch.arange(max(ranks, default=0), device=device)
    return rows, tok_slots, cols[None, :] < tok_rank[:, None]
