"""Slot bookkeeping (table-tested) and the stacked buffers (against the adapter's own tensors)."""

import pytest
import torch

from loraplex.adapters import native
from loraplex.adapters.canonical import Adapter, LoraModule
from loraplex.adapters.slots import NoFreeSlot, SlotBuffers, SlotTable


def test_acquire_reuses_a_resident_adapter():
    table = SlotTable(2)
    assert table.acquire("a") == (0, None, True)
    assert table.acquire("a") == (0, None, False)
    assert table.refs("a") == 2


def test_least_recently_used_unreferenced_slot_is_reused():
    table = SlotTable(2)
    table.acquire("a"), table.acquire("b")
    table.release("a"), table.release("b")
    table.acquire("a"), table.release("a")          # a is now more recent than b
    slot_b = table.slot_of("b")
    assert table.acquire("c") == (slot_b, "b", True)
    assert "b" not in table and table.slot_of("a") is not None


@pytest.mark.parametrize("hold", ["refs", "pin"])
def test_adapters_in_use_or_pinned_are_never_evicted(hold):
    table = SlotTable(1)
    table.acquire("a")
    if hold == "pin":
        table.pin("a")
        table.release("a")
    with pytest.raises(NoFreeSlot):
        table.acquire("b")
    assert table.slot_of("a") == 0


def test_remove_is_refused_while_referenced():
    table = SlotTable(1)
    table.acquire("a")
    with pytest.raises(ValueError, match="running"):
        table.remove("a")
    table.release("a")
    assert table.remove("a") == 0 and table.used == 0
    table.acquire("b")
    table.release("b")
    with pytest.raises(ValueError, match="no reference"):
        table.release("b")


def adapter(rank: int, seed: int, targets=("q_proj", "down_proj")) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (8, 8), "down_proj": (16, 8)}
    modules = {(layer, t): LoraModule(torch.randn(rank, shapes[t][0], generator=g),
                                      torch.randn(shapes[t][1], rank, generator=g))
               for layer in range(2) for t in targets}
    return Adapter(adapter_id=f"x{seed}", modules=modules, alpha=float(rank), source="test")


@pytest.mark.parametrize("native_copy", [True, False], ids=["native", "torch"])
def test_buffers_hold_each_adapters_delta_and_rewrites_retire_old_rows(native_copy):
    """A smaller adapter over a bigger one: its live rows give its delta, and the old adapter's rows and
    modules are retired by rank (the ops never read past a slot's rank; tests/test_lora_ops.py fills those
    rows with huge values to prove it)."""
    buffers = SlotBuffers(2, 8, 2, {"q_proj": (8, 8), "down_proj": (16, 8)}, torch.float32, torch.device("cpu"))
    assert buffers._native or not native.enabled()   # make install builds the kernels; --no-native-kernels opts out
    if native_copy and not buffers._native:
        pytest.skip("native kernels turned off (LORAPLEX_NATIVE_KERNELS=0)")
    buffers._native = native_copy
    big, small = adapter(8, 1), adapter(2, 2, targets=("q_proj",))
    buffers.write(0, big)
    buffers.write(0, small)     # a smaller adapter over a bigger one: old rows must not leak
    for (layer, t), m in small.modules.items():
        r = int(buffers.ranks[t][layer, 0])
        a, b = buffers.a[t][layer, 0, :r], buffers.b[t][layer, 0, :, :r]
        torch.testing.assert_close(b @ a, m.b @ m.a)
    assert int(buffers.ranks["down_proj"][:, 0].sum()) == 0
    assert buffers.ranks["q_proj"][:, 0].tolist() == [2, 2]
    with pytest.raises(ValueError, match="rank 16"):
        buffers.write(1, adapter(16, 3))
