"""The adapter loader through the server: decoding goes on while an adapter loads, start-up preloading,
and loader threads that never start a torch thread pool of their own."""

import os
import threading

import grpc
import pytest
import torch

from servers import ServerThread
from test_adapters_engine import NEW, long_request, request, root, server  # noqa: F401  (fixtures)


def test_decoding_goes_on_while_an_adapter_loads(tiny_model_dir, root, stub_for, monkeypatch):
    """A slow read (1.5 s, as from a slow disk) happens off the decode loop: a running stream keeps getting
    tokens meanwhile, and the new request starts once its adapter is in."""
    import time

    from loraplex.adapters.reader import ReaderProcess

    real = ReaderProcess.read
    started = threading.Event()

    def slow(self, *args, **kwargs):
        started.set()
        time.sleep(1.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ReaderProcess, "read", slow)
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=2)
    try:
        stub = stub_for(server.target)
        stream = stub.GenerateStream(long_request("", n=1000), timeout=120)
        next(stream)
        loading = stub.Generate.future(request("small"), timeout=60)
        assert started.wait(10)
        during = []
        t_end = time.monotonic() + 1.0                    # well inside the 1.5 s read
        for chunk in stream:
            during.append(time.monotonic())
            if during[-1] > t_end:
                break
        assert not loading.done()                         # still reading
        assert len(during) > 20                           # the base stream went on meanwhile
        assert max(b - a for a, b in zip(during, during[1:])) < 0.5
        assert loading.result().generated_token_count == NEW
        stream.cancel()
    finally:
        server.close()


def test_preload_puts_adapters_in_slots_before_serving(tiny_model_dir, root):
    from loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc

    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_slots=2,
                          adapter_preload="small, team/big")
    try:
        with grpc.insecure_channel(server.target) as channel:
            admin = adapters_pb2_grpc.AdapterServiceStub(channel)
            for adapter_id in ("small", "team/big"):
                info = admin.GetAdapter(apb.GetAdapterRequest(adapter_id=adapter_id), timeout=30)
                assert info.tier == apb.DEVICE and not info.pinned
    finally:
        server.close()
    with pytest.raises(Exception, match="preloading adapter 'foreign' failed"):
        ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_preload="foreign")


def test_loader_threads_keep_torch_work_on_one_thread(server):
    """Loads run beside the engine's thread pool: their torch work must not start a pool of its own, and
    that setting must not leak into other threads (a later engine, say)."""
    assert server.engine.adapters._calls.submit(lambda _: torch.get_num_threads()).result(timeout=30) == 1
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [torch.get_num_threads()]
    assert seen[0] > 1 or (os.cpu_count() or 1) == 1


def test_background_slot_copies_run_on_the_engine_thread_between_steps(tiny_model_dir, root, stub_for,
                                                                       monkeypatch):
    """An administrative load's copy into a slot never overlaps a model step: the engine runs it between two
    steps while the loader thread waits for it. A request's own load copies at once, on the loader thread."""
    from loraplex.adapters.slots import SlotBuffers

    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=2)
    try:
        engine, stepping, copies = server.engine, threading.Event(), []
        real_step, real_write = engine.runner.step, SlotBuffers.write

        def step(*args, **kwargs):
            stepping.set()
            try:
                return real_step(*args, **kwargs)
            finally:
                stepping.clear()

        def write(self, *args, **kwargs):
            copies.append((threading.current_thread().name, stepping.is_set()))
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(engine.runner, "step", step)
        monkeypatch.setattr(SlotBuffers, "write", write)
        stub = stub_for(server.target)
        stream = stub.GenerateStream(long_request("", n=300), timeout=120)
        next(stream)
        engine.adapters.preload("team/big").result(60)     # as LoadAdapter --pin
        assert copies == [("loraplex-engine", False)]
        assert stub.Generate(request("small"), timeout=60).generated_token_count == NEW
        assert copies[1][0] == "loraplex-adapter-loader"
        stream.cancel()
    finally:
        server.close()
    # with the loop stopped, a copy runs on the thread that asks for it
    assert engine.between_steps(threading.current_thread) is threading.current_thread()


@pytest.mark.parametrize("held", [True, False], ids=["between-steps", "beside-steps"])
def test_reads_a_request_waits_for_run_between_steps_when_asked(tiny_model_dir, root, stub_for, monkeypatch, held):
    """--adapter-reads-between-steps: a request's read runs on the loader thread while the engine starts no
    step, and the running stream goes on after it; without it (the default) steps run beside the read."""
    import time

    from loraplex.adapters.reader import ReaderProcess

    real_read = ReaderProcess.read
    reads, steps = [], []

    def slow_read(self, directory, adapter_id):
        if adapter_id != "small":
            return real_read(self, directory, adapter_id)
        start = time.monotonic()
        time.sleep(0.4)                            # as a slow disk: long enough for several steps
        try:
            return real_read(self, directory, adapter_id)
        finally:
            reads.append((threading.current_thread().name, start, time.monotonic()))

    monkeypatch.setattr(ReaderProcess, "read", slow_read)
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=2, adapter_reads_between_steps=held)
    try:
        engine = server.engine
        real_step = engine.runner.step

        def step(*args, **kwargs):
            steps.append(time.monotonic())
            return real_step(*args, **kwargs)

        monkeypatch.setattr(engine.runner, "step", step)
        stub = stub_for(server.target)
        # a first adapter waits for the reader process to start (seconds, on 2 cores), so that the stream's
        # tokens are not spent before the read under test begins
        assert stub.Generate(request("all"), timeout=60).generated_token_count == NEW
        stream = stub.GenerateStream(long_request("", n=400), timeout=120)
        next(stream)
        assert stub.Generate(request("small"), timeout=60).generated_token_count == NEW
        assert next(stream).generated_token_count > 0     # the stream goes on after the read
        stream.cancel()
    finally:
        server.close()
    (thread, start, end), = reads
    assert thread == "loraplex-adapter-loader"
    assert steps[-1] > end, "the stream ended before the read did, so the check below would mean nothing"
    during = [t for t in steps if start < t < end]
    assert (during == []) if held else (len(during) > 3)
