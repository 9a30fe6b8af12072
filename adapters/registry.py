"""Which adapters exist and where they are: disk (the configured roots) -> host memory (LRU by bytes)
-> device slots (a fixed number, LRU among those no request uses).

A request's adapter is acquired when the request is added (on the caller's thread, so reading and
validating files never stalls the decode loop) and released when it finishes. Concurrent first requests
for one adapter read it once: they wait on that adapter's lock while the first one loads it.
"""

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..server.errors import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError)
from ..server.model.config import ModelConfig
from .canonical import Adapter
from .ids import AdapterNotFound, InvalidAdapterId, resolve_adapter_dir
from .peft_lora import AdapterFormatError, load_peft_lora
from .slots import NoFreeSlot, SlotBuffers, SlotTable


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
        try:
            directory = resolve_adapter_dir(adapter_id, self.roots)
            return load_peft_lora(directory, adapter_id, self.model, self.max_rank, self.dtype)
        except InvalidAdapterId as exc:
            raise InvalidArgumentError("adapter_id", str(exc)) from None
        except AdapterNotFound:
            raise NotFoundError(f"adapter {adapter_id!r} not found") from None
        except AdapterFormatError as exc:
            raise FailedPreconditionError(f"adapter {adapter_id!r} cannot be served: {exc}") from None

    def _trim_host(self) -> None:
        while len(self._host) > 1 and sum(a.size_bytes for a in self._host.values()) > self.host_cache_bytes:
            self._host.popitem(last=False)
