"""Scale-out on Ray Serve: `loraplex serve --replicas N` keeps this server's gRPC front (TLS, tokens, health,
drain, limits, request log, metrics) and hands each generation to one of N engine replicas through a Serve
deployment handle, routed by adapter id (Serve's model multiplexing). See docs/cluster.md.

- ray_env.py: a local Ray cluster on loopback only, and the set-up every Ray worker runs;
- replica.py: the Serve deployment, one whole engine in each replica's process;
- front.py: the front's side of a generation (streams over the handle, errors and cancels mapped);
- admin.py: AdapterService over every replica (or a named one), by Serve's broadcast;
- replica_metrics.py: each replica's engine metrics on the front's /metrics, with a `replica` label;
- launch.py: starting and stopping it all from `loraplex serve`.

Ray is an optional dependency (`pip install loraplex[cluster]`): nothing here is imported by a single server.
"""
