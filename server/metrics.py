"""Prometheus metrics, served over HTTP on their own port (`--metrics-port`).

Who reports what:
- the engine: queue time, time to first token, inter-token latency, prompt and generated tokens, batch size,
  and requests per adapter (`step`, `token`, `adapter_requested`);
- the adapter registry: reads (result, duration), slot copies, evictions (`adapter_read`, `adapter_copied`,
  `adapter_evicted`);
- the request session (gRPC and HTTP alike): how each request ended, success by stop reason or failure by
  reason, and end-to-end latency (`succeeded`, `failed`); the HTTP API also counts its responses by route
  and status (`http_response`);
- gauges (requests running and waiting, KV cache usage, adapters per tier, slots) are read from the engine
  when Prometheus scrapes, so they are never stale.

Counting starts when the server reports SERVING: the warm-up generation is not counted. Histograms carry no
adapter label; `loraplex_adapter_requests_total` names at most `top_adapters` adapters (see TopAdapters).
"""

import threading
import time
from collections import Counter as Tally

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "loraplex_"

# Request failure reasons (label `reason` of loraplex_request_failure_total); see errors.py for which error
# carries which. `cancelled` and `deadline` come from the client's side of the call.
FAILURE_REASONS = ("validation", "queue_full", "cancelled", "deadline", "adapter_not_found", "adapter_load",
                   "oom", "resource_exhausted", "unavailable", "internal")
STOP_REASONS = ("MAX_TOKENS", "EOS_TOKEN", "STOP_SEQUENCE", "TOKEN_LIMIT", "TIME_LIMIT")
LOAD_RESULTS = ("ok", "invalid", "error")

# Seconds. CPU decoding steps take tens of milliseconds, GPU ones a few: the buckets cover both.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                     1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class NullMetrics:
    """Counts nothing: what the engine and registry report to until a server attaches real metrics."""

    def step(self, prefill: bool, seqs) -> None: ...
    def token(self, seq, now: float) -> None: ...
    def adapter_requested(self, adapter_id: str) -> None: ...
    def adapter_read(self, result: str, seconds: float) -> None: ...
    def adapter_copied(self, seconds: float) -> None: ...
    def adapter_evicted(self, tier: str) -> None: ...
    def succeeded(self, stop_reason: str, seconds: float) -> None: ...
    def failed(self, reason: str) -> None: ...
    def unauthenticated(self, service: str) -> None: ...
    def http_response(self, route: str, status: int) -> None: ...
    def merge_event(self, operation: str, method: str, result: str, merged=None) -> None: ...
    def merged_step(self, merged: bool) -> None: ...


NO_METRICS = NullMetrics()


class Metrics(NullMetrics):
    def __init__(self, top_adapters: int = 20):
        prometheus_client.disable_created_metrics()   # no `_created` series beside each counter and histogram
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        ProcessCollector(registry=r)                   # process_cpu_seconds_total, process_resident_memory_bytes
        self.success = Counter(p + "request_success", "Requests that finished normally, by stop reason",
                               ["stop_reason"], registry=r)
        self.failure = Counter(p + "request_failure", "Requests that ended with an error, by reason",
                               ["reason"], registry=r)
        for reason in STOP_REASONS:
            self.success.labels(reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(reason)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled (each request once)",
                                     registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From a request's arrival in the engine to its "
                              "first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between consecutive tokens of one request",
                             buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram(p + "request_duration_seconds", "End-to-end time of successful requests, from the "
                             "call's arrival to its last token", buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram(p + "request_queue_duration_seconds", "From a request's arrival in the engine to "
                               "its first step (includes waiting for its adapter)", buckets=LATENCY_BUCKETS,
                               registry=r)
        self.batch = Histogram(p + "batch_size", "Sequences per model step, by phase", ["phase"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.step_adapters = Histogram(p + "step_adapters", "Distinct adapters per model step (each one's factors "
                                       "are read that step), by phase", ["phase"], buckets=(0,) + BATCH_BUCKETS,
                                       registry=r)
        self.loads = Counter(p + "adapter_loads", "Adapter reads from disk into host memory, by result: ok, "
                             "invalid (files refused), error", ["result"], registry=r)
        for result in LOAD_RESULTS:
            self.loads.labels(result)
        self.load_time = Histogram(p + "adapter_load_duration_seconds", "Adapter load stages: read (disk to "
                                   "host memory, validated and normalized) and copy (host memory to a device "
                                   "slot)", ["stage"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter(p + "adapter_evictions", "Adapters evicted to make room, by tier left "
                                 "(host, device)", ["tier"], registry=r)
        for tier in ("host", "device"):
            self.evictions.labels(tier)
        self.refused = Counter(p + "unauthenticated_calls", "Calls refused for a missing or wrong bearer token, by "
                               "service (these never reach the request counters)", ["service"], registry=r)
        self.http = Counter(p + "http_responses", "Responses of the OpenAI-compatible HTTP API, by route and HTTP "
                            "status (its generations are also in the request counters, as gRPC's are)",
                            ["route", "code"], registry=r)
        self.merges = Counter(p + "adapter_merges", "Merges of an adapter into a copy of the weights and "
                              "unmerges, by operation, method and result (ok, error)",
                              ["operation", "method", "result"], registry=r)
        self.merge_time = Histogram(p + "adapter_merge_duration_seconds", "Time to build an adapter's merged "
                                    "copy of the weights, by method", ["method"], buckets=LOAD_BUCKETS + (20.0, 40.0),
                                    registry=r)
        self.steps = Counter(p + "steps", "Model steps, by the weights they ran on: base (with the LoRA path) "
                             "or merged (one merged adapter's requests)", ["weights"], registry=r)
        for weights in ("base", "merged"):
            self.steps.labels(weights)
        self.top = TopAdapters(top_adapters)
        r.register(_TopCollector(self.top))
        self._info = Gauge(p + "model_info", "The served model (always 1)",
                           ["model", "device", "dtype", "quantization"], registry=r)

    # ---- reported by the engine -----------------------------------------------------------------
    def step(self, prefill: bool, seqs) -> None:
        phase = "prefill" if prefill else "decode"
        self.batch.labels(phase).observe(len(seqs))
        self.step_adapters.labels(phase).observe(len({seq.slot for seq in seqs if seq.slot >= 0}))
        if not prefill:
            return
        now = time.monotonic()
        for seq in seqs:
            # its first prefill (or first prompt piece); a preempted sequence has output and is not recounted
            if not seq.output_ids and not seq.fed:
                self.queue.observe(now - seq.arrival)
                self.prompt_tokens.inc(len(seq.prompt_ids))

    def token(self, seq, now: float) -> None:
        self.generation_tokens.inc()
        if seq.last_token_time is None:
            self.ttft.observe(now - seq.arrival)
        else:
            self.itl.observe(now - seq.last_token_time)

    def adapter_requested(self, adapter_id: str) -> None:
        self.top.inc(adapter_id)

    # ---- reported by the adapter registry -------------------------------------------------------
    def adapter_read(self, result: str, seconds: float) -> None:
        self.loads.labels(result).inc()
        if result == "ok":
            self.load_time.labels("read").observe(seconds)

    def adapter_copied(self, seconds: float) -> None:
        self.load_time.labels("copy").observe(seconds)

    def adapter_evicted(self, tier: str) -> None:
        self.evictions.labels(tier).inc()

    # ---- reported by the gRPC service -----------------------------------------------------------
    def succeeded(self, stop_reason: str, seconds: float) -> None:
        self.success.labels(stop_reason).inc()
        self.e2e.observe(seconds)

    def failed(self, reason: str) -> None:
        self.failure.labels(reason).inc()

    def unauthenticated(self, service: str) -> None:
        self.refused.labels(service).inc()

    def http_response(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()

    # ---- reported by the weight sets -------------------------------------------------------------
    def merge_event(self, operation: str, method: str, result: str, merged=None) -> None:
        self.merges.labels(operation, method, result).inc()
        if merged is not None:
            self.merge_time.labels(method).observe(merged.seconds)

    def merged_step(self, merged: bool) -> None:
        self.steps.labels("merged" if merged else "base").inc()

    # ---- set-up ---------------------------------------------------------------------------------
    def watch(self, engine, model) -> None:
        """Gauges read from `engine` at each scrape, and the model's description."""
        self.registry.register(_EngineCollector(engine))
        self._info.labels(model.name, model.device, model.dtype, model.quantization).set(1)

    def exposed(self):
        """The families /metrics shows: this registry's; a cluster front shows its replicas' beside its own
        (cluster/replica_metrics.py) by replacing this."""
        return self.registry.collect()

    def serve(self, host: str, port: int):
        """Starts the HTTP endpoint (/metrics) on a daemon thread; returns the server (its .server_address
        holds the port bound; shut it down with .shutdown())."""
        exposition = CollectorRegistry()
        exposition.register(_Exposed(self))
        try:
            server, _ = start_http_server(port, host, registry=exposition)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose "
                                     f"another --metrics-port (0 = any free one) or --no-metrics") from None
        return server


class _Exposed:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics.exposed()


class TopAdapters:
    """Requests per adapter for at most n adapters, the rest summed under `other`; every series only grows.

    An adapter gets its own series once its request count since start is among the n highest; its series
    counts from the request that earned the place, its earlier requests stay in `other`. When a busier
    adapter takes its place, its series ends and its count moves to `other`. So the series always add up to all adapter requests, and
    none ever decreases: rate() works on each, and on their sum."""

    def __init__(self, n: int):
        self.n = n
        self.counts: Tally[str] = Tally()     # every adapter's requests since start
        self.named: dict[str, int] = {}       # adapters with their own series -> its value
        self.other = 0
        self._lock = threading.Lock()

    def inc(self, adapter_id: str) -> None:
        with self._lock:
            self.counts[adapter_id] += 1
            if adapter_id not in self.named and not self._take_place(adapter_id):
                self.other += 1
                return
            self.named[adapter_id] = self.named.get(adapter_id, 0) + 1

    def _take_place(self, adapter_id: str) -> bool:
        if len(self.named) < self.n:
            return True
        weakest = min(self.named, key=self.counts.__getitem__, default=None)
        # a margin, so that two adapters with equal traffic do not swap places on every request
        if weakest is None or self.counts[adapter_id] <= self.counts[weakest] * 1.25 + 1:
            return False
        self.other += self.named.pop(weakest)
        return True

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.named), self.other


class _TopCollector:
    def __init__(self, top: TopAdapters):
        self.top = top

    def collect(self):
        named, other = self.top.snapshot()
        family = CounterMetricFamily(PREFIX + "adapter_requests", f"Requests per adapter for the {self.top.n} "
                                     "busiest adapters, the rest as adapter=\"other\"", labels=["adapter"])
        for adapter_id, value in sorted(named.items()):
            family.add_metric([adapter_id], value)
        family.add_metric(["other"], other)
        yield family


class _EngineCollector:
    """Gauges read when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield _gauge("requests_running", "Requests in the running batch", stats.running)
        yield _gauge("requests_waiting", "Requests queued, including those waiting for their adapter",
                     stats.waiting)
        yield _gauge("kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1)", stats.kv_usage)
        yield CounterMetricFamily(PREFIX + "preemptions", "Sequences preempted (KV cache full) and later "
                                  "recomputed", value=stats.preemptions)
        if self.engine.adapters is None:
            return
        merged = self.engine.weights.status() if self.engine.weights is not None else None
        yield _gauge("merged_adapters", "Adapters merged into a copy of the weights (0 or 1)",
                     int(merged is not None and merged.state == "merged"))
        yield _gauge("merged_memory_bytes", "Memory of the merged copies of the weights, beside the base's",
                     self.engine.weights.memory() if self.engine.weights is not None else 0)
        yield _gauge("merged_retained_ratio", "Share of the merged adapter's update its merged weights keep "
                     "(1 with none merged)", merged.retained if merged is not None and merged.state == "merged"
                     else 1.0)
        tiers = self.engine.adapters.registry.tiers()
        resident = GaugeMetricFamily(PREFIX + "adapters_resident", "Adapters held per tier: host (in host "
                                     "memory) and device (in a device slot; these are in host memory too)",
                                     labels=["tier"])
        resident.add_metric(["host"], tiers.host)
        resident.add_metric(["device"], tiers.device)
        yield resident
        yield _gauge("adapter_host_memory_bytes", "Host memory held by adapters", tiers.host_bytes)
        yield _gauge("adapter_slots", "Device adapter slots (all)", tiers.slots_total)
        yield _gauge("adapter_slots_used", "Device adapter slots holding an adapter", tiers.device)
        yield _gauge("adapter_slots_busy", "Device adapter slots whose adapter serves a running request",
                     tiers.slots_busy)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)
