"""Lifecycle of a real `loraplex serve` process: SIGTERM drains (NOT_SERVING at once, new calls UNAVAILABLE,
running streams and one still queued complete, exit 0; the grace period bounds the wait), and an engine
failure turns health NOT_SERVING and ends `serve` with status 1 while the request in flight gets its error."""

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.config import ServerConfig
from loraplex.server.main import EXIT_ENGINE_FAILED, serve
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def spawn(model_dir, grace: int, *flags: str) -> tuple[subprocess.Popen, str, int]:
    """The process, its gRPC target and its metrics port."""
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.main", "--model", str(model_dir), "--port", "0",
                             "--metrics-port", "0", "--http-port", "0", "--kv-cache-mb", "16", "--shutdown-grace-seconds", str(grace),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target, metrics_port, deadline = None, 0, time.monotonic() + 120
    for line in proc.stdout:           # "metrics on http://HOST:PORT/metrics", "listening on HOST:PORT", "SERVING"
        match = re.search(r"listening on ([\d.]+:\d+)", line)
        target = match.group(1) if match else target
        match = re.search(r"metrics on http://[\d.]+:(\d+)/", line)
        metrics_port = int(match.group(1)) if match else metrics_port
        if "SERVING" in line or time.monotonic() > deadline:
            break
    assert target and proc.poll() is None, "the server did not start"
    threading.Thread(target=proc.stdout.read, daemon=True).start()      # keep draining its output
    return proc, target, metrics_port


def long_request(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="Hello", params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n)))


def test_sigterm_drains_then_exits_zero(tiny_model_dir):
    from soak import scrape

    proc, target, metrics_port = spawn(tiny_model_dir, 60, "--max-batch-size", "2")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            streams = [stub.GenerateStream(long_request(480), timeout=120) for _ in range(2)]
            for stream in streams:
                next(stream)                                       # both running when SIGTERM comes
            queued = stub.GenerateStream(long_request(16), timeout=120)   # no batch room: it waits
            deadline = time.monotonic() + 30
            while scrape(metrics_port)["loraplex_requests_waiting"] != 1:
                assert time.monotonic() < deadline, "the third stream never reached the queue"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
                assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(long_request(4), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for stream, n in ((streams[0], 480), (streams[1], 480), (queued, 16)):   # all complete
                chunks = list(stream)
                assert chunks[-1].stop_reason == pb.MAX_TOKENS and chunks[-1].generated_token_count == n
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_grace_period_bounds_the_drain(tiny_model_dir):
    """Requests that would outlast the grace period are cut off when it ends; the exit is still 0."""
    proc, target, _ = spawn(tiny_model_dir, grace=1)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            streams = [stub.GenerateStream(long_request(480), timeout=120) for _ in range(32)]
            for stream in streams:
                next(stream)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):                      # cut off when the grace period ends
                for stream in streams:
                    list(stream)
            assert proc.wait(30) == 0
            assert time.monotonic() - started < 10
    finally:
        proc.kill()


def test_engine_failure_turns_not_serving_and_exits_one(tiny_model_dir, stub_for):
    config = ServerConfig(model=str(tiny_model_dir), port=0, metrics_port=0, http_port=0, kv_cache_mb=16)
    box: dict = {}

    def broken_schedule():
        raise RuntimeError("injected scheduler bug")

    def on_start(running):
        box["running"] = running
        running.engine.scheduler.schedule = broken_schedule        # the next loop turn dies
        box["ready"].set()

    box["ready"] = threading.Event()
    thread = threading.Thread(target=lambda: box.setdefault("code", asyncio.run(serve(config, on_start))))
    thread.start()
    assert box["ready"].wait(120)
    stub = stub_for(f"127.0.0.1:{box['running'].port}")
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(long_request(4), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INTERNAL and "injected scheduler bug" in failed.value.details()
    thread.join(30)
    assert box["code"] == EXIT_ENGINE_FAILED
    assert not box["running"].health.serving


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_a_port_already_taken_stops_the_start_with_its_name(tiny_model_dir, flag):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "0", "--http-port": "0", flag: port}
        proc = subprocess.run([sys.executable, "-m", "loraplex.server.main", "--model", str(tiny_model_dir),
                               "--kv-cache-mb", "16", *(x for kv in ports.items() for x in kv)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and f"choose another {flag}" in proc.stderr


def test_an_unreadable_certificate_stops_the_start_with_its_name(tiny_model_dir, tmp_path):
    missing = tmp_path / "missing.pem"
    proc = subprocess.run([sys.executable, "-m", "loraplex.server.main", "--model", str(tiny_model_dir),
                           "--port", "0", "--metrics-port", "0", "--http-port", "0", "--kv-cache-mb", "16",
                           "--tls-cert", str(missing), "--tls-key", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
