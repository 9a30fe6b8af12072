"""`loraplex serve`: load the model, listen, warm up, report SERVING, run until SIGTERM/SIGINT."""

import argparse
import asyncio
import logging
import signal
import sys
import threading
from dataclasses import dataclass

from .config import ServerConfig, add_config_flags, config_from_args
from .engine.engine import Engine
from .engine.request import GenerationRequest, StoppingParams

log = logging.getLogger("loraplex.server")

GRACE_SECONDS = 10.0


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


async def start(config: ServerConfig) -> Running:
    """Loads the model, starts listening (NOT_SERVING), warms up, then reports SERVING."""
    from .build import launch_engine
    from .rpc.server import build_server

    engine, model = await asyncio.get_running_loop().run_in_executor(None, launch_engine, config)
    server, health, port = build_server(config, engine, model)
    await server.start()
    await health.set(False)
    print(f"loraplex listening on {config.host}:{port} (model {model.name}, {model.device}, {model.dtype})",
          flush=True)
    if config.warmup:
        await asyncio.get_running_loop().run_in_executor(None, warm_up, engine)
    await health.set(True)
    print("loraplex ready: SERVING", flush=True)
    return Running(server, health, engine, port, model)


async def shutdown(running: Running, grace: float = GRACE_SECONDS) -> None:
    log.info("stopping: NOT_SERVING, finishing running requests (grace %.0fs)", grace)
    await running.health.set(False)
    await running.server.stop(grace)
    running.engine.stop()


async def serve(config: ServerConfig) -> int:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await shutdown(running)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # it warns about an optional CPU kernel package
    config = parse_config(argv)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
