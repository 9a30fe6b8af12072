"""The screened greedy choice equals the argmax of the full float32 logits (the oracle: torch's own
float32 matmul over the whole vocabulary), on the embedded model's real output weights, with either screen:
torch's bfloat16 matmul or our native kernel (what CPUs without AVX512-BF16 use)."""

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters import native
from loraplex.server.engine.runner import _runs
from loraplex.server.model.lm_head import SLACK, OutputHead


@pytest.fixture(scope="module", params=["torch", "tiles"])
def head(embedded_dir, request):
    if request.param == "tiles" and not native.available():
        pytest.skip("native kernels unavailable")
    weight = load_file(str(embedded_dir / "model.safetensors"))["model.embed_tokens.weight"]
    return OutputHead(weight, tiles=request.param == "tiles")


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_screened_greedy_equals_full_argmax(head, scale):
    hidden = torch.randn(64, head.weight.shape[1], generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    assert head.greedy(hidden) == head.logits(hidden).argmax(-1).tolist()


def test_near_ties_resolve_like_argmax(head):
    # hidden states that make two tokens' logits nearly equal: the mean of their rows
    w = head.weight
    hidden = torch.stack([(w[a] + w[b]) * 3 for a, b in [(10, 20), (500, 7), (1234, 4321), (2, 3)]])
    assert head.greedy(hidden) == head.logits(hidden).argmax(-1).tolist()


def test_banned_tokens_are_never_chosen(head):
    hidden = torch.randn(8, head.weight.shape[1], generator=torch.Generator().manual_seed(3)) * 2
    first = head.logits(hidden).argmax(-1).tolist()
    banned = [(t,) for t in first]
    logits = head.logits(hidden)
    for i, t in enumerate(first):
        logits[i, t] = float("-inf")
    assert head.greedy(hidden, banned) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("lengths, runs", [
    ([5], [(0, 1, 5)]),
    ([3, 3, 3], [(0, 3, 3)]),
    ([1, 2, 2, 7], [(0, 1, 1), (1, 3, 2), (3, 4, 7)]),
])
def test_runs_of_equal_lengths(lengths, runs):
    assert _runs(lengths) == runs


def test_native_candidates_are_the_torch_expressions(head, monkeypatch):
    """The native candidate choice (greedy_screen_cpu.cpp) keeps exactly the tokens the torch expression
    keeps, banned tokens included."""
    if not native.available():
        pytest.skip("native kernels unavailable")
    hidden = torch.randn(24, head.weight.shape[1], generator=torch.Generator().manual_seed(9)) * 2
    scores = head._screen_scores(hidden)
    scores[3, :100] = float("-inf")
    norms = hidden.norm(dim=1)
    tokens, counts = torch.ops.loraplex.screen_candidates(scores, norms, head.row_norms, SLACK)
    slack = SLACK * norms.unsqueeze(1) * head.row_norms
    keep = scores + slack >= (scores - slack).amax(dim=-1, keepdim=True)
    assert torch.equal(counts, keep.sum(dim=1)) and torch.equal(tokens, keep.nonzero()[:, 1])
    assert counts.min() >= 1 and not (tokens[counts[:3].sum():counts[:4].sum()] < 100).any()
    monkeypatch.setattr(native, "available", lambda: False)       # the fallback: the torch expression itself
    fallback = head._candidates(scores, norms)
    assert torch.equal(fallback[0], tokens) and torch.equal(fallback[1], counts)
