"""Stop sequences and min_new_tokens together, checked against a plain reference written from the rule:

  a stop sequence counts only when a token at or past the min_new_tokens-th completes it; the first one
  that counts ends the answer (of those completed by the same token, the earliest start, then the shortest), and the answer is
  the text before it, or through it with include_stop_sequence; stops completed earlier stay in the text.

The reference looks at whole texts (the decode of the first k tokens) and knows nothing of hold-back or
incremental decoding; the tracker and the engine must agree with it on every case.
"""

import random

import pytest

from loraplex.server.engine.stopping import TextTracker


def reference(texts: list[str], stops: list[str], include: bool, min_new: int) -> tuple[str, str | None, int]:
    """texts[k-1]: the decode of the first k tokens. Returns (answer text, stop or None, tokens used)."""
    for k in range(max(min_new, 1), len(texts) + 1):
        before, now = (texts[k - 2] if k >= 2 else ""), texts[k - 1]
        completed = [(i, stop) for stop in stops for i in _occurrences(now, stop) if i + len(stop) > len(before)]
        if completed:
            i, stop = min(completed, key=lambda c: (c[0], len(c[1])))
            return now[:i + len(stop)] if include else now[:i], stop, k
    return texts[-1], None, len(texts)


def _occurrences(text: str, stop: str) -> list[int]:
    return [i for i in range(len(text) - len(stop) + 1) if text.startswith(stop, i)]


def tracked(pieces: list[str], stops: list[str], include: bool, min_new: int) -> tuple[str, str | None, int]:
    """What the engine does with each token: update (stops checked from min_new on), flush at the end."""
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), stops, include)
    emitted, ids = "", []
    for k in range(1, len(pieces) + 1):
        ids.append(k - 1)
        chunk, stop = tracker.update(ids, check_stops=k >= min_new)
        emitted += chunk
        if stop is not None:
            return emitted, stop, k
    return emitted + tracker.flush(), None, len(pieces)


def cumulative(pieces: list[str]) -> list[str]:
    return ["".join(pieces[:k]) for k in range(1, len(pieces) + 1)]


@pytest.mark.parametrize("pieces, stops, include, min_new, expected", [
    # a stop before the minimum stays in the text, generation goes on to the next one
    (["a", ".", "b", ".", "c"], ["."], False, 3, ("a.b", ".", 4)),
    (["a", ".", "b", ".", "c"], ["."], True, 3, ("a.b.", ".", 4)),
    # no stop after the minimum: everything, no stop reason
    (["a", ".", "b"], ["."], False, 3, ("a.b", None, 3)),
    # the min-th token itself completes a stop: it counts
    (["x", "y", "END"], ["END"], False, 3, ("xy", "END", 3)),
    # begun before the minimum, completed after it: it counts, cut where it began
    (["x", "EN", "D", "z"], ["END"], False, 3, ("x", "END", 3)),
    (["x", "EN", "D", "z"], ["END"], True, 3, ("xEND", "END", 3)),
    # completed before the minimum, then again later
    (["EN", "D", "q", "END", "r"], ["END"], False, 3, ("ENDq", "END", 4)),
    # two stops completed by one token: the earliest start wins
    (["k", "abcd"], ["cd", "bc"], False, 0, ("ka", "bc", 2)),
    # min_new_tokens 0 and 1 behave alike
    ([".", "a"], ["."], False, 0, ("", ".", 1)),
    ([".", "a"], ["."], False, 1, ("", ".", 1)),
])
def test_table(pieces, stops, include, min_new, expected):
    assert reference(cumulative(pieces), stops, include, min_new) == expected
    assert tracked(pieces, stops, include, min_new) == expected


def test_random_cases_agree_with_the_reference():
    rng = random.Random(7)
    alphabet = ["a", "b", "ab", "ba", "c", "abc", ".", "\n", "a."]
    for case in range(3000):
        pieces = [rng.choice(alphabet) for _ in range(rng.randint(1, 12))]
        stops = list({"".join(rng.choice("abc.\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        include, min_new = rng.random() < 0.5, rng.randint(0, len(pieces))
        want = reference(cumulative(pieces), stops, include, min_new)
        assert tracked(pieces, stops, include, min_new) == want, (case, pieces, stops, include, min_new)
