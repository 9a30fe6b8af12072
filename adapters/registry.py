"""Which adapters exist and where they are: disk (the configured roots) -> host memory (LRU by bytes)
-> device slots (a fixed number, LRU among those no request uses).

A request whose adapter is already in a slot takes a reference at once (`try_acquire_on_device`);
otherwise the loader thread (`loader.py`) reads it and copies it into a slot (`try_acquire`), so reading
files and copying never stall the decode loop. The reference is released when the request finishes.
Concurrent first requests for one adapter read it once: they wait on that adapter's gate while the first
one loads it.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..server.errors import (FailedPreconditionError, InternalError, InvalidArgumentError, LoraplexError,
                             NotFoundError, ResourceExhaustedError)
from ..server.metrics import NO_METRICS
from ..server.model.config import ModelConfig
from .canonical import Adapter
from .ids import AdapterNotFound, InvalidAdapterId, resolve_adapter_dir
from .formats import AdapterFormatError, bind, read_adapter
from .formats.dora import BaseWeight
from .slots import NoFreeSlot, SlotBuffers, SlotTable


@dataclass(frozen=True)
class AdapterStatus:
    adapter_id: str
    state: str                        # "on_disk", "loaded" or "unloaded"
    tier: str                         # "disk", "host" or "device"
    version: int = 1
    rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    format: str = ""
    size_bytes: int = 0
    pinned: bool = False
    running_requests: int = 0


@dataclass(frozen=True)
class Tiers:
    """How many adapters each tier holds now."""
    host: int
    host_bytes: int
    device: int
    slots_total: int
    slots_busy: int       # slots whose adapter serves a running request


@dataclass(frozen=True)
class _Resident:
    adapter: Adapter
    version: int
    signature: tuple          # (mtime_ns, size) of its files when read: a change means a new version


class AdapterRegistry:
    """Slot keys are (adapter_id, version): a reloaded adapter gets a new version and a new slot, while
    requests already running keep the slot of the version they started with until they finish."""

    def __init__(self, roots: list[Path], model: ModelConfig, buffers: SlotBuffers, num_slots: int,
                 max_rank: int, host_cache_bytes: int, dtype: torch.dtype = torch.float32,
                 base_weight: BaseWeight | None = None):
        self.roots = roots
        self.base_weight = base_weight    # (layer, target) -> dequantized base weight, for DoRA's norms
        self.model = model
        self.buffers = buffers
        self.slots = SlotTable(num_slots)
        self.max_rank = max_rank
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._host: OrderedDict[str, _Resident] = OrderedDict()   # least recently used first
        self._versions: dict[str, int] = {}                       # last version published per id
        self._stale: set[tuple[str, int]] = set()                 # slot keys to free at their last release
        self._writing: set[tuple[str, int]] = set()               # slot keys whose copy is under way
        self._failed: set[tuple[str, int]] = set()                # slot keys whose copy raised
        self._lock = threading.Lock()                             # guards everything above
        self._written = threading.Condition(self._lock)           # signalled when a slot copy ends
        self._loading: dict[str, threading.Lock] = {}
        self._readers: dict[int, object] = {}                     # thread id -> its ReaderProcess
        self._copiers: dict[int, object] = {}                     # thread id -> how its slot copies run
        self.loads = 0
        self.metrics = NO_METRICS                                 # loads, copies and evictions are counted here

    def acquire(self, adapter_id: str) -> tuple[int, tuple[str, int]]:
        """(device slot, slot key) of adapter_id's current version, with one more reference; reads it
        from disk when it is not in memory. Raises ResourceExhausted when every slot is busy."""
        got = self.try_acquire(adapter_id)
        if got is None:
            raise ResourceExhaustedError(f"all {self.slots.num_slots} adapter slots are in use by running "
                                         f"requests or pinned")
        return got

    def try_acquire(self, adapter_id: str) -> tuple[int, tuple[str, int]] | None:
        """As acquire, but None when every slot is busy (the caller waits for a release)."""
        resident = self._resident(adapter_id)
        key = (adapter_id, resident.version)
        with self._lock:
            try:
                slot, evicted, fresh = self.slots.acquire(key)
            except NoFreeSlot:
                return None
            if evicted is not None:
                self.metrics.adapter_evicted("device")
            if not fresh:
                while key in self._writing:            # another thread is copying it in: wait for the copy
                    self._written.wait()
                if key in self._failed:
                    self._release_locked(key)
                    raise InternalError(f"adapter {adapter_id!r} could not be copied to a slot")
                return slot, key
            self._writing.add(key)
        # Outside the lock (releases and admin calls go on meanwhile): the slot is ours, its old adapter
        # has no running request, and `_writing` keeps others from using it before the copy ends.
        try:
            self._copiers.get(threading.get_ident(), _call)(lambda: self._copy(slot, resident.adapter))
        except BaseException:
            with self._lock:
                self._writing.discard(key)
                self._written.notify_all()
                self._failed.add(key)
                self._stale.add(key)              # freed at the last release
                self._release_locked(key)
            raise
        with self._lock:
            self._writing.discard(key)
            self._written.notify_all()
        return slot, key

    def _copy(self, slot: int, adapter: Adapter) -> None:
        started = time.monotonic()
        self.buffers.write(slot, adapter)
        self.metrics.adapter_copied(time.monotonic() - started)

    def try_acquire_on_device(self, adapter_id: str) -> tuple[int, tuple[str, int]] | None:
        """(slot, key) with one more reference when adapter_id's current version already sits in a slot;
        None otherwise (then the loader brings it). Never reads or copies anything."""
        with self._lock:
            resident = self._host.get(adapter_id)
            if resident is None:
                return None
            key = (adapter_id, resident.version)
            if key not in self.slots or key in self._writing:
                return None
            self._host.move_to_end(adapter_id)
            slot, _, _ = self.slots.acquire(key)
            return slot, key

    def preload(self, adapter_id: str) -> None:
        """Reads the adapter and copies it into a device slot with no request on it (start-up preload)."""
        self.release(self.acquire(adapter_id)[1])

    def check(self, adapter_id: str) -> None:
        """Raises InvalidArgument for a malformed id and NotFound for one that no root holds."""
        self._read_dir(adapter_id)

    def slots_all_pinned(self) -> bool:
        with self._lock:
            keys = self.slots.keys()
            return len(keys) == self.slots.num_slots and all(self.slots.pinned(k) for k in keys)

    def release(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._release_locked(key)

    def _release_locked(self, key: tuple[str, int]) -> None:
        self.slots.release(key)
        if key in self._stale and not self.slots.refs(key):
            self._drop_slot(key)

    def _resident(self, adapter_id: str, refresh: bool = False) -> _Resident:
        with self._lock:
            current = self._host.get(adapter_id)
            if current is not None and not refresh:
                self._host.move_to_end(adapter_id)
                return current
            gate = self._loading.setdefault(adapter_id, threading.Lock())
        with gate:                                   # one reader per adapter; the others wait for it
            directory = self._read_dir(adapter_id)
            signature = _signature(directory)
            with self._lock:
                current = self._host.get(adapter_id)
                if current is not None and current.signature == signature:
                    return current
            adapter = self._read(adapter_id, directory)
            with self._lock:
                return self._publish(adapter_id, adapter, signature)

    def _publish(self, adapter_id: str, adapter: Adapter, signature: tuple) -> _Resident:
        old = self._host.get(adapter_id)
        version = self._versions.get(adapter_id, 0) + 1
        self._versions[adapter_id] = version
        self._host[adapter_id] = _Resident(adapter, version, signature)
        self._host.move_to_end(adapter_id)
        self.loads += 1
        if old is not None:
            self._retire((adapter_id, old.version))
        self._trim_host()
        return self._host[adapter_id]

    def _retire(self, key: tuple[str, int]) -> None:
        """Frees key's slot now, or at its last release when requests still run on it."""
        if key not in self.slots:
            return
        self.slots.pin(key, False)
        if self.slots.refs(key):
            self._stale.add(key)
        else:
            self._drop_slot(key)

    def _drop_slot(self, key: tuple[str, int]) -> None:
        self._stale.discard(key)
        self._failed.discard(key)
        self.buffers.clear(self.slots.remove(key))

    def use_reader(self, reader, copy_runner=None) -> None:
        """Reads made on the calling thread go through `reader` (a ReaderProcess) from now on; other
        threads read in this process. copy_runner(fn), if given, runs this thread's slot copies (the
        engine's between_steps); other threads copy at once."""
        self._readers[threading.get_ident()] = reader
        if copy_runner is not None:
            self._copiers[threading.get_ident()] = copy_runner

    def _read(self, adapter_id: str, directory: Path) -> Adapter:
        reader = self._readers.get(threading.get_ident())
        started, result = time.monotonic(), "error"
        try:
            if reader is not None:
                adapter = reader.read(directory, adapter_id)
            else:
                adapter = read_adapter(directory, adapter_id, self.model, self.max_rank, self.dtype)
            adapter = bind(adapter, self.base_weight)     # DoRA: its scales, once per version
            result = "ok"
            return adapter
        except AdapterFormatError as exc:
            result = "invalid"
            raise FailedPreconditionError(f"adapter {adapter_id!r} cannot be served: {exc}") from None
        finally:
            self.metrics.adapter_read(result, time.monotonic() - started)

    def _trim_host(self) -> None:
        while len(self._host) > 1 and self._host_bytes() > self.host_cache_bytes:
            self._host.popitem(last=False)
            self.metrics.adapter_evicted("host")

    def _host_bytes(self) -> int:
        return sum(r.adapter.size_bytes for r in self._host.values())

    def tiers(self) -> Tiers:
        with self._lock:
            keys = self.slots.keys()
            return Tiers(len(self._host), self._host_bytes(), len(keys), self.slots.num_slots,
                         sum(1 for k in keys if self.slots.refs(k)))

    # ---- administration (the AdapterService) -------------------------------------------------

    def describe(self, adapter_id: str) -> AdapterStatus:
        with self._lock:
            resident = self._host.get(adapter_id)
            if resident is not None:
                return self._status(adapter_id, resident)
        self._read_dir(adapter_id)      # raises NotFound / InvalidArgument for ids not on disk
        return AdapterStatus(adapter_id, "on_disk", "disk")

    def catalog(self) -> list[AdapterStatus]:
        with self._lock:
            loaded = {i: self._status(i, r) for i, r in self._host.items()}
        on_disk = [AdapterStatus(i, "on_disk", "disk") for i in self._scan() if i not in loaded]
        return sorted([*loaded.values(), *on_disk], key=lambda s: s.adapter_id)

    def load(self, adapter_id: str, pin: bool = False) -> AdapterStatus:
        """Reads the adapter now; if its files changed since it was read, publishes a new version. A pinned
        adapter stays pinned: its new version is put in a slot and pinned in place of the old one."""
        with self._lock:
            pin = pin or any(self.slots.pinned(k) for k in self.slots.keys() if k[0] == adapter_id)
        resident = self._resident(adapter_id, refresh=True)
        if pin:
            _, key = self.acquire(adapter_id)
            with self._lock:
                self.slots.pin(key)
                self.slots.release(key)
        with self._lock:
            return self._status(adapter_id, self._host.get(adapter_id, resident))

    def changed_on_disk(self) -> dict[str, tuple]:
        """{adapter id: its files' signature now} for adapters in memory whose files differ from the
        version being served (a deleted directory included)."""
        with self._lock:
            served = {i: r.signature for i, r in self._host.items()}
        now = {i: self._signature_now(i) for i in served}
        return {i: sig for i, sig in now.items() if sig != served[i]}

    def _signature_now(self, adapter_id: str) -> tuple | None:
        try:
            return _signature(self._read_dir(adapter_id))
        except LoraplexError:       # the directory is gone
            return None

    def unload(self, adapter_id: str) -> AdapterStatus:
        """Drops the adapter from memory. Requests running on it finish first (their slot is freed then);
        new requests read it again."""
        with self._lock:
            resident = self._host.pop(adapter_id, None)
            if resident is None:
                raise NotFoundError(f"adapter {adapter_id!r} is not loaded")
            for key in [k for k in self.slots.keys() if k[0] == adapter_id]:
                self._retire(key)
            return AdapterStatus(adapter_id, "unloaded", "disk", resident.version, format=resident.adapter.format)

    def _status(self, adapter_id: str, resident: _Resident) -> AdapterStatus:
        adapter, key = resident.adapter, (adapter_id, resident.version)
        on_device = key in self.slots
        ranks: dict[str, int] = {}
        for (_, target), module in adapter.modules.items():
            ranks[target] = max(ranks.get(target, 0), module.rank)
        running = sum(self.slots.refs(k) for k in self.slots.keys() if k[0] == adapter_id)
        return AdapterStatus(adapter_id, "loaded", "device" if on_device else "host", resident.version,
                             adapter.rank, ranks, adapter.alpha, adapter.target_modules, adapter.format,
                             adapter.size_bytes, on_device and self.slots.pinned(key), running)

    def _read_dir(self, adapter_id: str) -> Path:
        try:
            return resolve_adapter_dir(adapter_id, self.roots)
        except InvalidAdapterId as exc:
            raise InvalidArgumentError("adapter_id", str(exc)) from None
        except AdapterNotFound:
            raise NotFoundError(f"adapter {adapter_id!r} not found") from None

    def _scan(self) -> list[str]:
        """Ids of adapter directories under the roots: name or namespace/name."""
        found = set()
        for root in self.roots:
            for config in list(root.glob("*/adapter_config.json")) + list(root.glob("*/*/adapter_config.json")):
                found.add(config.parent.relative_to(root).as_posix())
        return sorted(found)


def _call(fn):
    return fn()


def _signature(directory: Path) -> tuple:
    return tuple(_stat(directory / name) for name in ("adapter_config.json", "adapter_model.safetensors"))


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
