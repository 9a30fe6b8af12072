"""The adapter registry as pure bookkeeping, table-tested: versions, references, slot copies under way or
failed, pins and host memory. No files, no threads, no tensors beyond the adapters handed to it."""

import pytest

from loraplex.adapters.registry import AdapterRegistry
from loraplex.server.errors import NotFoundError
from test_slots import adapter


def published(registry: AdapterRegistry, adapter_id: str, seed: int = 0, signature=(1,)):
    return registry.publish(adapter_id, adapter(2, seed), signature)


def in_slot(registry: AdapterRegistry, adapter_id: str):
    """A reference on the adapter's slot, copied in (as the loader does)."""
    reserved = registry.reserve(adapter_id, registry.resident(adapter_id))
    if reserved.must_write:
        registry.written(reserved.binding.key, ok=True)
    return reserved.binding


def test_each_publish_is_a_new_version_and_the_old_slot_goes_at_its_last_release():
    registry = AdapterRegistry(num_slots=2, host_cache_bytes=2**30)
    assert published(registry, "a").version == 1
    old = in_slot(registry, "a")
    assert published(registry, "a", seed=1, signature=(2,)).version == 2
    assert old.key in registry.slots                     # a request still runs on version 1
    assert registry.on_device("a") is None               # new requests get version 2, not yet in a slot
    registry.release(old.key)
    assert old.key not in registry.slots and registry.loads == 2


@pytest.mark.parametrize("copy_ok", [True, False])
def test_no_reference_is_handed_out_for_a_slot_whose_copy_is_under_way_or_failed(copy_ok):
    registry = AdapterRegistry(num_slots=1, host_cache_bytes=2**30)
    resident = published(registry, "a")
    first = registry.reserve("a", resident)
    assert first.must_write and registry.on_device("a") is None          # still being copied
    second = registry.reserve("a", resident)
    assert not second.must_write                                        # it waits for the first copy
    registry.written(first.binding.key, ok=copy_ok)
    assert registry.wait_written(first.binding.key) is copy_ok
    if copy_ok:
        assert registry.on_device("a") == first.binding
    else:
        assert registry.on_device("a") is None
        registry.release(second.binding.key)                            # the waiter gives up its reference
        assert first.binding.key not in registry.slots                  # freed at the last release
        assert registry.reserve("a", resident).must_write               # the next try copies anew


def test_every_slot_busy_is_none_and_pins_survive_only_through_a_re_pin():
    registry = AdapterRegistry(num_slots=1, host_cache_bytes=2**30)
    published(registry, "a"), published(registry, "b")
    a = in_slot(registry, "a")
    assert registry.reserve("b", registry.resident("b")) is None        # a request runs on the only slot
    registry.pin(a.key)
    registry.release(a.key)
    assert registry.all_pinned() and registry.pinned("a")
    assert registry.reserve("b", registry.resident("b")) is None        # pinned: never evicted
    published(registry, "a", seed=1, signature=(2,))
    assert not registry.pinned("a") and not registry.all_pinned()       # the old version's slot is free


def test_host_memory_keeps_the_most_recently_used_within_its_bytes():
    one = adapter(2, 0).size_bytes
    registry = AdapterRegistry(num_slots=2, host_cache_bytes=2 * one)
    for adapter_id in ("a", "b"):
        published(registry, adapter_id)
    registry.resident("a")                                               # a is now more recent than b
    published(registry, "c")
    assert registry.resident("b") is None and registry.resident("a") and registry.resident("c")
    status = registry.unload("a")
    assert (status.state, status.version) == ("unloaded", 1) and registry.status("a") is None
    with pytest.raises(NotFoundError):
        registry.unload("a")


def test_status_counts_running_requests_and_tiers_count_busy_slots():
    registry = AdapterRegistry(num_slots=2, host_cache_bytes=2**30)
    published(registry, "a")
    assert registry.status("a").tier == "host"
    first = in_slot(registry, "a")
    assert registry.on_device("a") == first
    status, tiers = registry.status("a"), registry.tiers()
    assert (status.tier, status.running_requests, status.rank) == ("device", 2, 2)
    assert (tiers.host, tiers.device, tiers.slots_total, tiers.slots_busy) == (1, 1, 2, 1)
    registry.release(first.key), registry.release(first.key)
    assert registry.tiers().slots_busy == 0 and registry.status("a").running_requests == 0
