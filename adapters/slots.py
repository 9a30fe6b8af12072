"""Device slots: a fixed number of places for adapters next to the model, preallocated at start-up.

`SlotTable` is the bookkeeping (pure, no tensors): which adapter version sits in which slot, how many
running requests use it, which are pinned, and which slot to reuse (least recently used among the
unused). `SlotBuffers` holds the tensors: per target module one stacked A and one stacked B buffer over
all layers and slots; putting an adapter in a slot is a copy into its rows, so nothing is allocated
while serving.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import native

from .canonical import Adapter


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter that running requests use (or that is pinned)."""


@dataclass
class _Entry:
    slot: int
    refs: int = 0
    pinned: bool = False


class SlotTable:
    """Keys are whatever identifies one adapter version, e.g. (adapter_id, version)."""

    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError("num_slots must be positive")
        self.num_slots = num_slots
        self._entries: OrderedDict[object, _Entry] = OrderedDict()   # least recently used first
        self._free = list(range(num_slots - 1, -1, -1))

    def __contains__(self, key) -> bool:
        return key in self._entries

    def slot_of(self, key) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.slot

    def acquire(self, key) -> tuple[int, object | None, bool]:
        """A slot for key, with one more reference: (slot, key evicted to make room or None, whether the
        slot must be written). Raises NoFreeSlot when every slot is in use or pinned."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.refs += 1
            return entry.slot, None, False
        evicted = None
        if not self._free:
            evicted = self._victim()
            self._free.append(self._entries.pop(evicted).slot)
        self._entries[key] = _Entry(self._free.pop(), refs=1)
        return self._entries[key].slot, evicted, True

    def release(self, key) -> None:
        entry = self._entries[key]
        if entry.refs <= 0:
            raise ValueError(f"{key!r} has no reference to release")
        entry.refs -= 1

    def pin(self, key, pinned: bool = True) -> None:
        self._entries[key].pinned = pinned

    def remove(self, key) -> int:
        """Frees key's slot; refused while requests use it."""
        entry = self._entries[key]
        if entry.refs:
            raise ValueError(f"{key!r} is used by {entry.refs} running request(s)")
        del self._entries[key]
        self._free.append(entry.slot)
        return entry.slot

    def keys(self) -> list:
        return list(self._entries)

    def pinned(self, key) -> bool:
        return self._entries[key].pinned

    def refs(self, key) -> int:
        return self._entries[key].refs

    @property
    def used(self) -> int:
        return len(self._entries)

    def _victim(self):
        for key, entry in self._entries.items():
            if not entry.refs and not entry.pinned:
                return key
        raise NoFreeSlot(f"all {self.num_slots} adapter slots are in use by running requests or pinned")


class SlotBuffers:
    """a[target]: [num_layers, num_slots, max_rank, in]; b[target]: [num_layers, num_slots, out, max_rank];
    ranks[target]: [num_layers, num_slots] (0 = the adapter does not touch that module);
    scale[target]: [num_layers, num_slots + 1, out] float32, DoRA's output scales, for slots where
    scaled[slot]; the last row is all ones.

    With the CPU kernels and float32 buffers (`keeps_16bit`), an adapter saved in bfloat16 or float16 is
    copied in as saved, packed at the start of its slot's rows, which the kernels widen:
    stored[target]: [num_layers, num_slots] int64 (0 float32, 1 bfloat16, 2 float16) and
    b_scale[target]: [num_layers, num_slots] float32, the scaling of such a slot's b (csrc/lora_cpu.cpp)."""

    def __init__(self, num_slots: int, max_rank: int, num_layers: int, shapes: dict[str, tuple[int, int]],
                 dtype: torch.dtype, device: torch.device):
        self.max_rank = max_rank
        self.a = {t: torch.zeros(num_layers, num_slots, max_rank, i, dtype=dtype, device=device)
                  for t, (i, _) in shapes.items()}
        self.b = {t: torch.zeros(num_layers, num_slots, o, max_rank, dtype=dtype, device=device)
                  for t, (_, o) in shapes.items()}
        self.ranks = {t: torch.zeros(num_layers, num_slots, dtype=torch.long) for t in shapes}
        # What the ops read: the host ranks themselves on the CPU, a mirror next to the buffers elsewhere
        # (a GPU kernel reads ranks on the device; slot writes are rare, so the mirror is updated there).
        self.device_ranks = self.ranks if torch.device(device).type == "cpu" else {
            t: r.to(device) for t, r in self.ranks.items()}
        self._native = torch.device(device).type == "cpu" and native.available()
        self.keeps_16bit = self._native and dtype == torch.float32
        self.stored = {t: torch.zeros(num_layers, num_slots, dtype=torch.long) for t in shapes}
        self.b_scale = {t: torch.ones(num_layers, num_slots, dtype=torch.float32) for t in shapes}
        # DoRA's per-output scales, float32 whatever the compute dtype; read only for slots marked `scaled`.
        # One more row, never written, stays 1: the row of every token whose slot is not scaled.
        self.scale = {t: torch.ones(num_layers, num_slots + 1, o, dtype=torch.float32, device=device)
                      for t, (_, o) in shapes.items()}
        self.unscaled_row = num_slots
        self.scaled = [False] * num_slots

    def write(self, slot: int, adapter: Adapter) -> None:
        """Copies the adapter into the slot; modules it lacks get rank 0. Rows past a module's rank keep
        whatever they held: the ops never read a slot past its rank (and every value ever written is a
        validated finite one), so a write costs only the adapter's own bytes."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.adapter_id!r} has rank {adapter.rank}, slots hold {self.max_rank}")
        if self._native:
            # One call (see csrc/lora_cpu.cpp): loads run beside decoding, and each small torch call from this
            # thread is a point where the decode thread may have to wait for the interpreter lock.
            order = {t: i for i, t in enumerate(self.a)}
            modules = adapter.modules
            torch.ops.loraplex.slot_write(list(self.a.values()), list(self.b.values()), list(self.ranks.values()),
                                          list(self.stored.values()), list(self.b_scale.values()),
                                          slot, [v for layer, t in modules for v in (order[t], layer)],
                                          [m.a for m in modules.values()], [m.b for m in modules.values()],
                                          [1.0 if m.b_scale is None else m.b_scale for m in modules.values()])
        else:
            self._write_torch(slot, adapter)
        self._write_scales(slot, adapter)

    def _write_torch(self, slot: int, adapter: Adapter) -> None:
        self.clear(slot)
        dst, src = [], []
        for (layer, target), module in adapter.modules.items():
            r = module.rank
            dst += [self.a[target][layer, slot, :r], self.b[target][layer, slot, :, :r]]
            src += list(module.factors())       # widened here: only the CPU kernels read 16-bit slots
            self.ranks[target][layer, slot] = r
        # One fused call for all copies: loads run beside decoding, so their Python time counts.
        torch._foreach_copy_(dst, _on_device(src, dst[0].device), non_blocking=True)
        self._mirror(slot)

    def _write_scales(self, slot: int, adapter: Adapter) -> None:
        """A DoRA adapter's output scales (1 for modules it lacks); other adapters' slots are never scaled."""
        if not adapter.scaled:
            self.scaled[slot] = False
            return
        for scale in self.scale.values():
            scale[:, slot] = 1.0        # modules the adapter lacks
        scaled = [(key, m.output_scale) for key, m in adapter.modules.items() if m.output_scale is not None]
        dst = [self.scale[target][layer, slot] for (layer, target), _ in scaled]
        torch._foreach_copy_(dst, _on_device([s for _, s in scaled], dst[0].device), non_blocking=True)
        self.scaled[slot] = True

    def clear(self, slot: int) -> None:
        """The slot holds no adapter: rank 0 everywhere, so no op reads its rows."""
        self.scaled[slot] = False
        for ranks in self.ranks.values():
            ranks[:, slot] = 0
        self._mirror(slot)

    def _mirror(self, slot: int) -> None:
        if self.device_ranks is not self.ranks:
            for target, ranks in self.ranks.items():
                self.device_ranks[target][:, slot].copy_(ranks[:, slot], non_blocking=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values(), *self.scale.values()))



def _on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors, on `device` through one host-to-device copy when it is not the CPU: a load's hundreds
    of small copies from pageable host memory would each be a transfer of its own, each waiting for the
    device, beside the engine's kernels."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
