"""Linears whose every output row has the same bits however many rows share the call.

A matrix product's rounding depends on how many rows it has: bitsandbytes' 4-bit linear on the CPU takes a
4-bit matrix-vector kernel for one row and dequantize + float32 GEMM for more, and the GEMM rounds a row
differently in a full tile of 4 rows than in a shorter tail. Measured on a 2-core AMD EPYC (bitsandbytes
0.50, torch 2.13, SmolLM2's qkv/gate_up/down shapes): every row of a 2- to 40-row call differed in its
last bits from the row alone; with the rows zero-padded to a multiple of 4, no row differed in any of 19
batch sizes from 4 to 300. So a token's numbers, and with them a greedy answer, no longer depend on what
else is in its step. The price is a single decoding sequence paying for 4 rows (about 1.4x on these
shapes); from 4 sequences on, at most 3 padded rows. A module whose rows are its own by construction
(`row_invariant`, our NF4 kernel's: every output one fixed sequence of sums) is called unpadded.
"""

import torch
from torch import nn

ROW_MULTIPLE = 4


class RowPadded(nn.Module):
    """Wraps a linear; x: [num_tokens, in] -> [num_tokens, out], computed on rows padded with zeros."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.pads = not row_invariant(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        pad = -n % ROW_MULTIPLE if self.pads else 0
        if pad == 0:
            return self.inner(x)
        padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        return self.inner(padded)[:n]


def row_invariant(module: nn.Module) -> bool:
    """Whether each output row of `module` (or of every part of a stacked one) has the same bits in any
    batch without padding."""
    parts = getattr(module, "parts", None)
    if parts is not None:
        return all(row_invariant(part) for part in parts)
    return getattr(module, "row_invariant", False)
