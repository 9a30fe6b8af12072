"""Work other threads hand to the engine loop's thread, to run between two steps (one per step at most).

The slot copies of administrative adapter loads come here: on 2 cores, a copy on another thread while a
step runs takes a core from the step's thread pool, whose threads then wait for each other; between steps
it costs that one step the copy's few milliseconds. (A request's own load copies at once: the request
waits for it.) On a CPU engine whose threads take every core, the reads a request waits for run while the
loop holds its next step (`while_paused`; loader.py says why).
"""

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable


HOLD_LIMIT_S = 1.0     # the longest while_paused holds the loop


class Chores:
    def __init__(self, wake: Callable[[], None]):
        """wake(): the loop may be waiting; make it look at `pending` again."""
        self.wake = wake
        self._queue: deque[tuple[Callable, Future]] = deque()
        self._loop_thread: threading.Thread | None = None     # None while no loop runs
        self._lock = threading.Lock()

    def between_steps(self, fn: Callable):
        """Runs fn() on the loop's thread between two steps and returns its result; at once on the calling
        thread when that is the loop's, or when no loop runs."""
        with self._lock:
            inline = self._loop_thread is None or threading.current_thread() is self._loop_thread
            if not inline:
                future: Future = Future()
                self._queue.append((fn, future))
        if inline:
            return fn()
        self.wake()
        return future.result()

    def while_paused(self, fn: Callable, longest_s: float = HOLD_LIMIT_S):
        """Runs fn() on the calling thread while the loop waits between two steps: the loop starts no step
        until fn returns, or for longest_s at most (a read on a hung disk must not stop decoding; fn then
        goes on beside the steps). At once when called from the loop's thread, or when no loop runs."""
        paused, done = threading.Event(), threading.Event()

        def hold() -> None:
            paused.set()
            done.wait(longest_s)
        with self._lock:
            inline = self._loop_thread is None or threading.current_thread() is self._loop_thread
            if not inline:
                self._queue.append((hold, Future()))
        if inline:
            return fn()
        self.wake()
        paused.wait()            # a loop that ends meanwhile runs `hold` as it leaves (loop_ended)
        try:
            return fn()
        finally:
            done.set()

    def pending(self) -> bool:
        with self._lock:
            return bool(self._queue)

    def take(self) -> Callable[[], None] | None:
        """The next chore to run on the loop's thread, or None."""
        with self._lock:
            if not self._queue:
                return None
            fn, future = self._queue.popleft()
        return lambda: _run(fn, future)

    def loop_started(self) -> None:
        with self._lock:
            self._loop_thread = threading.current_thread()

    def loop_ended(self) -> None:
        """Chores asked from now on run on their caller's thread; those still queued run here, so that no
        caller waits forever."""
        with self._lock:
            self._loop_thread = None
            left, self._queue = list(self._queue), deque()
        for fn, future in left:
            _run(fn, future)


def _run(fn: Callable, future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:   # handed to the caller that waits on the future
        future.set_exception(exc)
