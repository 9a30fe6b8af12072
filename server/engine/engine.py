"""The engine loop: requests in, one model step at a time, outputs out to each request's sink.

A background thread repeats: schedule (under the lock), run the step (outside it, so requests can be
added or aborted meanwhile), postprocess (under the lock), then hand outputs to sinks (outside it).
"""

import logging
import random
import threading
import time
from dataclasses import dataclass

import torch

from ..metrics import NO_METRICS, Metrics
from ..errors import (InternalError, InvalidArgumentError, LoraplexError, NotFoundError, ResourceExhaustedError,
                      UnavailableError)
from .chores import Chores
from .limits import EngineLimits
from .prompt import encode_prompt, truncate
from .request import GenerationRequest
from .runner import ModelRunner
from .scheduler import Batch, Scheduler
from .sequence import RequestOutput, Sequence, Sink, Status, StopReason, TokenInfo
from .step_choice import next_batch
from .stopping import TextTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    steps: int


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, limits: EngineLimits,
                 eos_ids: tuple[int, ...], adapters=None):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_ids = eos_ids
        self.adapters = adapters      # an AdapterLoader; None = adapters off
        self.weights = None           # WeightSets: merged adapters' copies of the weights (set by build)
        self.auto = None              # AutoPlanner with --auto-merge (set by build)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.chores = Chores(self._wake_up)    # run on the loop's thread between two steps
        self.between_steps = self.chores.between_steps
        self._adapters_ready = False           # the loader has answers for waiting requests
        self.failed = threading.Event()      # set when the loop itself died (not when one step failed)
        self.failure: BaseException | None = None
        self.steps = 0
        self.metrics: Metrics = NO_METRICS
        if adapters is not None:
            adapters.notify = self._notify               # a slot job ended: take_ready() in the loop
            adapters.run_between_steps = self.between_steps
            adapters.while_steps_paused = self.chores.while_paused    # reads, when the loader holds steps

    def observe(self, metrics: Metrics) -> None:
        """Counts this engine's work (and its adapters') in `metrics` from now on."""
        self.metrics = metrics
        if self.adapters is not None:
            self.adapters.observe(metrics)
        if self.weights is not None:
            self.weights.metrics = metrics

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest, sink: Sink) -> Sequence:
        if self._draining or self.failed.is_set():
            raise UnavailableError("the server is shutting down; retry on another replica"
                                   if self._draining else "the engine has failed; the server is exiting")
        adapter_id = request.adapter_id
        if adapter_id and self.adapters is None:
            raise NotFoundError(f"adapter {adapter_id!r} not found (this server has no adapter roots)")
        seq = self._new_sequence(request, sink)
        if adapter_id:
            self._take_slot(seq)
        try:
            with self._lock:
                if request.request_id in self._by_id:
                    raise InvalidArgumentError("request_id", f"{request.request_id!r} is already running")
                self.scheduler.add(seq)
                self._by_id[request.request_id] = seq
                self._wake.notify()
        except Exception:
            self._release_adapter(seq)
            raise
        if seq.adapter_pending:
            # read and copied into a slot by the loader thread; the request waits without holding up others
            self.adapters.bring(seq, adapter_id)
        return seq

    def _take_slot(self, seq: Sequence) -> None:
        """A bad or unknown adapter id fails the call at once; one not in a slot leaves seq pending."""
        _assign_slot(seq, self.adapters.bind(seq.request.adapter_id))
        self.metrics.adapter_requested(seq.request.adapter_id)

    def _wake_up(self) -> None:
        with self._lock:
            self._wake.notify()

    def _notify(self) -> None:
        with self._lock:
            self._adapters_ready = True
            self._wake.notify()

    def _bind_ready(self) -> list[tuple[Sequence, RequestOutput]]:
        """Under the lock: the loader's answers for waiting requests, their slot or why their adapter
        cannot be served; returns the outputs of those that failed."""
        failed, self._adapters_ready = [], False
        for seq, got, error in self.adapters.take_ready() if self.adapters is not None else ():
            if seq.status is Status.FINISHED:            # aborted while it waited
                if got is not None:
                    self.adapters.release(got.key)
            elif error is not None:
                if not isinstance(error, NotFoundError):
                    error.because("adapter_load")
                self._finish(seq, StopReason.ERROR)
                failed.append((seq, self._output(seq, "", [], True, StopReason.ERROR, error=error)))
            else:
                _assign_slot(seq, got)
        return failed

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_key is not None:
            self.adapters.release(seq.adapter_key)
            seq.slot, seq.adapter_key = -1, None

    def _new_sequence(self, request: GenerationRequest, sink: Sink) -> Sequence:
        ids = truncate(encode_prompt(self.tokenizer, request.prompt), request.truncate_input_tokens)
        self.limits.check(ids, request, kv_capacity=self.runner.num_blocks * self.runner.block_size)
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        stops = request.stopping
        tracker = TextTracker(self._decode, stops.stop_sequences, stops.include_stop_sequence)
        return Sequence(request, ids, seed, tracker, sink, max_total_tokens=self.limits.max_sequence_length)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def abort(self, request_id: str) -> None:
        """Stops a request now: a waiting or idle sequence frees its KV blocks at once; one inside the
        running step does so right after that step."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None:
                return
            seq.aborted = True
            if not seq.in_step:
                self._finish(seq, StopReason.CANCELLED)

    def drain(self) -> None:
        """New requests are refused with UNAVAILABLE from now on; running and waiting ones go on."""
        with self._lock:
            self._draining = True

    def idle(self) -> bool:
        """No request running or waiting."""
        with self._lock:
            return not self._by_id

    def stats(self) -> EngineStats:
        with self._lock:
            blocks = self.scheduler.blocks
            return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), blocks.usage,
                               blocks.num_blocks, blocks.num_free, self.scheduler.preemptions, self.steps)

    # ---- loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Runs the loop on a new thread. Prefer build.launch_engine, which also builds the model there."""
        self._thread = threading.Thread(target=self.run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """The loop, on the calling thread, until stop(). If the loop itself fails (a bug, not a failed
        step), `failed` is set and every request still in the engine gets the error."""
        if self._thread is None:
            self._thread = threading.current_thread()
        self.chores.loop_started()
        try:
            self._loop()
        except BaseException as exc:
            log.critical("the engine loop failed", exc_info=True)
            self.failure = exc
            self.failed.set()
            self._fail_all(InternalError(f"the engine failed: {type(exc).__name__}: {exc}"))
        finally:
            self.chores.loop_ended()

    def _fail_all(self, error: LoraplexError) -> None:
        with self._lock:
            doomed = list(self._by_id.values())
            outputs = []
            for seq in doomed:
                try:
                    self._finish(seq, StopReason.ERROR)
                except Exception:  # the state that broke the loop may break this too; the answer matters more
                    log.exception("could not release request %s", seq.request_id)
                outputs.append((seq, self._output(seq, "", [], True, StopReason.ERROR, error=error)))
        for seq, out in outputs:
            seq.sink(out)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join()
        if self.weights is not None:
            self.weights.stop()
        if self.adapters is not None:
            self.adapters.stop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while (not self._stopping and not self.scheduler.has_work() and not self.chores.pending()
                       and not self._adapters_ready):
                    self._wake.wait()
                if self._stopping:
                    return
                failed = self._bind_ready()
                chore = self.chores.take()
                batch = next_batch(self.scheduler, self.weights, self.auto) if self.scheduler.has_work() else None
                self.runner.move_kv(*self.scheduler.take_kv_moves())
                if batch is None and chore is None:   # only requests waiting for their adapter: the loader wakes us
                    self._wake.wait(0.05)
                for seq in batch.seqs if batch else ():
                    seq.in_step = True
            for seq, out in failed:
                seq.sink(out)
            if chore is not None:
                chore()
            if batch is not None:
                for prefill, seqs in batch.phases():
                    self.metrics.step(prefill, seqs)
                self._run(batch)

    def _run(self, batch: Batch) -> None:
        started = time.monotonic()
        try:
            sampled = self.runner.step(batch, self.eos_ids)
            if self.auto is not None:
                self.auto.step_took(batch, time.monotonic() - started)
            error = None
        except Exception as exc:   # a failed step fails its requests, not the engine
            log.exception("step failed for %d sequences", len(batch.seqs))
            sampled, error = None, _classify(exc)
        with self._lock:
            self.steps += 1
            outputs = [self._postprocess(seq, i, sampled, error, batch.fed_after(i))
                       for i, seq in enumerate(batch.seqs)]
        for seq, out in outputs:
            if out is not None:
                seq.sink(out)

    # ---- after a step ---------------------------------------------------------------------------
    def _postprocess(self, seq: Sequence, i: int, sampled, error, fed_after: int):
        seq.in_step = False
        if seq.status is Status.FINISHED:
            return seq, None
        if seq.aborted:
            self._finish(seq, StopReason.CANCELLED)
            return seq, None
        if error is None and i in sampled.failed:
            log.error("sampling failed for request %s: %s", seq.request_id, sampled.failed[i])
            error = InternalError(f"sampling failed for this request: {sampled.failed[i]}")
        if error is not None:
            self._finish(seq, StopReason.ERROR)
            return seq, self._output(seq, "", [], True, StopReason.ERROR, error=error)
        seq.fed = fed_after
        token = sampled.token_ids[i]
        if token is None:          # a prompt piece before its prompt's last: nothing to tell yet
            return seq, None
        seq.output_ids.append(token)
        now = time.monotonic()
        self.metrics.token(seq, now)
        seq.last_token_time = now
        info = self._token_info(seq, token, sampled, i)
        n_out, stopping = len(seq.output_ids), seq.request.stopping
        text, stop_seq = seq.tracker.update(seq.output_ids, check_stops=n_out >= stopping.min_new_tokens)
        reason = seq.stop_reason(token, stop_seq, self.eos_ids)
        if reason is StopReason.NOT_FINISHED:
            return seq, self._output(seq, text, info, False, reason)
        if reason is not StopReason.STOP_SEQUENCE:
            text += seq.tracker.flush()
        self._finish(seq, reason)
        return seq, self._output(seq, text, info, True, reason, stop_seq or "")

    def _token_info(self, seq: Sequence, token: int, sampled, i: int) -> list[TokenInfo]:
        options = seq.request.response
        if not (options.token_logprobs or options.top_n_tokens):
            return []
        top = [(t, self.tokenizer.decode([t]), lp) for t, lp in sampled.top[i]]
        return [TokenInfo(token, self.tokenizer.decode([token]), sampled.logprobs[i], top)]

    def _output(self, seq: Sequence, text, tokens, finished, reason, stop_sequence="", error=None):
        return RequestOutput(seq.request_id, text, tokens, len(seq.prompt_ids), len(seq.output_ids),
                             finished, reason, stop_sequence, seq.seed, error)

    def _finish(self, seq: Sequence, reason: StopReason) -> None:
        self.scheduler.finish(seq)
        self._by_id.pop(seq.request_id, None)
        if self.weights is not None:
            self.weights.release(seq)
        self._release_adapter(seq)
        seq.stop_reason = reason


def _assign_slot(seq: Sequence, got) -> None:
    """got: a Binding from the loader, or None while the adapter is brought to a slot (the request waits)."""
    seq.adapter_pending = got is None
    if got is not None:
        seq.slot, seq.adapter_key = got.slot, got.key


def _classify(exc: Exception) -> Exception:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower():
        return ResourceExhaustedError(f"out of memory while running the batch: {exc}").because("oom")
    return InternalError(f"the step failed: {type(exc).__name__}: {exc}")
