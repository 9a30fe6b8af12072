"""The Serve deployment: each replica holds one whole loraplex engine in its own process and answers the
front's calls (front.py, admin.py) through the deployment handle.

Residency stays the engine's. Serve's multiplexed cache (one entry per adapter this replica served lately,
`resident_capacity` of them) only tells Serve's routers where an adapter's requests should go. Serve evicts
from it by LRU and calls the evicted entry's __del__ (measured with 2.60: while requests still run on it,
and twice), so an entry holds nothing: the engine loads on demand and its reference counts decide what
leaves memory.
"""

import dataclasses
import logging
from ray import serve

from ..admin import AdapterAdmin
from ..build import pick_device
from ..config import ServerConfig
from ..errors import FailedPreconditionError, InvalidArgumentError, LoraplexError
from ..model_facts import EngineFacts
from ..session import EngineStreams

log = logging.getLogger(__name__)

READERS_TIMEOUT_S = 120.0
ADMIN_OPERATIONS = ("catalog", "describe", "load", "unload", "merge", "unmerge")


class Residency:
    """An entry of Serve's multiplexed cache: a routing hint that holds nothing."""

    def __init__(self, adapter_id: str):
        self.adapter_id = adapter_id


def resident_capacity(config: ServerConfig) -> int:
    return config.adapter_slots


class EngineReplica:
    def __init__(self, config: ServerConfig):
        from ..build import launch_engine
        from ..main import warm_up
        from ..metrics import Metrics

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine, self.model = launch_engine(config)
        warm_up(self.engine)
        adapters = self.engine.adapters      # ready when Serve routes to it: no first read waits for them
        if adapters is not None and not adapters.wait_started(READERS_TIMEOUT_S):
            log.warning("the adapter reader processes are not up after %.0f s; reads will start them", READERS_TIMEOUT_S)
        self.metrics = Metrics(config.metrics_top_adapters)
        self.metrics.watch(self.engine, self.model)
        self.engine.observe(self.metrics)
        self.streams = EngineStreams(self.engine, enforce_deadlines=True)
        self.facts = EngineFacts(self.engine, self.model, config.max_batch_size)
        self.admin = None
        if self.engine.adapters is not None:
            self.admin = AdapterAdmin(self.engine.adapters, self.engine.weights, config.merge_method)

        async def residency(adapter_id: str) -> Residency:
            return Residency(adapter_id)

        self.resident = serve.multiplexed(max_num_models_per_replica=resident_capacity(config))(residency)

    async def generate(self, request, timeout: float | None):
        """The request's outputs; an error is yielded as the last item (LoraplexErrors pickle whole)."""
        try:
            if request.adapter_id:
                await self.resident(request.adapter_id)
            async for out in self.streams.stream(request, timeout):
                yield out
        except LoraplexError as exc:
            yield exc

    async def generate_whole(self, request, timeout: float | None) -> list:
        """generate's items, all at once (for callers that want only the whole answer)."""
        return [item async for item in self.generate(request, timeout)]

    async def administer(self, operation: str, target: str = "", **args):
        """One AdapterAdmin call, as (replica id, result or error); None when `target` names another replica."""
        if target and target != self.replica_id:
            return None
        try:
            if operation not in ADMIN_OPERATIONS:
                raise InvalidArgumentError("operation", f"{operation!r} is not one of {ADMIN_OPERATIONS}")
            if self.admin is None:
                raise FailedPreconditionError("adapters are off on this server (no --adapter-roots)")
            return self.replica_id, await getattr(self.admin, operation)(**args)
        except LoraplexError as exc:
            return self.replica_id, exc

    async def describe(self) -> dict:
        return {**self.facts.facts(), "replica_id": self.replica_id}

    async def adapter_ids(self) -> list[str]:
        return await self.facts.adapter_ids()

    async def tokenize(self, text: str, return_tokens: bool):
        try:
            return await self.facts.tokenize(text, return_tokens)
        except LoraplexError as exc:
            return exc

    def metrics_text(self) -> tuple[str, str]:
        from prometheus_client import generate_latest

        return self.replica_id, generate_latest(self.metrics.registry).decode()

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: its engine loop has died."""
        if self.engine.failed.is_set():
            raise RuntimeError("the engine loop failed")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def replica_config(config: ServerConfig) -> ServerConfig:
    """What each replica runs: the front's configuration with its own threads, and no listening of its own."""
    threads = config.threads or max(int(config.replica_cpus), 1)
    return dataclasses.replace(config, replicas=0, threads=threads, metrics=False, port=0)


def deployment(config: ServerConfig):
    """The bound Serve application of `config.replicas` engine replicas."""
    actor = {"num_cpus": config.replica_cpus}
    gpus = config.replica_gpus or (1 if pick_device(config.device).type == "cuda" else 0)
    if gpus:
        actor["num_gpus"] = gpus
    return serve.deployment(
        EngineReplica, name="engine", num_replicas=config.replicas, ray_actor_options=actor,
        # a replica runs at most a batch at a time: more would only wait in its engine, and requests that
        # wait in Serve's router may still go to whichever replica frees up first
        max_ongoing_requests=config.max_batch_size, max_queued_requests=config.max_queue_size * config.replicas,
        health_check_period_s=2, health_check_timeout_s=60, graceful_shutdown_timeout_s=5,
    ).bind(replica_config(config))


def app_from_args(args: dict):
    """An application builder for a Serve config file (docs/cluster.md): `args` are ServerConfig fields."""
    return deployment(ServerConfig(**args))

