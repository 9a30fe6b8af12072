"""A pinned adapter stays pinned when a new version of it is published, by LoadAdapter or by the watcher."""

import shutil

from loraplex.v1 import adapters_pb2 as apb
from test_adapters_engine import admin, long_request, root, server  # noqa: F401  (fixtures)


def info(admin, adapter_id):
    return admin.GetAdapter(apb.GetAdapterRequest(adapter_id=adapter_id), timeout=30)


def test_pin_survives_a_new_version(server, admin, stub_for, root):
    shutil.copytree(root / "small", root / "pinned")
    try:
        v1 = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="pinned", pin=True), timeout=60)
        assert v1.pinned and v1.tier == apb.DEVICE
        for name in ("adapter_config.json", "adapter_model.safetensors"):   # continued training lands
            shutil.copy(root / "all" / name, root / "pinned" / name)
        v2 = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="pinned"), timeout=60)   # as the watcher does
        assert v2.version == v1.version + 1
        assert v2.pinned and v2.tier == apb.DEVICE
        now = info(admin, "pinned")
        assert now.pinned and now.version == v2.version
        keys = [k for k in server.engine.adapters.registry.slots.keys() if k[0] == "pinned"]
        assert keys == [("pinned", v2.version)]                  # the old version's slot is free again
        want = stub_for(server.target).Generate(long_request("all"), timeout=120).tokens
        got = stub_for(server.target).Generate(long_request("pinned"), timeout=120).tokens
        assert [t.token_id for t in got] == [t.token_id for t in want]
    finally:
        admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="pinned"), timeout=30)
        shutil.rmtree(root / "pinned")
