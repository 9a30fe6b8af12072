"""A local Ray cluster that listens on loopback only, and the set-up each of its worker processes runs.

Measured with Ray 2.60: `_node_ip_address="127.0.0.1"` alone is overridden by the host's routable address
unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before ray is imported; then gcs, raylet and the workers
bind loopback. Each Serve replica still opens an inter-deployment gRPC server on "[::]:0" (all interfaces),
with no option to change it: `bind_replicas_to_loopback`, run in every worker, rewrites that address.
"""

import os

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
           "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_enable_metrics_collection": "0",
           "RAY_task_events_report_interval_ms": "0"}
WORKER_SETUP = "loraplex.server.cluster.ray_env.bind_replicas_to_loopback"


def import_ray():
    """ray, imported with the environment above; a clear error when the extra is not installed."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
        import ray.serve  # noqa: F401 - the extra brings both
    except ImportError as exc:
        raise ValueError("replicas need Ray Serve: pip install 'loraplex[cluster]'") from exc
    return ray


def start_ray(address: str, cpus: float, temp_dir: str) -> None:
    """Connects to the cluster at `address`, or starts a local one on loopback with `cpus` CPUs."""
    ray = import_ray()
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP, "env_vars": dict(RAY_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    os.makedirs(temp_dir, exist_ok=True)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=cpus,
             object_store_memory=128 * 2**20, log_to_driver=False, _temp_dir=temp_dir,
             runtime_env=runtime_env)


def bind_replicas_to_loopback() -> None:
    """Serve replicas' inter-deployment gRPC server on 127.0.0.1 instead of every interface."""
    import ray.serve._private.replica as replica

    add_port = replica.add_port_to_grpc_server
    if getattr(add_port, "loopback", False):
        return

    def loopback_port(server, address: str):
        return add_port(server, address.replace("[::]", "127.0.0.1"))

    loopback_port.loopback = True
    replica.add_port_to_grpc_server = loopback_port
