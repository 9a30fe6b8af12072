"""Per-step metadata, built once by the model runner before the forward pass; layers only read it.

Tokens of all sequences in a step are laid out flat: `[num_tokens, hidden]`. A prefill step holds
whole prompts back to back; a decode step holds one token per sequence; a mixed step (chunked prefill)
holds one token per decoding sequence first, then pieces of prompts.
"""

from dataclasses import dataclass

import torch


@dataclass
class Pieces:
    """The prompt pieces of a mixed step, after its `offset` decode rows."""
    offset: int                        # rows before the first piece (the decoding sequences' tokens)
    bounds: list[int]                  # each piece's rows, from offset: bounds[j]:bounds[j + 1]
    starts: list[int]                  # each piece's first position in its sequence
    # the KV cache rows of positions 0 .. piece end of each piece that continues a prompt (start > 0):
    # its queries attend to the cached start of the prompt and to themselves; None for a first piece
    key_rows: list[torch.Tensor | None]


@dataclass
class StepContext:
    is_prefill: bool
    positions: torch.Tensor            # [num_tokens] int64, position of each token in its sequence
    write_rows: torch.Tensor           # [num_tokens] int64, KV cache row each token's K/V is written to
    # prefill: boundaries of each sequence's tokens in the flat layout, as Python ints
    cu_seqlens: list[int] | None = None
    # decode: the KV cache rows of every position of every sequence, flattened from [batch, max_context]
    gather_rows: torch.Tensor | None = None
    # decode: the batch is sorted by context length; each group (start, end, length) is a run of sequences
    # with the same length. Attention runs per group over exactly that length, never padded: padding
    # changes rounding, so a sequence's numbers would depend on what else is in the batch.
    decode_groups: list[tuple[int, int, int]] | None = None
    # decode, for the paged kernel that reads K/V in place: each sequence's KV blocks [batch, width] int64,
    # its context length [batch] int64, and the rows per block
    block_tables: torch.Tensor | None = None
    context_lengths: torch.Tensor | None = None
    block_size: int = 0
    # rows of the hidden states whose logits are needed (the last token of each sequence)
    logits_index: torch.Tensor | None = None   # [batch] int64
    # mixed steps: the prompt pieces after the decode rows (the decode fields above cover those rows)
    pieces: Pieces | None = None
