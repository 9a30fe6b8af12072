"""`loraplex serve --replicas N`: the Ray cluster (a local one on loopback, or --ray-address), the Serve
application of engine replicas, and the front's servicers over its handle.

Health: SERVING while at least one replica is running and the front is not draining (checked every
HEALTH_POLL_S). SIGTERM drains as a single server does: NOT_SERVING at once, new requests UNAVAILABLE,
running ones get the grace period; then the application and the local cluster are shut down (an
application found already running on --ray-address is left as it was).
"""

import asyncio
import logging
import shutil
import tempfile
import threading
import time

from ..config import ServerConfig
from ..build import ModelDescription
from ..metrics import NO_METRICS, Metrics
from ..session import RequestSession
from . import ray_env

log = logging.getLogger(__name__)

HEALTH_POLL_S = 2.0
DEPLOYMENT = "engine"


class Cluster:
    """What `loraplex serve` holds of a cluster in place of an engine: drain, idle, stop, failed."""

    def __init__(self, config: ServerConfig, handle, streams, owned: bool, temp_dir: str | None):
        self.config = config
        self.handle = handle
        self.streams = streams
        self.owned = owned            # the application is ours to shut down
        self.temp_dir = temp_dir
        self.failed = threading.Event()   # never set: Serve restarts replicas, health tells when none runs

    def drain(self) -> None:
        self.streams.drain()

    def idle(self) -> bool:
        return self.streams.idle()

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.config.serve_app)
        deployment = app.deployments.get(DEPLOYMENT) if app is not None else None
        return deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0

    async def watch_health(self, health) -> None:
        loop = asyncio.get_running_loop()
        while not self.streams.draining:
            try:
                running = await loop.run_in_executor(None, self.running_replicas)
            except Exception as exc:   # noqa: BLE001 - the controller is restarting or gone
                log.warning("cannot read the replicas' state: %s", exc)
                running = 0
            if not self.streams.draining and (running > 0) != health.serving:
                log.warning("%d replicas running: %s", running, "SERVING" if running else "NOT_SERVING")
                await health.set(running > 0)
            await asyncio.sleep(HEALTH_POLL_S)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self.owned:
                serve.delete(self.config.serve_app)
                if not self.config.ray_address:
                    serve.shutdown()
        finally:
            ray.shutdown()
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


async def start_replicas(config: ServerConfig, metrics: Metrics | None):
    """(cluster, model description, (request session, facts, adapter servicer)) once the replicas run."""
    ray_env.import_ray()
    from .admin import ClusterAdapterService
    from .front import ClusterFacts, ClusterStreams
    from .replica_metrics import FrontAndReplicas

    loop = asyncio.get_running_loop()
    temp_dir = None if config.ray_address else tempfile.mkdtemp(prefix="loraplex-ray-")
    handle, owned = await loop.run_in_executor(None, _deploy, config, temp_dir)
    streams = ClusterStreams(handle)
    cluster = Cluster(config, handle, streams, owned, temp_dir)
    facts = ClusterFacts(handle)
    f = await facts.describe()
    model = ModelDescription(f["model_name"], f["architecture"], f["device"], f["compute_dtype"],
                             f["quantization"], f["max_sequence_length"], f["vocab_size"])
    if metrics is not None:
        metrics.exposed = FrontAndReplicas(metrics.registry, handle, loop).collect
    session = RequestSession(streams, config.log_prompts, metrics or NO_METRICS)
    admin = ClusterAdapterService(handle) if config.adapter_service else None   # replicas without roots refuse
    return cluster, model, (session, facts, admin)


def _deploy(config: ServerConfig, temp_dir: str | None):
    """(handle, whether we deployed it): starts Ray and the application, or finds it on --ray-address."""
    from ray import serve

    from .replica import deployment

    ray_env.start_ray(config.ray_address, config.replicas * config.replica_cpus, temp_dir or "")
    if config.ray_address and _wait_for_running_app(config.serve_app):
        log.info("using the running Serve application %r", config.serve_app)
        return serve.get_deployment_handle(DEPLOYMENT, config.serve_app), False
    if not config.ray_address:
        serve.start(proxy_location="Disabled")
    log.info("starting %d replicas", config.replicas)
    return serve.run(deployment(config), name=config.serve_app, route_prefix=None), True


def _wait_for_running_app(name: str, timeout: float = 600.0) -> bool:
    """True once an application of that name runs; False when there is none. One being deployed (from a
    Serve config, say) is waited for, never deployed over."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(name)
        if app is None or app.status in ("NOT_STARTED", "DELETING"):
            return False
        if app.status == "RUNNING":
            return True
        if app.status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            raise ValueError(f"the Serve application {name!r} is {app.status}: {app.message}")
        time.sleep(1.0)
