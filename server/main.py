"""`loraplex serve`: load the model, listen, warm up, report SERVING, run until SIGTERM/SIGINT.

Both transports (gRPC and the OpenAI-compatible HTTP API) serve the same engine. Stopping drains: health goes
NOT_SERVING at once, new requests get UNAVAILABLE (HTTP 503), running ones may finish
within --shutdown-grace-seconds, then the process exits 0. If the engine loop itself fails, health goes
NOT_SERVING, requests get the error, and the process exits 1 at once. A server that cannot start (a port
already taken, an unreadable certificate) exits 2 with the reason.
"""

import argparse
import asyncio
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .config import ServerConfig, add_config_flags, config_from_args
from .engine.engine import Engine
from .engine.request import GenerationRequest, StoppingParams
from .metrics import NO_METRICS, Metrics

log = logging.getLogger("loraplex.server")

EXIT_ENGINE_FAILED = 1
EXIT_START_FAILED = 2


def parse_config(argv: list[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="loraplex serve", description="Serve the model over gRPC.")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def warm_up(engine: Engine) -> None:
    """One short generation, so the first real request does not pay for first-call set-up."""
    done = threading.Event()
    failure = []

    def sink(out):
        if out.error is not None:
            failure.append(out.error)
        if out.finished:
            done.set()

    engine.add_request(GenerationRequest(prompt="Hello", stopping=StoppingParams(max_new_tokens=4)), sink)
    done.wait()
    if failure:
        raise RuntimeError(f"warm-up failed: {failure[0]}")


@dataclass
class Running:
    server: object
    health: object
    engine: Engine
    port: int
    model: object
    metrics: Metrics | None = None
    metrics_server: object = None       # the HTTP server of /metrics
    metrics_port: int = 0
    health_watch: object = None         # on a cluster: the task keeping health in step with the replicas
    http: object = None                 # the OpenAI-compatible HTTP API (http/serve.py)


async def start(config: ServerConfig) -> Running:
    """Loads the model, starts listening (NOT_SERVING), warms up, then reports SERVING. Metrics count from
    then on, so the warm-up is not in them."""
    from .build import launch_engine
    from .rpc.server import build_server, local_services

    # the threads every handler's blocking work runs on (engine intake with its tokenizing, Tokenize, adapter
    # administration), so that none of it holds up the event loop
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="loraplex-rpc"))
    metrics, metrics_server = None, None
    if config.metrics:                # first, so that a port already taken fails the start at once
        metrics = Metrics(config.metrics_top_adapters)
        host = config.metrics_host or config.host
        metrics_server = metrics.serve(host, config.metrics_port)
        print(f"loraplex metrics on http://{host}:{metrics_server.server_address[1]}/metrics", flush=True)
    try:
        if config.replicas:
            from .cluster.launch import start_replicas

            engine, model, services = await start_replicas(config, metrics)
        else:
            engine, model = await asyncio.get_running_loop().run_in_executor(None, launch_engine, config)
            services = local_services(config, engine, model, metrics)
        server, health, port = build_server(config, *services, metrics)
        http = await start_http(config, services, health, metrics) if config.http else None
    except BaseException:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        raise
    running = Running(server, health, engine, port, model, metrics, metrics_server, http=http)
    if metrics is not None:
        if not config.replicas:
            metrics.watch(engine, model)
        running.metrics_port = metrics_server.server_address[1]
    await server.start()
    await health.set(False)
    print(f"loraplex listening on {config.host}:{port} (model {model.name}, {model.device}, {model.dtype})",
          flush=True)
    if config.replicas:     # replicas warm up and count their own engine metrics
        running.health_watch = asyncio.create_task(engine.watch_health(health))
    else:
        if config.warmup:
            await asyncio.get_running_loop().run_in_executor(None, warm_up, engine)
        if metrics is not None:
            engine.observe(metrics)
    await health.set(True)
    print("loraplex ready: SERVING", flush=True)
    return running


async def start_http(config: ServerConfig, services, health, metrics):
    """The OpenAI-compatible HTTP API over the same session and facts as gRPC, listening."""
    from .http.app import OpenAIEndpoint
    from .http.serve import HttpServer

    session, facts, _ = services
    endpoint = OpenAIEndpoint(session, facts, lambda: health.serving, config.auth_token,
                              config.default_max_new_tokens, config.max_message_bytes, metrics or NO_METRICS)
    http = HttpServer(config, endpoint.app())
    port = await http.start()
    print(f"loraplex OpenAI-compatible API on {http.scheme}://{http.host}:{port}/v1", flush=True)
    return http


async def stop_transports(running: Running, grace: float) -> None:
    await running.server.stop(grace)
    if running.http is not None:
        await running.http.stop()


async def shutdown(running: Running, grace: float) -> None:
    """Drains: NOT_SERVING, then new requests are refused while running ones get up to `grace` seconds."""
    log.info("stopping: NOT_SERVING, finishing running requests (grace %.0fs)", grace)
    await running.health.set(False)
    running.engine.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not running.engine.idle() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not running.engine.idle():
        log.warning("grace period over: cancelling the requests still running")
    await stop_transports(running, 1.0)   # a second to hand over the last responses; the rest is cancelled
    running.engine.stop()
    stop_metrics(running)


def stop_metrics(running: Running) -> None:
    if running.metrics_server is not None:
        running.metrics_server.shutdown()
        running.metrics_server.server_close()
        running.metrics_server = None


async def serve(config: ServerConfig, on_start=None) -> int:
    """Runs the server until SIGTERM/SIGINT (exit status 0) or an engine failure (1). on_start(running), if
    given, is called once the server is SERVING (for embedding and tests)."""
    running = await start(config)
    if on_start is not None:
        on_start(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):   # not the main thread (embedded); the caller stops it
            pass
    while not stop.is_set() and not running.engine.failed.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
    if running.engine.failed.is_set():
        log.critical("the engine failed: NOT_SERVING, exiting with status %d", EXIT_ENGINE_FAILED)
        await running.health.set(False)
        await stop_transports(running, 0.5)
        stop_metrics(running)
        return EXIT_ENGINE_FAILED
    await shutdown(running, config.shutdown_grace_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # it warns about an optional CPU kernel package
    config = parse_config(argv)
    try:
        return asyncio.run(serve(config))
    except (OSError, ValueError) as exc:   # a port already taken, an unreadable certificate, a bad preload
        log.critical("cannot start: %s", exc)
        return EXIT_START_FAILED


if __name__ == "__main__":
    sys.exit(main())
