"""`--adapter-watch-seconds`: loaded adapters whose files change are published as a new version once the
files hold still; files that cannot be served are tried once, then again only when they change."""

import shutil

from servers import ServerThread
from test_adapters_engine import _wait, request, root  # noqa: F401  (root is a fixture)


def test_watch_publishes_changed_files_as_a_new_version(tiny_model_dir, root, stub_for, tmp_path):
    watched = tmp_path / "watched"
    for name in ("small", "all"):
        shutil.copytree(root / name, watched / name)
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(watched),
                          adapter_slots=4, max_lora_rank=64, adapter_watch_seconds=0.1)
    try:
        stub = stub_for(server.target)
        small = [t.token_id for t in stub.Generate(request("small"), timeout=60).tokens]
        other = [t.token_id for t in stub.Generate(request("all"), timeout=60).tokens]
        assert small != other
        for name in ("adapter_model.safetensors", "adapter_config.json"):   # the files of "all" become "small"'s
            shutil.copy(watched / "all" / name, watched / "small" / name)
        assert _wait(lambda: server.engine.adapters.describe("small").version == 2, timeout=20)
        assert [t.token_id for t in stub.Generate(request("small"), timeout=60).tokens] == other
        assert server.engine.adapters.describe("all").version == 1            # unchanged files: no new version
    finally:
        server.close()


def test_watcher_waits_for_files_to_hold_still():
    from concurrent.futures import Future

    from loraplex.adapters.watch import AdapterWatcher

    class Registry:
        signatures = iter([{"a": 1}, {"a": 2}, {"a": 2}, {}])
        loads = []

        def changed_on_disk(self):
            return next(self.signatures)

        def load(self, adapter_id):
            self.loads.append(adapter_id)
            return type("Status", (), {"version": 2})()

    def call(fn):
        future = Future()
        future.set_result(fn())
        return future

    registry = Registry()
    watcher = AdapterWatcher(registry.changed_on_disk, lambda a: call(lambda: registry.load(a)), interval=3600)
    try:
        assert [watcher.poll() for _ in range(4)] == [[], [], ["a"], []]
        assert registry.loads == ["a"]
    finally:
        watcher.stop()


def test_watcher_tries_refused_files_once_until_they_change():
    from concurrent.futures import Future

    from loraplex.adapters.watch import AdapterWatcher
    from loraplex.server.errors import NotFoundError

    class Registry:
        signatures = iter([{"gone": None}] * 4 + [{"gone": 7}] * 2)
        loads = []

        def changed_on_disk(self):
            return next(self.signatures)

        def load(self, adapter_id):
            self.loads.append(adapter_id)
            raise NotFoundError(f"adapter {adapter_id!r} not found")

    def call(fn):
        future = Future()
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)
        return future

    registry = Registry()
    watcher = AdapterWatcher(registry.changed_on_disk, lambda a: call(lambda: registry.load(a)), interval=3600)
    try:
        assert [watcher.poll() for _ in range(6)] == [[], ["gone"], [], [], [], ["gone"]]
        assert registry.loads == ["gone", "gone"]      # once for the deleted files, once when new ones came
    finally:
        watcher.stop()
