"""Replicas on Ray Serve against one: `python -m loraplex.bench.cluster_bench`.

The embedded model with 20 rank-8 adapters (all 7 projections). One Poisson trace (fixed seed) whose
adapters follow Zipf(1.0), sent by an asyncio gRPC client to `loraplex serve --replicas 1` and then to
`--replicas 2`, one CPU (and one torch thread) per replica, each front in its own process: output
tokens/s over the makespan, TTFT p50/p99, the share of requests whose adapter was already resident
(from the replicas' adapter reads), and the cores each part used (front, replicas, Ray's processes, this
client). The front's own added latency: 1-token requests one at a time, a
cluster front with 1 replica against a single server with 1 thread (same engine settings), p50 and p99 of
the difference, for unary Generate and for GenerateStream's first chunk. Writes cluster.json and cluster.png.
"""

import asyncio
import datetime
import json
import logging
import pathlib
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import machine, one_run
from .adapter_files import make_peft_adapters, zipf_choice
from .front_process import FrontProcess
from .process_cpu import CoreShares
from .workload import poisson_stream, summarize

log = logging.getLogger("loraplex.bench.cluster")


@dataclass(frozen=True)
class Trace:
    requests: int = 160
    rate: float = 6.0            # requests/s: more than 2 replicas serve, so both runs measure capacity
    min_out: int = 16
    max_out: int = 48
    adapters: int = 20
    rank: int = 8
    zipf: float = 1.0
    latency_probes: int = 40
    seed: int = 3


QUICK = Trace(requests=24, rate=4.0, min_out=4, max_out=8, adapters=4, latency_probes=8)


def server_flags(root: pathlib.Path, trace: Trace, replicas: int) -> list[str]:
    flags = [f"--adapter-roots={root}", f"--adapter-slots={trace.adapters}", "--max-batch-size=16",
             "--kv-cache-mb=64", "--max-lora-rank=16", "--threads=1"]
    return flags + ([f"--replicas={replicas}", "--replica-cpus=1"] if replicas else [])


async def send_trace(target: str, requests, adapters: list[str]) -> dict:
    import grpc

    from loraplex.v1 import generation_pb2 as pb
    from loraplex.v1 import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        origin = time.perf_counter() + 0.5

        async def one(r, adapter):
            await asyncio.sleep(max(0.0, origin + r.arrival - time.perf_counter()))
            times = []
            params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=r.output_len,
                                                                min_new_tokens=r.output_len))
            async for res in stub.GenerateStream(pb.GenerateRequest(text=r.prompt, adapter_id=adapter,
                                                                    params=params), timeout=600):
                now = time.perf_counter()
                times.extend([now] * max(res.generated_token_count - len(times), 0))
            return times

        token_times = await asyncio.gather(*(one(r, a) for r, a in zip(requests, adapters)))
    return summarize([origin + r.arrival for r in requests], token_times)


async def probe_latency(targets: dict[str, str], n: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per 1-token request on each target, one request at a time, the targets taking turns (so
    drift on a shared machine hits both alike): unary Generate, and GenerateStream to its first chunk."""
    import grpc

    from loraplex.v1 import generation_pb2 as pb
    from loraplex.v1 import generation_pb2_grpc as pb_grpc

    req = pb.GenerateRequest(text="Hello", params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1)))
    channels = {name: grpc.aio.insecure_channel(t) for name, t in targets.items()}
    stubs = {name: pb_grpc.GenerationServiceStub(c) for name, c in channels.items()}

    async def unary(stub):
        await stub.Generate(req, timeout=60)

    async def first_chunk(stub):
        async for _ in stub.GenerateStream(req, timeout=60):
            return

    took = {name: {"unary": [], "stream": []} for name in targets}
    try:
        for call_name, call in (("unary", unary), ("stream", first_chunk)):
            for i in range(n + 3):
                for name, stub in stubs.items():
                    start = time.perf_counter()
                    await call(stub)
                    if i >= 3:                         # the first three warm each path up
                        took[name][call_name].append(time.perf_counter() - start)
    finally:
        for c in channels.values():
            await c.close()
    return took


def adapter_reads(front: FrontProcess) -> float:
    return sum(v for labels, v in front.samples("loraplex_adapter_loads_total").items() if ("result", "ok") in labels)


def run_cluster(root: pathlib.Path, trace: Trace, replicas: int, requests, adapters) -> dict:
    front = FrontProcess(*server_flags(root, trace, replicas), timeout=600)
    try:
        log.info("%d replica(s) up; sending %d requests", replicas, len(requests))
        cores = CoreShares(front.proc.pid).start()
        result = asyncio.run(send_trace(front.target, requests, adapters))
        result["cores"] = cores.stop()
        reads = adapter_reads(front)
        result["adapter_reads"] = reads
        result["resident_share"] = 1 - reads / len(requests)
        assert front.terminate(120) == 0
        return result
    finally:
        front.kill()


def front_latency(root: pathlib.Path, trace: Trace) -> dict:
    """A cluster front with 1 replica and a single server with 1 thread, both up at once, probed in turn."""
    fronts = {"cluster": FrontProcess(*server_flags(root, trace, 1), timeout=600),
              "single": FrontProcess(*server_flags(root, trace, 0), timeout=600)}
    try:
        took = asyncio.run(probe_latency({k: f.target for k, f in fronts.items()}, trace.latency_probes))
    finally:
        for f in fronts.values():
            f.terminate(120)
            f.kill()
    added = {}
    for call in ("unary", "stream"):
        c, a = np.array(took["cluster"][call]), np.array(took["single"][call])
        added[call] = {"added_p50_ms": 1000 * (np.percentile(c, 50) - np.percentile(a, 50)),
                       "added_p99_ms": 1000 * (np.percentile(c, 99) - np.percentile(a, 99)),
                       "cluster_p50_ms": 1000 * np.percentile(c, 50), "single_p50_ms": 1000 * np.percentile(a, 50)}
    return {c: {k: round(float(v), 2) for k, v in d.items()} for c, d in added.items()}


def run(trace: Trace, scratch: pathlib.Path) -> dict:
    from loraplex.server.model.store import embedded_model_dir

    names = make_peft_adapters(str(embedded_model_dir()), scratch, trace.adapters, trace.rank)
    requests = poisson_stream(trace.requests, trace.rate, trace.seed, trace.min_out, trace.max_out)
    adapters = zipf_choice(names, trace.requests, trace.zipf, trace.seed)
    results = {str(n): run_cluster(scratch, trace, n, requests, adapters) for n in (1, 2)}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(), "trace": asdict(trace), "replicas": results,
            "throughput_ratio": results["2"]["throughput_tok_s"] / results["1"]["throughput_tok_s"],
            "front_added_latency": front_latency(scratch, trace)}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["replicas"]
    labels = ["1 replica", "2 replicas"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar(labels, [r[k]["throughput_tok_s"] for k in ("1", "2")], color=["#999", "#4c72b0"])
    ax1.set(ylabel="output tokens/s", title=f"Throughput ({result['throughput_ratio']:.2f}x)")
    metrics = ("ttft_p50_s", "ttft_p99_s")
    for j, key in enumerate(("1", "2")):
        ax2.bar([i + (j - 0.5) * 0.38 for i in range(len(metrics))], [r[key][m] for m in metrics], 0.38,
                label=labels[j], color=["#999", "#4c72b0"][j])
    ax2.set_xticks(range(len(metrics)), ["TTFT p50", "TTFT p99"])
    ax2.set(ylabel="seconds", title="Time to first token")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['trace']['requests']} Poisson requests at {result['trace']['rate']}/s, "
                 f"Zipf adapters; 1 CPU per replica", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return one_run.traced_main(argv, "python -m loraplex.bench.cluster_bench", __doc__, "cluster",
                               "24 requests, 4 adapters", lambda args, scratch: run(QUICK if args.quick else Trace(),
                                                                                    scratch), plot, report)


def report(result: dict) -> None:
    print(json.dumps({k: result[k] for k in ("throughput_ratio", "front_added_latency")}, indent=1))
    for n, r in result["replicas"].items():
        print(n, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    sys.exit(main())
