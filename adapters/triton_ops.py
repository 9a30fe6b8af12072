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


def available() -> bool:
    return triton is not None


if triton is not None:

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
            acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, in_features, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                in_bounds = cols < in_features
                x = tl.load(x_ptr + token * stride_x + cols, mask=in_bounds, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + slot * stride_a_slot + rows[:, None] * stride_a_rank + cols[None, :],
                            mask=live[:, None] & in_bounds[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
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
