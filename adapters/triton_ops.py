"""Triton kernels for the segmented LoRA ops on CUDA, with the semantics of `ops.lora_shrink` and
`ops.lora_expand` (the facade picks them; callers never do).

One program per (token, block of output columns), driven by the per-token slot ids of the step (the
segments' `token_slots`): a token reads only its own slot's live rows, so adapters of any rank mix in one
launch without padding to the largest rank, and base-only tokens (slot -1) return at once. Accumulation is
in float32 whatever the input dtype. On the CPU the same kernels run under TRITON_INTERPRET=1, which is how
the tests check them against the torch reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

BLOCK_IN = 64      # input features per inner-loop step of the shrink
BLOCK_OUT = 64     # output columns per expand program
FUSED_BLOCK_OUT = BLOCK_OUT   # output columns per fused program (each recomputes its token's shrink); the
                              # expand's own tile shape, so both paths sum in the same order
FUSED_MAX_TARGETS = 3   # q|k|v


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _shrink_row(x_ptr, a_ptr, token, slot, live, in_features, stride_x, stride_a_slot, stride_a_rank,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """A[slot, :r] @ x[token] in float32 ([BLOCK_R], zero past the rank), BLOCK_K inputs at a time."""
        rows = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_bounds = cols < in_features
            x = tl.load(x_ptr + token * stride_x + cols, mask=in_bounds, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_a_slot + rows[:, None] * stride_a_rank + cols[None, :],
                        mask=live[:, None] & in_bounds[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        return acc

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, slots_ptr, ranks_ptr, out_ptr, in_features, stride_x, stride_out,
                       stride_a_slot, stride_a_rank, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token)
        if slot >= 0:
            rank = tl.load(ranks_ptr + slot)
            rows = tl.arange(0, BLOCK_R)
            live = rows < rank
            acc = _shrink_row(x_ptr, a_ptr, token, slot, live, in_features, stride_x, stride_a_slot,
                              stride_a_rank, BLOCK_R, BLOCK_K)
            tl.store(out_ptr + token * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _expand_kernel(y_ptr, b_ptr, slots_ptr, ranks_ptr, out_ptr, out_features, stride_y, stride_out,
                       stride_b_slot, stride_b_row, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        token = tl.program_id(0)
        block = tl.program_id(1)
        slot = tl.load(slots_ptr + token)
        if slot >= 0:
            rank = tl.load(ranks_ptr + slot)
            ks = tl.arange(0, BLOCK_R)
            live = ks < rank
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            in_bounds = cols < out_features
            y = tl.load(y_ptr + token * stride_y + ks, mask=live, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + slot * stride_b_slot + cols[:, None] * stride_b_row + ks[None, :],
                        mask=in_bounds[:, None] & live[None, :], other=0.0).to(tl.float32)
            delta = tl.sum(b * y[None, :], axis=1)
            dst = out_ptr + token * stride_out + cols
            old = tl.load(dst, mask=in_bounds, other=0.0).to(tl.float32)
            tl.store(dst, (old + delta).to(out_ptr.dtype.element_ty), mask=in_bounds)


    @triton.jit
    def _fused_block(x_ptr, out_ptr, token, slot, block, in_features, stride_x, stride_out, stride_a_slot,
                     stride_a_rank, stride_b_row, a_ptr, b_ptr, ranks_ptr, offset, n, stride_b_slot,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[token, offset + block cols] += B[slot, cols, :r] @ round(A[slot, :r] @ x[token])."""
        rank = tl.load(ranks_ptr + slot)
        if rank > 0:
            rows = tl.arange(0, BLOCK_R)
            live = rows < rank
            acc = _shrink_row(x_ptr, a_ptr, token, slot, live, in_features, stride_x, stride_a_slot,
                              stride_a_rank, BLOCK_R, BLOCK_K)       # the same sum as _shrink_kernel's
            # rounded to the compute dtype, as the two-kernel path stores it between its kernels
            y = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            in_bounds = cols < n
            b = tl.load(b_ptr + slot * stride_b_slot + cols[:, None] * stride_b_row + rows[None, :],
                        mask=in_bounds[:, None] & live[None, :], other=0.0).to(tl.float32)
            delta = tl.sum(b * y[None, :], axis=1)
            dst = out_ptr + token * stride_out + offset + cols
            old = tl.load(dst, mask=in_bounds, other=0.0).to(tl.float32)
            tl.store(dst, (old + delta).to(out_ptr.dtype.element_ty), mask=in_bounds)

    @triton.jit
    def _fused_kernel(x_ptr, out_ptr, slots_ptr, in_features, stride_x, stride_out, stride_a_slot, stride_a_rank,
                      stride_b_row,
                      a0, b0, r0, off0, n0, sb0, nb0,
                      a1, b1, r1, off1, n1, sb1, nb1,
                      a2, b2, r2, off2, n2, sb2,
                      NUM_TARGETS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """Grid (token, output block over all targets): target 0's blocks, then target 1's, then 2's."""
        token = tl.program_id(0)
        block = tl.program_id(1)
        slot = tl.load(slots_ptr + token)
        if slot >= 0:
            if block < nb0:
                _fused_block(x_ptr, out_ptr, token, slot, block, in_features, stride_x, stride_out, stride_a_slot,
                             stride_a_rank, stride_b_row, a0, b0, r0, off0, n0, sb0, BLOCK_R, BLOCK_K, BLOCK_N)
            else:
                if NUM_TARGETS > 1:
                    if block < nb0 + nb1:
                        _fused_block(x_ptr, out_ptr, token, slot, block - nb0, in_features, stride_x, stride_out,
                                     stride_a_slot, stride_a_rank, stride_b_row, a1, b1, r1, off1, n1, sb1,
                                     BLOCK_R, BLOCK_K, BLOCK_N)
                    else:
                        if NUM_TARGETS > 2:
                            _fused_block(x_ptr, out_ptr, token, slot, block - nb0 - nb1, in_features, stride_x,
                                         stride_out, stride_a_slot, stride_a_rank, stride_b_row, a2, b2, r2, off2,
                                         n2, sb2, BLOCK_R, BLOCK_K, BLOCK_N)


def fused_args(targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]) -> tuple | None:
    """The fused kernel's per-module arguments, computed once per layer: targets are (a [slots, max_rank, in],
    b [slots, n, max_rank], ranks [slots], output offset, n) sharing one input. None when they cannot share
    one launch (more than FUSED_MAX_TARGETS, or differing A layouts / B row strides)."""
    if not 0 < len(targets) <= FUSED_MAX_TARGETS:
        return None
    a0, b0 = targets[0][0], targets[0][1]
    if any(a.stride() != a0.stride() or a.shape != a0.shape or b.stride(1) != b0.stride(1) or b.shape[2] != b0.shape[2]
           or a.stride(-1) != 1 or b.stride(-1) != 1 or ranks.stride(-1) != 1 for a, b, ranks, _, _ in targets):
        return None
    per_target, blocks = [], 0
    for i, (a, b, ranks, offset, n) in enumerate(targets):
        nb = triton.cdiv(n, FUSED_BLOCK_OUT)
        per_target += [a, b, ranks, offset, n, b.stride(0)] + ([nb] if i < 2 else [])
        blocks += nb
    for i in range(len(targets), FUSED_MAX_TARGETS):   # unused slots of the signature: pruned at compile time
        per_target += [a0, b0, targets[0][2], 0, 0, 0] + ([0] if i < 2 else [])
    max_rank = a0.shape[1]
    head = (a0.shape[2], a0.stride(0), a0.stride(1), b0.stride(1))
    meta = dict(NUM_TARGETS=len(targets), BLOCK_R=triton.next_power_of_2(max_rank), BLOCK_K=BLOCK_IN,
                BLOCK_N=FUSED_BLOCK_OUT)
    return head, tuple(per_target), blocks, meta


def fused(x: torch.Tensor, args: tuple, token_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[t, o_i:o_i+n_i] += (x[t] @ a_i[s, :r].T) @ b_i[s, :, :r].T for every target i of `args` (from
    fused_args) and token t with slot s >= 0, r = ranks_i[s]: shrink and expand of up to three targets of
    one packed module in one launch. The shrink is rounded to x's dtype before the expand, as the two-kernel
    path does, so both give the same bits."""
    (in_features, stride_a_slot, stride_a_rank, stride_b_row), per_target, blocks, meta = args
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the LoRA kernels need contiguous rows (last stride 1)")
    _fused_kernel[(x.shape[0], blocks)](x, out, token_slots, in_features, x.stride(0), out.stride(0), stride_a_slot,
                                        stride_a_rank, stride_b_row, *per_target, **meta)
    return out


def shrink(x: torch.Tensor, a_stack: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """out[t, :r] = a_stack[s, :r] @ x[t] for each token t with slot s = token_slots[t] >= 0, r = ranks[s]."""
    _check(x, a_stack, out)
    max_rank = a_stack.shape[1]
    block_r = triton.next_power_of_2(max_rank)
    _shrink_kernel[(x.shape[0],)](x, a_stack, token_slots, ranks, out, x.shape[1], x.stride(0), out.stride(0),
                                  a_stack.stride(0), a_stack.stride(1), BLOCK_R=block_r,
                                  BLOCK_K=BLOCK_IN)
    return out


def expand(y: torch.Tensor, b_stack: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """out[t, :] += y[t, :r] @ b_stack[s, :, :r].T for each token t with slot s >= 0 (out may be a column view)."""
    _check(y, b_stack, out)
    n, max_rank = b_stack.shape[1], b_stack.shape[2]
    grid = (y.shape[0], triton.cdiv(n, BLOCK_OUT))
    _expand_kernel[grid](y, b_stack, token_slots, ranks, out, n, y.stride(0), out.stride(0), b_stack.stride(0),
                         b_stack.stride(1), BLOCK_R=triton.next_power_of_2(max_rank), BLOCK_N=BLOCK_OUT)
    return out


def _check(x: torch.Tensor, stack: torch.Tensor, out: torch.Tensor) -> None:
    if x.stride(-1) != 1 or out.stride(-1) != 1 or stack.stride(-1) != 1:
        raise ValueError("the LoRA kernels need contiguous rows (last stride 1)")
