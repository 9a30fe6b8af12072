"""Which weights each step runs on: the base (today's mixed-adapter batch through the LoRA path) or the
merged copy of one adapter version (its requests only, no LoRA work).

A request runs every step on the set it started on: the merged adapter's requests on its merged copy,
everyone else's on the base. So a merge or an unmerge never changes a running request's numbers, and an
answer does not depend on what else is running. When both sets have work, steps take turns.

Merging builds the copy on a thread of its own at the engine's CPU priority (the base modules are only
read; the adapter is read, if it must be, by the loader's administrative thread, which runs niced: a build
there on 2 busy cores took 40 s instead of 4) and installs it between two steps on the loop's thread; unmerging drops it there once no running request
uses it. One adapter is merged at a time: merging another is refused until it is unmerged. A new version
of the merged adapter (reloaded files) is merged again when its first request arrives; that request and
those before the new copy is ready run on the base through the LoRA path, and the old version's copy is
dropped when its last request ends.
"""

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ...adapters import merge
from ...adapters.merge import METHODS, MergedWeights
from ...adapters.workers import Calls
from ..errors import FailedPreconditionError, InvalidArgumentError
from ..metrics import NO_METRICS

log = logging.getLogger(__name__)

Key = tuple[str, int, str]      # a merged copy: (adapter id, version, method)


@dataclass(frozen=True)
class MergeStatus:
    adapter_id: str
    state: str                    # "merged", "merging" or "unmerged"
    method: str = ""
    version: int = 0
    retained: float = 0.0         # share of the delta's norm the merged weights keep
    retained_by_layer: tuple[float, ...] = ()
    size_bytes: int = 0           # memory of the merged copy, beside the base's
    seconds: float = 0.0          # time to build it
    warning: str = ""             # set when retained < the server's threshold


class WeightSets:
    def __init__(self, model, resident: Callable[[str], Future], merge_into: Callable[..., MergedWeights],
                 between_steps: Callable, min_retained: float = 0.5,
                 preferred: Callable[[object], str] = lambda adapter: "dense"):
        """resident(adapter_id): a future of that adapter's Resident (read from disk first if needed);
        merge_into(adapter, key, method): the merged modules; preferred(adapter): the method a merge that
        names none ("") uses for it; between_steps(fn): runs fn on the loop's
        thread between steps. Create it on a thread at the engine's priority: the builder thread
        started here inherits it."""
        self.model = model
        self.resident = resident
        self.merge_into = merge_into
        self.between_steps = between_steps
        self.min_retained = min_retained
        self.preferred = preferred
        self.metrics = NO_METRICS
        self._lock = threading.Lock()
        self._sets: dict[Key, MergedWeights] = {}
        self._users: Counter[Key] = Counter()
        self._target: tuple[str, str] | None = None      # (adapter id, method) merged, or being merged
        self._current: Key | None = None                 # the version new requests of the target run on
        self._building = False
        self._last: Key | None = None
        self._auto_pending = False
        self.auto = False                 # the current merge was made by --auto-merge
        self.movable = False              # ... with a method equal to the adapter: its requests are not bound
        self.last_switch = -float("inf")  # monotonic time the last copy was installed or the last unmerge
        self.last_build_s = 0.0           # seconds the last copy took to build
        self._builder = Calls("loraplex-merge", _NoResource)    # its torch work on its own thread (workers.py)

    def stop(self) -> None:
        self._builder.stop()

    # ---- administration ----------------------------------------------------------------------------
    def merge(self, adapter_id: str, method: str, auto: bool = False) -> Future:
        """Merges the adapter's current version; the future holds its MergeStatus. auto: made by the
        --auto-merge rule (with `dense`, its requests are not bound to a set; see auto_planner.py).
        method "": the one `preferred` picks for the adapter once it is read."""
        if method and method not in METHODS:
            raise InvalidArgumentError("method", f"{method!r} is not a merge method (methods: {', '.join(METHODS)})")
        with self._lock:
            if self._target is not None and self._target[0] != adapter_id:
                raise FailedPreconditionError(f"adapter {self._target[0]!r} is merged; unmerge it first")
            if self._building:
                raise FailedPreconditionError(f"a merge of {self._target[0]!r} is under way")
            previous, self._target, self._building = self._target, (adapter_id, method), True
            self._auto_pending = auto
        try:
            return self._builder.submit(lambda _: self._merge(adapter_id, method, previous))
        except BaseException:
            self._merge_failed(previous, method)
            raise

    def unmerge(self) -> MergeStatus:
        """New requests of the merged adapter go through the LoRA path from now on; its copy is dropped
        when no running request uses it."""
        with self._lock:
            if self._target is None or self._building:
                raise FailedPreconditionError("no adapter is merged" if self._target is None
                                              else f"a merge of {self._target[0]!r} is under way")
            current = self._sets.get(self._current)
            self._target = self._current = None
            self.auto = self.movable = False
            self.last_switch = time.monotonic()
        self.metrics.merge_event("unmerge", current.method, "ok")
        self.between_steps(self.collect)
        return _status(current, "unmerged")

    def unmerge_if(self, adapter_id: str) -> None:
        """Unmerges `adapter_id` if it is the merged adapter (before it is unloaded)."""
        with self._lock:
            merged = self._target is not None and self._target[0] == adapter_id and not self._building
        if merged:
            self.unmerge()

    def status(self) -> MergeStatus | None:
        """The merged adapter, or the one being merged; None when none is."""
        with self._lock:
            if self._target is None:
                return None
            current = self._sets.get(self._current)
            if current is None:
                return MergeStatus(self._target[0], "merging", self._target[1])
            return _status(current, "merged", self._warning(current))

    # ---- on the loop's thread ------------------------------------------------------------------------
    def assign(self, seq) -> None:
        """A request's weight set, fixed the first time the scheduler sees it with its adapter bound."""
        if seq.weight_set_assigned or seq.adapter_pending:
            return
        seq.weight_set_assigned = True
        key, remerge = seq.adapter_key, None
        with self._lock:
            target, current = self._target, self._current
            if key is None or self.movable or (self._building and self._auto_pending
                                               and merge.movable(self._target[1])):   # they bind nobody
                return
            if current is not None and key == current[:2]:
                seq.weight_set = current
                self._users[current] += 1
            elif (target is not None and key[0] == target[0] and not self._building
                  and (current is None or key[1] > current[1])):
                remerge = target[1]                       # a newer version of the merged adapter
        if remerge is not None:
            self._remerge(key[0], remerge)

    def current(self) -> tuple[Key | None, str | None, bool]:
        """(the merged copy new requests use or None, the adapter merged or being merged or None, whether
        its copy is being built)."""
        with self._lock:
            return self._current, self._target[0] if self._target else None, self._building

    def release(self, seq) -> None:
        """The request ended: it no longer holds its merged copy (once dropped, collect frees it)."""
        if seq.weight_set is not None:
            with self._lock:
                self._users[seq.weight_set] -= 1
            seq.weight_set = None

    def rotation(self, keys: set) -> list:
        """The sets with work, in the order to try them this step: the one after the last step's first, so
        that sets take turns."""
        order = sorted(keys, key=lambda k: (k is not None, k or ("", 0)))
        if self._last in order and len(order) > 1:
            i = order.index(self._last) + 1
            order = order[i:] + order[:i]
        return order

    def ran(self, key) -> None:
        self._last = key
        self.metrics.merged_step(key is not None)

    def collect(self) -> None:
        """Drops merged copies that are neither current nor used by a running request."""
        with self._lock:
            unused = [k for k in self._sets if k != self._current and self._users[k] <= 0]
            for key in unused:
                self._sets.pop(key)
                self._users.pop(key, None)
        for key in unused:
            merge.uninstall(self.model, key)

    def memory(self) -> int:
        """Bytes held by the merged copies installed now."""
        with self._lock:
            return sum(merged.nbytes for merged in self._sets.values())

    # ---- internals ---------------------------------------------------------------------------------
    def _merge(self, adapter_id: str, method: str, previous) -> MergeStatus:
        """On the builder thread: has the adapter read if it must be, builds the copy, then installs it
        between two steps."""
        try:
            resident = self.resident(adapter_id).result()
            method = method or self.preferred(resident.adapter)
            key = (adapter_id, resident.version, method)
            merged = self.merge_into(resident.adapter, key, method)
            self.between_steps(lambda: self._install(merged))
        except BaseException:
            self._merge_failed(previous, method or "default")
            raise
        warning = self._warning(merged)
        if warning:
            log.warning("merged adapter %s v%d (%s): %s", key[0], key[1], method, warning)
        self.metrics.merge_event("merge", method, "ok", merged)
        return _status(merged, "merged", warning)

    def _install(self, merged: MergedWeights) -> None:
        merge.install(self.model, merged)
        with self._lock:
            self._sets[merged.key] = merged
            self._current, self._building = merged.key, False
            self.auto, self.movable = self._auto_pending, self._auto_pending and merged.method in merge.MOVABLE
            self.last_switch, self.last_build_s = time.monotonic(), merged.seconds
        self.collect()

    def _merge_failed(self, previous, method: str) -> None:
        with self._lock:
            self._building = False
            self._target = previous if self._current is not None else None
        self.metrics.merge_event("merge", method, "error")

    def _remerge(self, adapter_id: str, method: str) -> None:
        try:
            self.merge(adapter_id, method).add_done_callback(log_failure)
        except Exception:   # noqa: BLE001 - another merge got there first
            log.debug("re-merge of %s not started", adapter_id, exc_info=True)

    def _warning(self, merged: MergedWeights) -> str:
        if merged.retained >= self.min_retained:
            return ""
        return (f"the merged weights keep {merged.retained:.1%} of the adapter's update (threshold "
                f"{self.min_retained:.0%}): 4-bit rounding drops the rest; the dense method keeps all of it")


def _status(merged: MergedWeights, state: str, warning: str = "") -> MergeStatus:
    return MergeStatus(merged.key[0], state, merged.method, merged.key[1], merged.retained, merged.retained_by_layer,
                       merged.nbytes, merged.seconds, warning)


class _NoResource:
    def close(self) -> None:
        pass


def log_failure(future: Future) -> None:
    """A done-callback for merges nobody waits on (a new version's, auto-merge's): logs a failure."""
    if future.exception() is not None:
        log.error("a merge failed: %s", future.exception())
