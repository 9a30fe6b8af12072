"""The adapter loader: one background thread that does all adapter loading work.

Reading, validating and normalizing an adapter and copying it into a slot all happen here, never on the
decode loop, so running requests keep decoding while adapters load. Two kinds of jobs:
- slot jobs, for requests whose adapter is not in a device slot yet: done when the adapter is in one (or
  failed); a job that finds every slot busy stays first in line and is retried when a slot is released;
- calls, for administration (LoadAdapter): any registry function, run here and answered through a future.

The thread runs at a low CPU priority (nice LOADER_NICE): on a machine whose cores the engine keeps busy,
loading takes the time decoding leaves over instead of stretching decode steps. One thread does it all, so
torch work from loads never opens more than one extra thread pool, and 50 first requests for one adapter
read it once (the registry's per-adapter gate does the rest).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

from ..server.errors import InternalError, LoraplexError

log = logging.getLogger(__name__)

# on_done(token, got, error): got = (slot, key) on success; error = the LoraplexError otherwise.
Done = Callable[[object, tuple | None, LoraplexError | None], None]
RETRY_S = 0.05    # a job waiting for a slot is retried at least this often (releases also wake the thread)
LOADER_NICE = 10  # Linux CFS weight 110 against the engine's 1024: ~10% of a core when both want it


class SlotLoader:
    def __init__(self, registry, on_done: Done, nice: int = LOADER_NICE):
        self.registry = registry
        self.on_done = on_done
        self.nice = nice
        self._jobs: deque[tuple[object, str, float]] = deque()   # (token, adapter_id, submitted at)
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.ready_seconds: deque[float] = deque(maxlen=1024)     # submit -> in a slot, recent slot jobs
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-loader", daemon=True)
        self._thread.start()

    def submit(self, token: object, adapter_id: str) -> None:
        """Bring adapter_id into a slot for `token`; on_done(token, ...) tells when it is there."""
        with self._cond:
            self._jobs.append((token, adapter_id, time.monotonic()))
            self._cond.notify()

    def call(self, fn: Callable) -> Future:
        """fn() on the loader thread (before waiting slot jobs); its result or exception in the future."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def slot_released(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        _lower_priority(self.nice)
        while True:
            with self._cond:
                while not self._jobs and not self._calls and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                calls = list(self._calls)
                self._calls.clear()
                jobs = list(self._jobs)
            for fn, future in calls:
                _run_call(fn, future)
            waiting = [job for job in jobs if not self._serve(*job)]
            with self._cond:
                for _ in range(len(jobs)):
                    self._jobs.popleft()
                self._jobs.extendleft(reversed(waiting))      # still first in line, ahead of new jobs
                if len(waiting) == len(jobs) and jobs and not self._calls and not self._stopping:
                    self._cond.wait(RETRY_S)                   # every slot busy: wait for a release

    def _serve(self, token: object, adapter_id: str, submitted: float) -> bool:
        """True when the job is done (in a slot, or failed); False when it must wait for a slot."""
        try:
            got = self.registry.try_acquire(adapter_id)
        except LoraplexError as exc:
            self.on_done(token, None, exc)
            return True
        except Exception as exc:  # a bug in a reader must fail the request, not the loader
            log.exception("loading adapter %r failed", adapter_id)
            self.on_done(token, None, InternalError(f"loading adapter {adapter_id!r} failed: {exc}"))
            return True
        if got is None:
            return False
        self.ready_seconds.append(time.monotonic() - submitted)
        self.on_done(token, got, None)
        return True


def _run_call(fn: Callable, future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller, who maps it
        future.set_exception(exc)


def _lower_priority(nice: int) -> None:
    """Per-thread niceness (Linux: a thread is its own scheduling entity); a no-op where unsupported."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError, PermissionError):
        pass
