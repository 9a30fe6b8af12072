"""The adapter loader: background threads that do all adapter loading work, off the decode loop.

Reading, validating and normalizing an adapter and copying it into a slot never happen on the decode loop,
so running requests keep decoding while adapters load (the reading itself happens in a child process per
thread, `reader.py`, so it does not hold this interpreter's lock either). Two kinds of work, two threads:
- slot jobs, for requests whose adapter is not in a device slot yet: done when the adapter is in one (or
  failed); a job that finds every slot busy stays first in line and is retried when a slot is released.
  A request is waiting on them, so they run at normal CPU priority;
- calls, for administration (LoadAdapter): any registry function, answered through a future. This thread
  and its reader process run at a CPU niceness that is a setting (`--adapter-loader-nice`): on a machine
  whose cores the engine's thread pool keeps busy, an equal-priority thread copying megabytes takes a core
  from that pool for whole time slices, and every parallel region of a decode step waits for it. A
  deprioritized thread that is preempted while it holds the interpreter lock stalls decoding too, which is
  why this thread takes the lock only a few times per load (one native call for the views of a read
  adapter, one for the slot copy).
50 first requests for one adapter read it once (one slot-job thread, and the registry's per-adapter gate).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from ..server.errors import InternalError, LoraplexError
from . import native
from .reader import ReaderProcess

log = logging.getLogger(__name__)

# on_done(token, got, error): got = (slot, key) on success; error = the LoraplexError otherwise.
Done = Callable[[object, tuple | None, LoraplexError | None], None]
RETRY_S = 0.05    # a job waiting for a slot is retried at least this often (releases also wake the thread)


class SlotLoader:
    def __init__(self, registry, on_done: Done, background_nice: int = 0, background_copies=None):
        """background_copies(fn), if given, runs the slot copies of administrative loads (the engine runs
        them between two steps); a request's own load copies at once, since the request waits for it."""
        self.registry = registry
        self.on_done = on_done
        self._jobs: deque[tuple[object, str]] = deque()          # (token, adapter_id)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-loader", daemon=True)
        self._thread.start()
        self._calls = _Calls(lambda: self._reader(background_nice, background_copies))
        self._watcher = None

    def submit(self, token: object, adapter_id: str) -> None:
        """Bring adapter_id into a slot for `token`; on_done(token, ...) tells when it is there."""
        with self._cond:
            self._jobs.append((token, adapter_id))
            self._cond.notify()

    def call(self, fn: Callable) -> Future:
        """fn() on the background-load thread; its result or exception in the future."""
        return self._calls.submit(fn)

    def slot_released(self) -> None:
        with self._cond:
            self._cond.notify()

    def watch(self, interval: float) -> None:
        """Publishes new versions of loaded adapters whose files change (see watch.py)."""
        from .watch import AdapterWatcher

        self._watcher = AdapterWatcher(self.registry, self.call, interval)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._calls.stop()
        self._thread.join(5)

    def _reader(self, nice: int, copies=None) -> ReaderProcess:
        """This thread's reads go to a child process of its own (see reader.py), both at `nice`; its slot
        copies run through `copies` when given."""
        _set_nice(nice)
        reader = ReaderProcess(self.registry.model, self.registry.max_rank, self.registry.dtype, nice)
        self.registry.use_reader(reader, copies)
        reader.start()                    # on this thread, so the server's start does not wait for it
        return reader

    def _run(self) -> None:
        native.use_one_thread()          # loads never start a second torch thread pool beside the engine's
        reader = self._reader(0)
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    reader.close()
                    return
                jobs = list(self._jobs)
            waiting = [job for job in jobs if not self._serve(*job)]
            with self._cond:
                for _ in range(len(jobs)):
                    self._jobs.popleft()
                self._jobs.extendleft(reversed(waiting))      # still first in line, ahead of new jobs
                if len(waiting) == len(jobs) and not self._stopping:
                    self._cond.wait(RETRY_S)                   # every slot busy: wait for a release

    def _serve(self, token: object, adapter_id: str) -> bool:
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
        self.on_done(token, got, None)
        return True


class _Calls:
    """One thread running submitted functions in order."""

    def __init__(self, setup: Callable):
        self.setup = setup                # run first on the thread; returns something with close()
        self._queue: deque[tuple[Callable, Future] | None] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-admin", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        with self._cond:
            self._queue.append((fn, future))
            self._cond.notify()
        return future

    def stop(self) -> None:
        with self._cond:
            self._queue.append(None)
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        native.use_one_thread()
        resource = self.setup()           # (the setup may lower this thread's priority too)
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
            if item is None:
                resource.close()
                return
            _run_call(*item)


def _run_call(fn: Callable, future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller, who maps it
        future.set_exception(exc)



def _set_nice(nice: int) -> None:
    """This thread's CPU niceness (Linux: each thread is scheduled on its own); a no-op where unsupported."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass
