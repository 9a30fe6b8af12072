"""One request's life in the engine: its tokens, its KV blocks, its text so far."""

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .request import GenerationRequest
from .stopping import TextTracker


class StopReason(enum.Enum):
    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    CANCELLED = 3
    TIME_LIMIT = 4
    STOP_SEQUENCE = 5
    TOKEN_LIMIT = 6
    ERROR = 7


class Status(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


@dataclass
class TokenInfo:
    token_id: int
    text: str = ""
    logprob: float = 0.0
    top_tokens: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step adds to a request; the last one has finished=True."""
    request_id: str
    text: str
    tokens: list[TokenInfo]
    input_token_count: int
    generated_token_count: int
    finished: bool = False
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str = ""
    seed: int = 0
    error: Exception | None = None


Sink = Callable[[RequestOutput], None]


class Sequence:
    def __init__(self, request: GenerationRequest, prompt_ids: list[int], seed: int, tracker: TextTracker,
                 sink: Sink, max_total_tokens: int):
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.tracker = tracker
        self.sink = sink
        self.max_total_tokens = max_total_tokens   # prompt + output, the context window or less
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None   # when its latest token was sampled
        self.aborted = False
        self.in_step = False
        self.slot = -1                 # device slot of the request's adapter; -1 = base model only
        self.adapter_key = None        # (adapter_id, version) the request holds a slot reference on
        self.adapter_pending = False   # waiting for its adapter to reach a slot
        self.weight_set = None         # the merged adapter version whose copy of the weights it runs on; None: base
        self.weight_set_assigned = False   # weight_set is fixed (weight_sets.WeightSets.assign)
        self.fed = 0                   # tokens of all_ids() whose K/V are in the cache (prompt pieces, decodes)
        self.swapped = False           # preempted with its K/V rows kept in host memory (Scheduler._preempt)
        self.saved_kv: list | None = None   # those rows, per layer (k, v), held by the runner

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_cached(self) -> int:
        """Tokens whose K/V are in the cache: all but the last during decode."""
        return self.num_tokens - 1

    @property
    def prefilling(self) -> bool:
        """Its prompt (or, after a preemption that dropped its K/V, its tokens so far) is not all in the
        cache yet: it is fed in pieces before it decodes (chunked prefill)."""
        return not (self.output_ids and self.fed == self.num_tokens - 1)

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def stop_reason(self, token: int, stop_seq: str | None, eos_ids: tuple[int, ...]) -> "StopReason":
        """Why generation ends after `token` (the newest output), or NOT_FINISHED. stop_seq: the stop
        sequence the text tracker found, if any."""
        stopping, n_out = self.request.stopping, len(self.output_ids)
        if token in eos_ids and n_out >= stopping.min_new_tokens:
            return StopReason.EOS_TOKEN
        if stop_seq is not None:
            return StopReason.STOP_SEQUENCE
        if n_out >= stopping.max_new_tokens:
            return StopReason.MAX_TOKENS
        if self.num_tokens >= self.max_total_tokens:
            return StopReason.TOKEN_LIMIT
        limit = stopping.time_limit_millis
        if limit and (time.monotonic() - self.arrival) * 1000 >= limit:
            return StopReason.TIME_LIMIT
        return StopReason.NOT_FINISHED
