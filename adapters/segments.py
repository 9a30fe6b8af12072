"""LoRA segments of one step: one per sequence that has an adapter, its tokens in a run.

Computed once per step by the model runner (from the batch's per-sequence slot ids and token counts) and
only read by the LoRA layers. Slot -1 means "no adapter" (base model only); such sequences are left out of
the segment lists and marked -1 in the per-token tensor.

Two sequences on one slot stay two segments even when they are adjacent: a matrix product's rounding
depends on how many rows it has (BLAS picks its blocking by shape), so a segment holding one sequence
gives that sequence the same bits whatever else is in the batch: alone, beside other adapters, or beside
copies of itself. Decode then multiplies single rows, as an unbatched forward does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE_SLOT = -1


@dataclass(frozen=True)
class Segments:
    """Adapter segments of one step. Token ranges are half-open: tokens [starts[i], ends[i]) use slots[i]."""

    starts: list[int]
    ends: list[int]
    slots: list[int]
    # [num_tokens] int64, slot id per token, -1 for base tokens; drives the gather path.
    token_slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    # [3, num_segments] int64 (starts, ends, slots) on the host: the native kernels' view of the lists.
    table: torch.Tensor = field(default_factory=lambda: torch.empty(3, 0, dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.numel())

    @property
    def num_adapter_tokens(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def __len__(self) -> int:
        return len(self.slots)


def segment_runs(seq_slots: list[int], seq_lens: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(starts, ends, slots) of the adapter runs, one per sequence; base sequences are dropped."""
    _validate(seq_slots, seq_lens)
    starts: list[int] = []
    ends: list[int] = []
    slots: list[int] = []
    pos = 0
    for slot, length in zip(seq_slots, seq_lens):
        if length and slot != BASE_SLOT:
            starts.append(pos)
            ends.append(pos + length)
            slots.append(slot)
        pos += length
    return starts, ends, slots


def compute_segments(seq_slots: list[int], seq_lens: list[int], device: torch.device | str = "cpu") -> Segments:
    """Segments of a step: seq_slots[i] is sequence i's slot (-1 = base), seq_lens[i] its token count
    (prefill: prompt length; decode: 1)."""
    starts, ends, slots = segment_runs(seq_slots, seq_lens)
    # Built on the host then copied once: one small transfer per step, not per layer.
    token_slots = torch.repeat_interleave(
        torch.tensor(seq_slots, dtype=torch.long), torch.tensor(seq_lens, dtype=torch.long)
    )
    table = torch.tensor([starts, ends, slots], dtype=torch.long).reshape(3, len(slots))
    return Segments(starts, ends, slots, token_slots.to(device), table)


def _validate(seq_slots: list[int], seq_lens: list[int]) -> None:
    if len(seq_slots) != len(seq_lens):
        raise ValueError(f"{len(seq_slots)} slot ids for {len(seq_lens)} sequence lengths")
    if any(n < 0 for n in seq_lens):
        raise ValueError(f"sequence lengths must be >= 0, got {seq_lens}")
    if any(s < BASE_SLOT for s in seq_slots):
        raise ValueError(f"slot ids must be >= -1, got {seq_slots}")
