"""Chooses each step's sequences: admits waiting prompts while memory and batch room allow (prefill),
otherwise decodes every running sequence one token. Never touches a tensor.

With chunked prefill (prefill_chunk_tokens > 0) no step is a prefill alone: every step decodes each running
sequence one token and feeds prompt pieces beside them, at most prefill_chunk_tokens prompt tokens in all.
A prompt is cut at fixed positions (multiples of the chunk size), never where the load happens to leave
room, so its numbers do not depend on what else runs; a prompt within one chunk is fed whole, as unchunked.
"""

from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..errors import ResourceExhaustedError
from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class Batch:
    prefill: bool                      # the step feeds prompt tokens (whole prompts, or pieces beside decodes)
    seqs: list[Sequence]
    weight_set: tuple | None = None    # a merged copy's key (adapter id, version, method); None: the base
    # chunked prefill: the (start, end) positions fed by each of the last len(pieces) sequences; those
    # before them decode one token each. None: whole prompts (prefill) or decodes only.
    pieces: list[tuple[int, int]] | None = None

    @property
    def num_decodes(self) -> int:
        if self.pieces is not None:
            return len(self.seqs) - len(self.pieces)
        return 0 if self.prefill else len(self.seqs)

    def fed_after(self, i: int) -> int:
        """How many of seqs[i]'s tokens are in the KV cache once this step has run."""
        if self.pieces is not None and i >= self.num_decodes:
            return self.pieces[i - self.num_decodes][1]
        return self.seqs[i].num_tokens

    def feeds(self, i: int) -> int:
        """How many tokens seqs[i] feeds in this step."""
        if i < self.num_decodes:
            return 1
        if self.pieces is not None:
            start, end = self.pieces[i - self.num_decodes]
            return end - start
        return self.seqs[i].num_tokens

    def phases(self) -> list[tuple[bool, list[Sequence]]]:
        """(prefill, sequences) of each kind of work in the step."""
        if self.pieces is None:
            return [(self.prefill, self.seqs)]
        split = self.num_decodes
        return [(kind, seqs) for kind, seqs in ((False, self.seqs[:split]), (True, self.seqs[split:])) if seqs]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int, max_queue_size: int,
                 prefill_chunk_tokens: int = 0, prefill_step_tokens: int = 0, max_step_tokens: int = 0):
        self.blocks = blocks
        self.chunk_tokens = prefill_chunk_tokens      # 0: whole prompts, in prefill steps of their own
        self.step_tokens = prefill_step_tokens or prefill_chunk_tokens   # prompt tokens a mixed step may feed
        self.max_step_tokens = max_step_tokens        # with chunks: decodes + prompt pieces of a step; 0 = no cap
        self._prompt_cap = prefill_step_tokens        # as set: 0 = none beside max_step_tokens
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue_size = max_queue_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        # K/V moves the runner must make before the next step, in this order: (sequence, its old block
        # table) whose rows go to host memory, then sequences whose saved rows come back into new blocks
        self.kv_saves: list[tuple[Sequence, list[int]]] = []
        self.kv_restores: list[Sequence] = []
        self.swap_rows = blocks.num_blocks * blocks.block_size   # host rows preempted sequences may hold
        self._swapped_rows = 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue_size:
            raise ResourceExhaustedError(f"the queue is full ({self.max_queue_size} requests waiting); "
                                         f"retry later").because("queue_full")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, runs: Callable[[Sequence], bool] | None = None) -> Batch | None:
        """The next step; with `runs`, only of the sequences it accepts (those of one weight set)."""
        if self.chunk_tokens:
            return self._schedule_mixed(runs or (lambda seq: True))
        admitted = self._admit(runs)
        if admitted:
            return Batch(prefill=True, seqs=admitted)
        self._reserve_decode_rows()
        seqs = [seq for seq in self.running if runs is None or runs(seq)]
        return Batch(prefill=False, seqs=seqs) if seqs else None

    def _admit(self, runs) -> list[Sequence]:
        """In arrival order; a request still waiting for an adapter slot, or of another weight set, is
        passed over, not waited on."""
        admitted, tokens = [], 0
        for seq in list(self.waiting):
            if len(self.running) + len(admitted) >= self.max_batch_size:
                break
            if seq.adapter_pending or (runs is not None and not runs(seq)):
                continue
            if seq.swapped:
                if not self._resume(seq):
                    break
                continue
            n = seq.num_tokens
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            if not self.blocks.can_grow(seq.block_table, n):
                break
            self.blocks.grow(seq.block_table, n)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += n
        self.running.extend(admitted)
        return admitted

    def _schedule_mixed(self, accepts) -> Batch | None:
        for seq in [s for s in self.waiting if s.swapped and accepts(s)]:
            if len(self.running) >= self.max_batch_size or not self._resume(seq):
                break
        self._reserve_decode_rows()
        decodes = [seq for seq in self.running if not seq.prefilling and accepts(seq)]
        pieces = _Pieces(self.chunk_tokens, self._prompt_budget(len(decodes)))
        for seq in self.running:
            if seq.prefilling and accepts(seq) and not pieces.take(seq):
                break
        for seq in list(self.waiting):
            if pieces.budget <= 0 or len(self.running) >= self.max_batch_size:
                break
            if seq.adapter_pending or seq.swapped or not accepts(seq):
                continue
            if not pieces.fits(seq) or not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                break
            self.blocks.grow(seq.block_table, seq.num_tokens)    # the whole prompt's rows, once
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            pieces.take(seq)
        if pieces.seqs:
            return Batch(prefill=True, seqs=decodes + pieces.seqs, pieces=pieces.spans)
        return Batch(prefill=False, seqs=decodes) if decodes else None

    def _prompt_budget(self, decodes: int) -> int:
        """Prompt tokens a mixed step may feed beside `decodes` decode tokens. With max_step_tokens, what the
        decodes leave of it (the whole budget when --prefill-step-tokens is unset): a full batch gets one
        piece, an emptier one several, so a step's length stays about the same at every batch size. The
        first piece always fits (_Pieces.fits), so prompts never starve."""
        if not self.max_step_tokens:
            return self.step_tokens
        left = self.max_step_tokens - decodes
        return min(left, self._prompt_cap) if self._prompt_cap else left

    def _reserve_decode_rows(self) -> None:
        """Each running sequence needs a KV row for the token it feeds; preempt the newest when short."""
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Its K/V rows move to host memory and come back unchanged when it resumes, so its numbers stay
        those of an uninterrupted run (a prefill over prompt + output would round differently). When the
        host rows are used up, they are dropped and recomputed by a later prefill instead."""
        self.running.remove(seq)
        if seq in self.kv_restores:   # resumed in this same schedule: its rows were never put back
            self.kv_restores.remove(seq)
            seq.swapped = True
            self._swapped_rows += seq.num_cached
        elif not seq.prefilling and self._swapped_rows + seq.num_cached <= self.swap_rows:
            self.kv_saves.append((seq, list(seq.block_table)))
            seq.swapped = True
            self._swapped_rows += seq.num_cached
        else:
            seq.fed = 0          # recomputed from its first token
        self.blocks.release(seq.block_table)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _resume(self, seq: Sequence) -> bool:
        """A swapped sequence back to running, with blocks for its saved rows; it decodes next."""
        if not self.blocks.can_grow(seq.block_table, seq.num_cached):
            return False
        self.blocks.grow(seq.block_table, seq.num_cached)
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.kv_restores.append(seq)
        self._unswap(seq)
        return True

    def _unswap(self, seq: Sequence) -> None:
        seq.swapped = False
        self._swapped_rows -= seq.num_cached

    def take_kv_moves(self) -> tuple[list[tuple[Sequence, list[int]]], list[Sequence]]:
        moves = (self.kv_saves, self.kv_restores)
        self.kv_saves, self.kv_restores = [], []
        return moves

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            if seq.swapped:
                self._unswap(seq)
                seq.saved_kv = None
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED


class _Pieces:
    """The prompt pieces of one mixed step, within a budget of prompt tokens."""

    def __init__(self, chunk: int, budget: int):
        self.chunk = chunk
        self.budget = budget
        self.seqs: list[Sequence] = []
        self.spans: list[tuple[int, int]] = []

    def next_span(self, seq: Sequence) -> tuple[int, int]:
        """From what is cached up to the next multiple of the chunk size (or the last token)."""
        return seq.fed, min(seq.num_tokens, (seq.fed // self.chunk + 1) * self.chunk)

    def fits(self, seq: Sequence) -> bool:
        start, end = self.next_span(seq)
        return not self.seqs or end - start <= self.budget

    def take(self, seq: Sequence) -> bool:
        if not self.fits(seq):
            return False
        start, end = self.next_span(seq)
        self.seqs.append(seq)
        self.spans.append((start, end))
        self.budget -= end - start
        return True
