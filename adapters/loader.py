"""The adapter loader: the one owner of the threads that load adapters and of their reader processes.

Loading (reading, validating and normalizing an adapter, publishing it in the registry, copying it into a
device slot) never happens on the decode loop, so running requests keep decoding while adapters load; the
reading itself happens in a child process per thread (`reader.py`), so it does not hold this interpreter's
lock either. Two threads (`workers.py`), each with its own reader process:
- slot jobs, for requests whose adapter is not in a device slot yet. A request waits for them, so they
  run at normal CPU priority and copy into the slot at once;
- calls, for administration (LoadAdapter, the watcher's reloads, preloads), at a CPU niceness that is a
  setting (`--adapter-loader-nice`): on a machine whose cores the engine's thread pool keeps busy, an
  equal-priority thread copying megabytes takes a core from that pool for whole time slices, and every
  parallel region of a decode step waits for it. Their slot copies go through `run_between_steps`, which
  the engine sets to run them between two steps.

With `reads_between_steps` (`--adapter-reads-between-steps`), a slot job's read runs while the engine
holds its next step (`while_steps_paused`) instead of beside it, where on a machine whose cores the step's
thread pool fills the reader takes a core from that pool (and a niceness would starve the request that
waits for it). What that trades, measured on 2 cores (docs/operations.md): reads no longer slow the steps
beside them, but each pauses every running stream for as long as it takes (1 s at most: chores.HOLD_LIMIT_S).

The engine asks for a binding (`bind`, at once when the adapter is already in a slot) or has one brought
(`bring`); finished jobs wait in a queue the engine takes from its own thread (`take_ready`), after
`notify` told it there is something to take. Nothing here touches a request or the engine's state.
50 first requests for one adapter read it once (one slot-job thread, and a gate per adapter).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..server.errors import FailedPreconditionError, InternalError, LoraplexError, ResourceExhaustedError
from ..server.metrics import NO_METRICS
from ..server.model.config import ModelConfig
from .canonical import Adapter
from .formats import AdapterFormatError, bind
from .formats.dora import BaseWeight
from .reader import ReaderProcess
from .registry import AdapterRegistry, AdapterStatus, Binding, Resident
from .roots import AdapterRoots, signature
from .slots import SlotBuffers
from .workers import Calls, SlotJobs, set_nice

log = logging.getLogger(__name__)

# One finished slot job: (token, its binding, None) or (token, None, why its adapter cannot be served).
Ready = tuple[object, Binding | None, LoraplexError | None]


def _call(fn):
    return fn()


@dataclass(frozen=True)
class ReadSettings:
    """What reading an adapter checks it against and turns it into."""
    model: ModelConfig
    max_rank: int
    dtype: torch.dtype = torch.float32
    base_weight: BaseWeight | None = None    # (layer, target) -> dequantized base weight, for DoRA's norms
    read_timeout_s: float | None = None      # None: reader.default_read_timeout
    keep_16bit: bool = False                 # 16-bit factors stay as saved (SlotBuffers.keeps_16bit)


class AdapterLoader:
    def __init__(self, registry: AdapterRegistry, roots: AdapterRoots, buffers: SlotBuffers | None,
                 reading: ReadSettings, background_nice: int = 0, reads_between_steps: bool = False):
        self.registry = registry
        self.roots = roots
        self.buffers = buffers
        self.reading = reading
        self.metrics = NO_METRICS                      # reads and copies are counted here
        self.notify: Callable[[], None] = lambda: None         # take_ready() has something
        self.run_between_steps: Callable = _call               # runs an administrative slot copy
        self.while_steps_paused: Callable = _call              # runs fn while the engine starts no step
        self.reads_between_steps = reads_between_steps
        self._ready: deque[Ready] = deque()
        self._gates: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()                  # guards _ready and _gates
        self._jobs = SlotJobs("loraplex-adapter-loader", lambda: self._new_reader(0), self._serve)
        self._calls = Calls("loraplex-adapter-admin", lambda: self._new_reader(background_nice))
        self._watcher = None

    def wait_started(self, timeout: float) -> bool:
        """Blocks until both threads have their reader process (the first start also starts the fork
        server: ~3.5 s on 2 cores), so that the first read does not wait for it; False on timeout."""
        return all(worker.started.wait(timeout) for worker in (self._jobs, self._calls))

    def observe(self, metrics) -> None:
        self.metrics = self.registry.metrics = metrics

    # ---- for the engine ----------------------------------------------------------------------

    def bind(self, adapter_id: str) -> Binding | None:
        """A reference on the adapter's slot when it sits in one now; None when it must be brought. Raises
        for a malformed or unknown id, and when every slot holds a pinned adapter."""
        got = self.registry.on_device(adapter_id)
        if got is None:
            self.roots.resolve(adapter_id)
            if self.registry.all_pinned():
                raise ResourceExhaustedError("every adapter slot holds a pinned adapter; unpin or unload one")
        return got

    def bring(self, token: object, adapter_id: str) -> None:
        """Reads the adapter if needed and copies it into a slot for `token`; the outcome comes through
        take_ready()."""
        self._jobs.submit(token, adapter_id)

    def take_ready(self) -> list[Ready]:
        with self._lock:
            ready, self._ready = list(self._ready), deque()
        return ready

    def release(self, key: tuple[str, int]) -> None:
        self.registry.release(key)
        self._jobs.wake()

    # ---- for administration ------------------------------------------------------------------

    def load(self, adapter_id: str, pin: bool = False) -> Future:
        """Reads the adapter now on the administrative thread; if its files changed since it was read,
        publishes a new version. A pinned adapter stays pinned: its new version is put in a slot and
        pinned in place of the old one. The future holds its AdapterStatus."""
        return self._calls.submit(lambda reader: self._load(reader, adapter_id, pin))

    def preload(self, adapter_id: str) -> Future:
        """Reads the adapter and copies it into a slot with no request on it."""
        def into_slot(reader):
            self.release(self._take_slot(reader, adapter_id, self.run_between_steps).key)
        return self._calls.submit(into_slot)

    def with_resident(self, fn: Callable) -> Future:
        """fn(read) on the administrative thread, where read(adapter_id) gives that adapter's Resident, read
        (and published) first when it is not in host memory; the future holds fn's result."""
        return self._calls.submit(lambda reader: fn(lambda adapter_id: self._resident(reader, adapter_id)))

    def unload(self, adapter_id: str) -> AdapterStatus:
        return self.registry.unload(adapter_id)

    def describe(self, adapter_id: str) -> AdapterStatus:
        status = self.registry.status(adapter_id)
        if status is not None:
            return status
        self.roots.resolve(adapter_id)      # raises NotFound / InvalidArgument for ids not on disk
        return AdapterStatus(adapter_id, "on_disk", "disk")

    def catalog(self) -> list[AdapterStatus]:
        loaded = self.registry.statuses()
        on_disk = [AdapterStatus(i, "on_disk", "disk") for i in self.roots.scan() if i not in loaded]
        return sorted([*loaded.values(), *on_disk], key=lambda s: s.adapter_id)

    def changed_on_disk(self) -> dict[str, tuple | None]:
        """{adapter id: its files' signature now} for adapters in memory whose files differ from the
        version being served (a deleted directory included)."""
        served = self.registry.served_signatures()
        now = {i: self.roots.signature_now(i) for i in served}
        return {i: sig for i, sig in now.items() if sig != served[i]}

    def watch(self, interval: float) -> None:
        """Publishes new versions of loaded adapters whose files change (see watch.py)."""
        from .watch import AdapterWatcher

        self._watcher = AdapterWatcher(self.changed_on_disk, self.load, interval)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._jobs.stop()
        self._calls.stop()

    # ---- on the loader threads ---------------------------------------------------------------

    def _new_reader(self, nice: int) -> ReaderProcess:
        """The calling thread's reader process, both at `nice`; started here, so the server's start does
        not wait for it."""
        set_nice(nice)
        r = self.reading
        reader = ReaderProcess(r.model, r.max_rank, r.dtype, nice, r.read_timeout_s, r.keep_16bit)
        reader.start()
        return reader

    def _serve(self, reader: ReaderProcess, token: object, adapter_id: str) -> bool:
        """One slot job: True when it is done (in a slot, or failed), False when it waits for a slot."""
        try:
            reads = self.while_steps_paused if self.reads_between_steps else _call
            got, error = self._take_slot(reader, adapter_id, _call, wait=True, reads=reads), None
        except LoraplexError as exc:
            got, error = None, exc
        except Exception as exc:  # a bug in a reader must fail the request, not the loader
            log.exception("loading adapter %r failed", adapter_id)
            got, error = None, InternalError(f"loading adapter {adapter_id!r} failed: {exc}")
        if got is None and error is None:
            return False
        with self._lock:
            self._ready.append((token, got, error))
        self.notify()
        return True

    def _load(self, reader: ReaderProcess, adapter_id: str, pin: bool) -> AdapterStatus:
        pin = pin or self.registry.pinned(adapter_id)
        resident = self._resident(reader, adapter_id, refresh=True)
        if pin:
            key = self._take_slot(reader, adapter_id, self.run_between_steps).key
            self.registry.pin(key)
            self.release(key)
        return self.registry.status(adapter_id, resident)

    def _take_slot(self, reader: ReaderProcess, adapter_id: str, copies: Callable,
                   wait: bool = False, reads: Callable = _call) -> Binding | None:
        """A reference on a slot holding the adapter's current version, read through reads(fn) when it is
        not in host memory and copied in through copies(fn) when the slot is new. When every slot is busy:
        None if `wait`, else ResourceExhausted."""
        resident = self._resident(reader, adapter_id, reads=reads)
        reserved = self.registry.reserve(adapter_id, resident)
        if reserved is None:
            if wait:
                return None
            raise ResourceExhaustedError(f"all {self.registry.slots.num_slots} adapter slots are in use by "
                                         f"running requests or pinned")
        binding = reserved.binding
        if reserved.must_write:
            try:
                copies(lambda: self._copy(binding.slot, resident.adapter))
            except BaseException:
                self.registry.written(binding.key, ok=False)
                raise
            self.registry.written(binding.key, ok=True)
        elif not self.registry.wait_written(binding.key):      # the other thread's copy of it failed
            self.release(binding.key)
            raise InternalError(f"adapter {adapter_id!r} could not be copied to a slot")
        return binding

    def _resident(self, reader: ReaderProcess, adapter_id: str, refresh: bool = False,
                  reads: Callable = _call) -> Resident:
        """The adapter in host memory; read through reads(fn) (and published) first when it is not there, or
        when `refresh` and its files changed."""
        current = self.registry.resident(adapter_id)
        if current is not None and not refresh:
            return current
        with self._gate(adapter_id):             # one read per adapter; the other thread waits for it
            directory = self.roots.resolve(adapter_id)
            files = signature(directory)
            current = self.registry.resident(adapter_id)
            if current is not None and current.signature == files:
                return current
            adapter = reads(lambda: self._read(reader, adapter_id, directory))
            return self.registry.publish(adapter_id, adapter, files)

    def _gate(self, adapter_id: str) -> threading.Lock:
        with self._lock:
            return self._gates.setdefault(adapter_id, threading.Lock())

    def _read(self, reader: ReaderProcess, adapter_id: str, directory: Path) -> Adapter:
        started, result = time.monotonic(), "error"
        try:
            adapter = bind(reader.read(directory, adapter_id), self.reading.base_weight)  # DoRA: its scales
            result = "ok"
            return adapter
        except AdapterFormatError as exc:
            result = "invalid"
            raise FailedPreconditionError(f"adapter {adapter_id!r} cannot be served: {exc}") from None
        finally:
            self.metrics.adapter_read(result, time.monotonic() - started)

    def _copy(self, slot: int, adapter: Adapter) -> None:
        started = time.monotonic()
        self.buffers.write(slot, adapter)
        self.metrics.adapter_copied(time.monotonic() - started)

