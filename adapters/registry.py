"""The bookkeeping of adapters in memory: host memory (LRU by bytes, one published version per id) and
the device slots (a fixed number, LRU among those no request uses).

Pure state under one lock: no files, no tensors, no threads of its own, no calls out. Whoever calls
passes what a method needs (the adapter it read, the key it holds). The loader (`loader.py`) publishes
what it reads and copies adapters into the slots it reserves here; the engine takes and releases
references. A freed slot keeps its bytes: nothing reads a slot that no reference points at, and the next
write into it sets every module's rank (SlotBuffers.write).

Slot keys are (adapter_id, version): a reloaded adapter gets a new version and a new slot, while requests
already running keep the slot of the version they started with until they finish.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..server.errors import NotFoundError
from ..server.metrics import NO_METRICS
from .canonical import Adapter
from .slots import NoFreeSlot, SlotTable


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
class Resident:
    adapter: Adapter
    version: int
    signature: tuple          # (mtime_ns, size) of its files when read: a change means a new version


@dataclass(frozen=True)
class Binding:
    """One reference on an adapter version's slot."""
    slot: int
    key: tuple[str, int]


@dataclass(frozen=True)
class Reservation:
    binding: Binding
    must_write: bool          # the slot is new: the caller copies the adapter in, then calls written()


class AdapterRegistry:
    def __init__(self, num_slots: int, host_cache_bytes: int):
        self.slots = SlotTable(num_slots)
        self.host_cache_bytes = host_cache_bytes
        self._host: OrderedDict[str, Resident] = OrderedDict()    # least recently used first
        self._versions: dict[str, int] = {}                       # last version published per id
        self._stale: set[tuple[str, int]] = set()                 # slot keys to free at their last release
        self._writing: set[tuple[str, int]] = set()               # slot keys whose copy is under way
        self._failed: set[tuple[str, int]] = set()                # slot keys whose copy raised
        self._lock = threading.Lock()                             # guards everything above
        self._written = threading.Condition(self._lock)           # signalled when a slot copy ends
        self.loads = 0                                            # versions published
        self.metrics = NO_METRICS                                 # evictions are counted here

    # ---- host memory -------------------------------------------------------------------------

    def resident(self, adapter_id: str) -> Resident | None:
        """The published version in host memory (now the most recently used), or None."""
        with self._lock:
            current = self._host.get(adapter_id)
            if current is not None:
                self._host.move_to_end(adapter_id)
            return current

    def publish(self, adapter_id: str, adapter: Adapter, signature: tuple) -> Resident:
        """Makes `adapter` the id's next version. The previous version's slot is freed now, or at its last
        release while requests still run on it; a pin moves to the new one only through load's re-pin
        (see loader.py)."""
        with self._lock:
            old = self._host.get(adapter_id)
            version = self._versions.get(adapter_id, 0) + 1
            self._versions[adapter_id] = version
            self._host[adapter_id] = resident = Resident(adapter, version, signature)
            self.loads += 1
            if old is not None:
                self._retire((adapter_id, old.version))
            self._trim_host()
            return resident

    def unload(self, adapter_id: str) -> AdapterStatus:
        """Drops the adapter from host memory. Requests running on it finish first (their slot is freed at
        the last release); new requests read it again."""
        with self._lock:
            resident = self._host.pop(adapter_id, None)
            if resident is None:
                raise NotFoundError(f"adapter {adapter_id!r} is not loaded")
            for key in self._keys_of(adapter_id):
                self._retire(key)
            return AdapterStatus(adapter_id, "unloaded", "disk", resident.version, format=resident.adapter.format)

    def served_signatures(self) -> dict[str, tuple]:
        """{adapter id: the signature of the files its served version was read from}."""
        with self._lock:
            return {i: r.signature for i, r in self._host.items()}

    def _trim_host(self) -> None:
        while len(self._host) > 1 and self._host_bytes() > self.host_cache_bytes:
            self._host.popitem(last=False)
            self.metrics.adapter_evicted("host")

    def _host_bytes(self) -> int:
        return sum(r.adapter.size_bytes for r in self._host.values())

    # ---- device slots ------------------------------------------------------------------------

    def on_device(self, adapter_id: str) -> Binding | None:
        """A reference on the slot of adapter_id's current version when it already sits, written, in one;
        None otherwise."""
        with self._lock:
            resident = self._host.get(adapter_id)
            if resident is None:
                return None
            key = (adapter_id, resident.version)
            if key not in self.slots or key in self._writing or key in self._failed:
                return None
            self._host.move_to_end(adapter_id)
            slot, _, _ = self.slots.acquire(key)
            return Binding(slot, key)

    def reserve(self, adapter_id: str, resident: Resident) -> Reservation | None:
        """A reference on a slot for that version, or None when every slot is busy (retry after a release).
        must_write: the slot is new and the caller must copy the adapter in, then call written()."""
        key = (adapter_id, resident.version)
        with self._lock:
            try:
                slot, evicted, fresh = self.slots.acquire(key)
            except NoFreeSlot:
                return None
            if evicted is not None:
                self.metrics.adapter_evicted("device")
            if fresh:
                self._writing.add(key)
            return Reservation(Binding(slot, key), fresh)

    def written(self, key: tuple[str, int], ok: bool) -> None:
        """The copy into key's slot ended. When it failed, the caller's reference is dropped and the slot
        is freed at its last release."""
        with self._lock:
            self._writing.discard(key)
            self._written.notify_all()
            if not ok:
                self._failed.add(key)
                self._stale.add(key)
                self._release_locked(key)

    def wait_written(self, key: tuple[str, int]) -> bool:
        """Waits while another caller copies key's slot. False when that copy failed: the caller then
        releases its reference, and the last release frees the slot."""
        with self._lock:
            while key in self._writing:
                self._written.wait()
            return key not in self._failed

    def release(self, key: tuple[str, int]) -> None:
        """Drops one reference (a retired version's slot is freed at its last)."""
        with self._lock:
            self._release_locked(key)

    def pin(self, key: tuple[str, int]) -> None:
        with self._lock:
            self.slots.pin(key)

    def pinned(self, adapter_id: str) -> bool:
        """Whether some version of the adapter is pinned in a slot."""
        with self._lock:
            return any(self.slots.pinned(k) for k in self._keys_of(adapter_id))

    def all_pinned(self) -> bool:
        with self._lock:
            keys = self.slots.keys()
            return len(keys) == self.slots.num_slots and all(self.slots.pinned(k) for k in keys)

    def _release_locked(self, key: tuple[str, int]) -> None:
        self.slots.release(key)
        if key in self._stale and not self.slots.refs(key):
            self._drop_slot(key)

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
        self.slots.remove(key)

    def _keys_of(self, adapter_id: str) -> list[tuple[str, int]]:
        return [k for k in self.slots.keys() if k[0] == adapter_id]

    # ---- what it holds -----------------------------------------------------------------------

    def tiers(self) -> Tiers:
        with self._lock:
            keys = self.slots.keys()
            return Tiers(len(self._host), self._host_bytes(), len(keys), self.slots.num_slots,
                         sum(1 for k in keys if self.slots.refs(k)))

    def status(self, adapter_id: str, read: Resident | None = None) -> AdapterStatus | None:
        """The loaded adapter's status (else that of `read`, a version just read that host memory has
        already let go); None when neither is there."""
        with self._lock:
            resident = self._host.get(adapter_id, read)
            return None if resident is None else self._status(adapter_id, resident)

    def statuses(self) -> dict[str, AdapterStatus]:
        with self._lock:
            return {i: self._status(i, r) for i, r in self._host.items()}

    def _status(self, adapter_id: str, resident: Resident) -> AdapterStatus:
        adapter, key = resident.adapter, (adapter_id, resident.version)
        on_device = key in self.slots
        ranks: dict[str, int] = {}
        for (_, target), module in adapter.modules.items():
            ranks[target] = max(ranks.get(target, 0), module.rank)
        running = sum(self.slots.refs(k) for k in self._keys_of(adapter_id))
        return AdapterStatus(adapter_id, "loaded", "device" if on_device else "host", resident.version,
                             adapter.rank, ranks, adapter.alpha, adapter.target_modules, adapter.format,
                             adapter.size_bytes, on_device and self.slots.pinned(key), running)
