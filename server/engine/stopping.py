"""Turning output tokens into text as they come, and finding stop sequences in it.

Text is emitted only once it can no longer change: an incomplete UTF-8 character (decoded as U+FFFD)
and any tail that could still grow into a stop sequence are held back until the next token decides.
"""

from typing import Callable, Sequence as Seq

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Seq[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop sequence in text that ends after `start`: (index where it begins, the sequence);
    of two beginning at one index, the shorter (it was complete first)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best is None or (i, len(stop)) < (best[0], len(best[1]))):
            best = (i, stop)
    return best


def held_back(text: str, stops: Seq[str]) -> int:
    """Length of the longest tail of text that is a proper beginning of some stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextTracker:
    """Decodes only a short window of recent tokens per step (O(1) per token, not O(length)): the text a
    token adds is the decode of [prefix .. now] minus the decode of [prefix .. last read], so tokenizers
    that render a token differently at the start of a text (leading spaces) still come out right."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Seq[str] = (), include_stop: bool = False):
        self.decode = decode
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.sent = 0        # characters already emitted
        self.checked = 0     # characters already searched for stop sequences
        self.text = ""
        self._prefix = 0     # token offsets of the decode window
        self._read = 0
        self._ids: list[int] = []

    def update(self, output_ids: list[int], check_stops: bool = True) -> tuple[str, str | None]:
        """Takes the tokens so far; returns (text to emit now, stop sequence found or None).

        check_stops=False (before min_new_tokens): stop sequences completed by these tokens are never
        matched, now or later; they stay in the text. One that began then and is completed by a later,
        checked token is matched."""
        self._advance(output_ids)
        found = find_stop(self.text, self.stops, self.checked) if check_stops and self.stops else None
        self.checked = len(self.text)
        if found is not None:
            index, stop = found
            end = index + len(stop) if self.include_stop else index
            return self._emit(end), stop
        return self._emit(len(self.text) - held_back(self.text, self.stops)), None

    def _advance(self, ids: list[int], final: bool = False) -> None:
        self._ids = ids
        before = self.decode(ids[self._prefix:self._read])
        after = self.decode(ids[self._prefix:])
        # U+FFFD at the end: a character split across tokens; wait for the rest of it
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def flush(self) -> str:
        """Everything not yet emitted, at the end of the request (an unfinished character included)."""
        self._advance(self._ids, final=True)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk
