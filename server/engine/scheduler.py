"""Chooses each step's sequences: admits waiting prompts while memory and batch room allow (prefill),
otherwise decodes every running sequence one token. Never touches a tensor."""

from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..errors import ResourceExhaustedError
from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class Batch:
    prefill: bool
    seqs: list[Sequence]
    weight_set: tuple | None = None    # a merged copy's key (adapter id, version, method); None: the base


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int, max_queue_size: int):
        self.blocks = blocks
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
        elif self._swapped_rows + seq.num_cached <= self.swap_rows:
            self.kv_saves.append((seq, list(seq.block_table)))
            seq.swapped = True
            self._swapped_rows += seq.num_cached
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
