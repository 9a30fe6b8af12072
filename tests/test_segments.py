"""Table tests for the per-step LoRA segment computation."""

import pytest
import torch

from loraplex.adapters.segments import compute_segments, segment_runs

# (name, seq_slots, seq_lens, starts, ends, slots, token_slots)
CASES = [
    ("empty batch", [], [], [], [], [], []),
    ("all base", [-1, -1], [2, 1], [], [], [], [-1, -1, -1]),
    ("one adapter decode", [3], [1], [0], [1], [3], [3]),
    ("one adapter prefill", [0], [4], [0], [4], [0], [0, 0, 0, 0]),
    ("alternating decode", [0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 0, 1], [0, 1, 0, 1]),
    ("one segment per sequence", [2, 2, 5], [1, 1, 1], [0, 1, 2], [1, 2, 3], [2, 2, 5], [2, 2, 5]),
    ("adjacent prefills stay apart", [2, 2], [3, 2], [0, 3], [3, 5], [2, 2], [2, 2, 2, 2, 2]),
    ("base splits equal slots", [2, -1, 2], [1, 1, 1], [0, 2], [1, 3], [2, 2], [2, -1, 2]),
    ("prefill lengths", [1, -1, 0, 0], [3, 2, 1, 4], [0, 5, 6], [3, 6, 10], [1, 0, 0],
     [1, 1, 1, -1, -1, 0, 0, 0, 0, 0]),
    ("zero-length sequence is skipped", [1, 4, 1], [2, 0, 1], [0, 2], [2, 3], [1, 1], [1, 1, 1]),
]


@pytest.mark.parametrize("name,seq_slots,seq_lens,starts,ends,slots,token_slots", CASES, ids=[c[0] for c in CASES])
def test_segments_table(name, seq_slots, seq_lens, starts, ends, slots, token_slots):
    seg = compute_segments(seq_slots, seq_lens)
    assert (seg.starts, seg.ends, seg.slots) == (starts, ends, slots)
    assert seg.token_slots.dtype == torch.long
    assert seg.token_slots.tolist() == token_slots
    assert seg.num_tokens == sum(seq_lens)
    assert seg.num_adapter_tokens == sum(e - s for s, e in zip(starts, ends))
    assert all(isinstance(v, int) for v in seg.starts + seg.ends + seg.slots)


@pytest.mark.parametrize("seq_slots,seq_lens", [([0, 1], [1]), ([0], [-1]), ([-2], [1])],
                         ids=["length mismatch", "negative length", "bad slot"])
def test_segments_reject_bad_input(seq_slots, seq_lens):
    with pytest.raises(ValueError):
        segment_runs(seq_slots, seq_lens)
