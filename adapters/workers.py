"""The two kinds of thread that load adapters, each owning one resource (its reader process) that it
hands to every piece of work it runs; nothing looks a resource up by the calling thread.

- `SlotJobs`: one job per request whose adapter is not in a device slot yet. A job is done when its
  serve function says so; one that finds every slot busy stays first in line and is tried again when a
  slot is released (`wake`) or after RETRY_S.
- `Calls`: functions run in order, each answered through a future (administrative loads, the watcher's
  reloads, start-up preloads).

Both keep their torch work on their own thread (`native.use_one_thread`), so loads never start a second
torch thread pool beside the engine's, and each may run at a CPU niceness of its own.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from . import native

RETRY_S = 0.05    # a job waiting for a slot is retried at least this often (releases also wake the thread)


class _Worker:
    """One thread owning one resource: setup() runs first on the thread and returns it (something with
    close(), closed when the thread ends); `_next` does one round of work, False when the thread ends."""

    def __init__(self, name: str, setup: Callable):
        self.setup = setup
        self._cond = threading.Condition()
        self._stopping = False
        self.started = threading.Event()   # setup() has returned: the resource is there
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        native.use_one_thread()
        resource = self.setup()
        self.started.set()
        try:
            while self._next(resource):
                pass
        finally:
            resource.close()

    def _next(self, resource) -> bool:
        raise NotImplementedError


class SlotJobs(_Worker):
    def __init__(self, name: str, setup: Callable, serve: Callable[[object, object, str], bool]):
        """serve(resource, token, adapter_id) -> True when the job is done, False to retry it later."""
        self.serve = serve
        self._jobs: deque[tuple[object, str]] = deque()          # (token, adapter_id)
        super().__init__(name, setup)

    def submit(self, token: object, adapter_id: str) -> None:
        with self._cond:
            self._jobs.append((token, adapter_id))
            self._cond.notify()

    def wake(self) -> None:
        """A slot was released: jobs waiting for one are tried now."""
        with self._cond:
            self._cond.notify()

    def _next(self, resource) -> bool:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            jobs = list(self._jobs)
        waiting = [job for job in jobs if not self.serve(resource, *job)]
        with self._cond:
            for _ in range(len(jobs)):
                self._jobs.popleft()
            self._jobs.extendleft(reversed(waiting))      # still first in line, ahead of new jobs
            if len(waiting) == len(jobs) and not self._stopping:
                self._cond.wait(RETRY_S)                   # every slot busy: wait for a release
        return True


class Calls(_Worker):
    """Functions run in order, each given the thread's resource; calls submitted before stop() still run."""

    def __init__(self, name: str, setup: Callable):
        self._queue: deque[tuple[Callable, Future]] = deque()
        super().__init__(name, setup)

    def submit(self, fn: Callable) -> Future:
        """fn(resource) on this thread; its result or exception in the future."""
        future: Future = Future()
        with self._cond:
            self._queue.append((fn, future))
            self._cond.notify()
        return future

    def _next(self, resource) -> bool:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return False
            fn, future = self._queue.popleft()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(resource))
            except BaseException as exc:  # handed to the caller, who maps it
                future.set_exception(exc)
        return True


def set_nice(nice: int) -> None:
    """This thread's CPU niceness (Linux: each thread is scheduled on its own); a no-op where unsupported."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass
