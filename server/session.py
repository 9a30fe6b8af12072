"""One generation request, whatever transport it came by: the gRPC servicer, the HTTP endpoint and a
cluster replica all call this module and only translate their wire formats and map errors.

- `EngineStreams` is the bridge to an engine in this process: intake on an executor thread (tokenizing
  and adapter checks must not hold up the event loop), outputs handed from the engine thread to the
  caller's loop, and an abort that frees the request's KV memory the moment the caller stops listening
  (a cancel, a deadline, a closed stream).
- `RequestSession.run` adds what every transport owes a request around any such stream (a local engine's
  or a cluster front's): validation inside the record, and one outcome record (log line and metrics).

Errors come out as exceptions (LoraplexError for everything the caller can be told about).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from .engine.engine import Engine
from .engine.request import GenerationRequest
from .engine.sequence import RequestOutput
from .errors import DeadlineExceededError
from .metrics import NO_METRICS, Metrics
from .outcome import Arrival, Outcome


class Streams(Protocol):
    def stream(self, request: GenerationRequest, timeout: float | None = None,
               incremental: bool = True) -> AsyncIterator[RequestOutput]:
        """The request's outputs, the last one finished; raises the request's error. `timeout` (seconds)
        is what is left of the caller's deadline: past it the work stops with DeadlineExceededError.
        incremental=False: the caller only wants the whole answer, so outputs may come all at the end
        (a cluster then makes one call to a replica instead of a stream)."""


class EngineStreams:
    """enforce_deadlines: stop a request when its timeout passes. A gRPC server leaves it off (grpc cancels
    a call at its deadline); a cluster replica, whose caller is in another process, turns it on."""

    def __init__(self, engine: Engine, enforce_deadlines: bool = False):
        self.engine = engine
        self.enforce_deadlines = enforce_deadlines

    async def stream(self, request: GenerationRequest, timeout: float | None = None,
                     incremental: bool = True) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        await self._add(request, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await _within(queue.get(), loop, timeout if self.enforce_deadlines else None)
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
        finally:
            if not finished:   # the caller went away (cancel, deadline, closed stream): free its memory now
                self.engine.abort(request.request_id)

    async def _add(self, request: GenerationRequest, sink) -> None:
        """Engine.add_request on an executor thread: it tokenizes the prompt and checks the adapter id on
        disk. A thread cannot be stopped: if the caller leaves meanwhile, the request is aborted once added."""
        added = asyncio.get_running_loop().run_in_executor(None, self.engine.add_request, request, sink)
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:
            added.add_done_callback(lambda f: f.exception() is None and self.engine.abort(request.request_id))
            raise


async def _within(awaitable, loop, timeout: float | None):
    if timeout is None:
        return await awaitable
    deadline = loop.time() + timeout
    try:
        return await asyncio.wait_for(awaitable, max(deadline - loop.time(), 0))
    except TimeoutError:
        raise DeadlineExceededError("the request's deadline passed") from None


class RequestSession:
    """What every transport does with a generation request, around the streams of an engine or a cluster."""

    def __init__(self, streams: Streams, log_prompts: bool = False, metrics: Metrics = NO_METRICS):
        self.streams = streams
        self.log_prompts = log_prompts
        self.metrics = metrics

    async def run(self, arrival: Arrival, build: Callable[[], GenerationRequest],
                  time_remaining: Callable[[], float | None] = lambda: None,
                  incremental: bool = True) -> AsyncIterator[RequestOutput]:
        """build() validates the wire message into a request (raising InvalidArgumentError); time_remaining()
        is what is left of the caller's deadline, in seconds (None: no deadline); incremental: see Streams."""
        outcome = Outcome(arrival, self.log_prompts, self.metrics)
        ended = False
        try:
            request = build()
            outputs = self.streams.stream(request, time_remaining(), incremental)
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    outcome.output(out)
                    if out.finished:
                        ended = True
                        outcome.succeeded(out.stop_reason.name)
                    yield out
        except Exception as exc:
            ended = True
            outcome.failed(exc)
            raise
        finally:
            if not ended:   # the caller left (cancel, deadline, closed stream) before the end
                outcome.abandoned(time_remaining())
