"""Which adapters exist and where they are: disk (the configured roots) -> host memory (LRU by bytes)
-> device slots (a fixed number, LRU among those no request uses).

A request's adapter is acquired when the request is added (on the caller's thread, so reading and
validating files never stalls the decode loop) and released when it finishes. Concurrent first requests
for one adapter read it once: they wait on that adapter's lock while the first one loads it.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..server.errors import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError)
from ..server.model.config import ModelConfig
from .canonical import Adapter
from .ids import AdapterNotFound, InvalidAdapterId, resolve_adapter_dir
from .peft_lora import AdapterFormatError, load_peft_lora
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


class AdapterRegistry:
    def __init__(self, roots: list[Path], model: ModelConfig, buffers: SlotBuffers, num_slots: int,
                 max_rank: int, host_cache_bytes: int, dtype: torch.dtype = torch.float32):
        self.roots = roots
        self.model = model
        self.buffers = buffers
        self.slots = SlotTable(num_slots)
        self.max_rank = max_rank
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._host: OrderedDict[str, Adapter] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()                            # guards _host, slots and buffers
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def acquire(self, adapter_id: str) -> int:
        """The device slot holding adapter_id, with one more reference; loads it when needed."""
        adapter = self._host_copy(adapter_id)
        with self._lock:
            try:
                slot, _, fresh = self.slots.acquire(adapter_id)
            except NoFreeSlot as exc:
                raise ResourceExhaustedError(str(exc)) from None
            if fresh:
                self.buffers.write(slot, adapter)   # the slot's old adapter has no running request
            return slot

    def release(self, adapter_id: str) -> None:
        with self._lock:
            self.slots.release(adapter_id)

    def _host_copy(self, adapter_id: str) -> Adapter:
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                return self._host[adapter_id]
            gate = self._loading.setdefault(adapter_id, threading.Lock())
        with gate:                                   # one reader per adapter; the others wait for it
            with self._lock:
                if adapter_id in self._host:
                    return self._host[adapter_id]
            adapter = self._read(adapter_id)
            with self._lock:
                self._host[adapter_id] = adapter
                self.loads += 1
                self._trim_host()
                self._loading.pop(adapter_id, None)
            return adapter

    def _read(self, adapter_id: str) -> Adapter:
        directory = self._read_dir(adapter_id)
        try:
            return load_peft_lora(directory, adapter_id, self.model, self.max_rank, self.dtype)
        except AdapterFormatError as exc:
            raise FailedPreconditionError(f"adapter {adapter_id!r} cannot be served: {exc}") from None

    def _trim_host(self) -> None:
        while len(self._host) > 1 and sum(a.size_bytes for a in self._host.values()) > self.host_cache_bytes:
            self._host.popitem(last=False)

    # ---- administration (the AdapterService) -------------------------------------------------

    def describe(self, adapter_id: str) -> AdapterStatus:
        with self._lock:
            adapter = self._host.get(adapter_id)
            if adapter is not None:
                return self._status(adapter)
        self._read_dir(adapter_id)      # raises NotFound / InvalidArgument for ids not on disk
        return AdapterStatus(adapter_id, "on_disk", "disk")

    def catalog(self) -> list[AdapterStatus]:
        with self._lock:
            loaded = {a.adapter_id: self._status(a) for a in self._host.values()}
        on_disk = [AdapterStatus(i, "on_disk", "disk") for i in self._scan() if i not in loaded]
        return sorted([*loaded.values(), *on_disk], key=lambda s: s.adapter_id)

    def load(self, adapter_id: str, pin: bool = False) -> AdapterStatus:
        adapter = self._host_copy(adapter_id)
        if pin:
            self.acquire(adapter_id)
            with self._lock:
                self.slots.pin(adapter_id)
                self.slots.release(adapter_id)
        with self._lock:
            return self._status(adapter)

    def unload(self, adapter_id: str) -> AdapterStatus:
        with self._lock:
            adapter = self._host.get(adapter_id)
            if adapter is None:
                raise NotFoundError(f"adapter {adapter_id!r} is not loaded")
            if adapter_id in self.slots:
                if self.slots.refs(adapter_id):
                    raise FailedPreconditionError(f"adapter {adapter_id!r} is used by "
                                                  f"{self.slots.refs(adapter_id)} running request(s)")
                self.buffers.clear(self.slots.remove(adapter_id))
            del self._host[adapter_id]
            return AdapterStatus(adapter_id, "unloaded", "disk", format=adapter.format)

    def _status(self, adapter: Adapter) -> AdapterStatus:
        on_device = adapter.adapter_id in self.slots
        ranks: dict[str, int] = {}
        for (_, target), module in adapter.modules.items():
            ranks[target] = max(ranks.get(target, 0), module.rank)
        return AdapterStatus(adapter.adapter_id, "loaded", "device" if on_device else "host", 1, adapter.rank,
                             ranks, adapter.alpha, adapter.target_modules, adapter.format, adapter.size_bytes,
                             on_device and self.slots.pinned(adapter.adapter_id),
                             self.slots.refs(adapter.adapter_id) if on_device else 0)

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
