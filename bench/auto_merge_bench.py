"""--auto-merge on a trace that alternates single-adapter and mixed phases: `python -m loraplex.bench.auto_merge_bench`.

Closed-loop clients (each sends its next request when the last one ends) run the same phases four ways on
one engine, one after the other, in rounds (so that all four see the same drift of a shared machine):
every request on the base model (base only), adapters with merging off (never merging), and --auto-merge
with each merge method, each starting as a fresh server would (nothing merged, no hold). In a single phase
every request names one adapter (a0); in a mixed phase each names one of the adapters at random. Per phase:
decode throughput (tokens that came out inside the phase over its length) and, for requests of the other
adapters, time to first token; ratios within each round, the median over rounds. Also when each merged
copy became ready. Writes auto_merge.json and auto_merge.png.
"""

import dataclasses
import datetime
import json
import logging
import pathlib
import random
import sys
import threading
import time

import numpy as np

from . import machine, one_run
from .adapter_files import make_peft_adapters
from .adapters_bench import Settings, _request, engine_running
from .engine_bench import isolated
from .ours import Recorder
from .workload import decode_prompts

log = logging.getLogger("loraplex.bench.auto_merge")
RUNS = {"base": None, "never": None, "auto-dense": "dense", "auto-requantize": "requantize"}   # -> merge method
HOT = "a0"


@dataclasses.dataclass
class Trace:
    clients: int = 16
    adapters: int = 8
    phases: tuple = (("single", 40.0), ("mixed", 50.0))
    rounds: int = 2
    new_tokens: int = 32
    prompt_tokens: int = 32
    seed: int = 7


QUICK = Trace(clients=6, adapters=3, phases=(("single", 8.0), ("mixed", 6.0)), new_tokens=8, rounds=1)   # 6: above min_requests


def run_trace(engine, trace: Trace, names: list[str], base_only: bool) -> dict:
    """The phases on a running engine: each request's (phase, adapter, sent, token times), and when the
    merged copy changed."""
    prompts, bounds = decode_prompts(trace.clients), []
    records, lock, stop = [], threading.Lock(), threading.Event()
    phase = [0]

    def client(i: int) -> None:
        rng = random.Random(trace.seed * 1000 + i)
        while not stop.is_set():
            kind = trace.phases[phase[0]][0]
            adapter = "" if base_only else (HOT if kind == "single" else rng.choice(names))
            rec, sent = Recorder(1), time.perf_counter()
            engine.add_request(_request(prompts[i], adapter, trace.new_tokens, trace.prompt_tokens), rec.sink(0))
            rec.wait()
            with lock:
                records.append({"phase": phase[0], "adapter": adapter, "sent": sent, "times": rec.token_times[0]})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(trace.clients)]
    timeline, origin = [], time.perf_counter()
    for t in threads:
        t.start()
    for index, (_, seconds) in enumerate(trace.phases):
        phase[0] = index
        bounds.append(time.perf_counter())
        end = bounds[-1] + seconds
        while time.perf_counter() < end:
            merged = engine.weights.current()[0] if engine.weights is not None else None
            state = f"{merged[0]} ({merged[2]})" if merged else None
            if not timeline or timeline[-1][1] != state:
                timeline.append((round(time.perf_counter() - origin, 2), state))
            time.sleep(0.05)
    bounds.append(time.perf_counter())
    stop.set()
    for t in threads:
        t.join(600)
    return {"phases": _per_phase(trace, records, bounds), "timeline": timeline,
            "tok_s_by_2s": _rate(records, origin, bounds[-1] - origin)}


def _rate(records: list[dict], origin: float, seconds: float, width: float = 2.0) -> list[float]:
    """Decode tokens per second in consecutive windows of `width` seconds from the trace's start."""
    counts = np.zeros(int(np.ceil(seconds / width)))
    for t in (t - origin for r in records for t in r["times"]):
        if 0 <= t < len(counts) * width:
            counts[int(t // width)] += 1
    return [round(c / width, 1) for c in counts]


def _per_phase(trace: Trace, records: list[dict], bounds: list[float]) -> list[dict]:
    out = []
    for index, (kind, _) in enumerate(trace.phases):
        start, end = bounds[index], bounds[index + 1]
        tokens = sum(start <= t < end for r in records for t in r["times"])
        others = [r["times"][0] - r["sent"] for r in records
                  if r["phase"] == index and r["adapter"] not in ("", HOT) and r["times"]]
        out.append({"kind": kind, "seconds": round(end - start, 2), "tok_s": tokens / (end - start),
                    "others": len(others),
                    "others_ttft_p99_s": float(np.percentile(others, 99)) if others else None})
    return out


def run(trace: Trace, root: pathlib.Path, s: Settings) -> dict:
    from loraplex.server.engine.auto_merge import AutoMergeSettings
    from loraplex.server.engine.auto_planner import AutoPlanner
    from loraplex.server.model.store import embedded_model_dir

    names = isolated(lambda: make_peft_adapters(str(embedded_model_dir()), root, trace.adapters, s.rank))
    results: dict[str, list] = {name: [] for name in RUNS}
    with engine_running(root, trace.adapters + 1, s.rank, s) as engine:
        _warm_up(engine, ["", *names], trace)
        for _ in range(trace.rounds):
            for name, method in RUNS.items():
                engine.auto = AutoPlanner(engine.weights, AutoMergeSettings(), method) if method else None
                results[name].append(run_trace(engine, trace, names, base_only=name == "base"))
                engine.auto = None
                _unmerge(engine)
                log.info("%s: %s", name, [round(p["tok_s"], 1) for p in results[name][-1]["phases"]])
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(), "trace": dataclasses.asdict(trace), "rank": s.rank,
            "runs": results, "ratios": ratios(results, trace.rounds)}


def _unmerge(engine) -> None:
    """Back to a fresh server's state: nothing merged, the merged copies dropped, no switch to cool down from."""
    while True:
        current, merged, building = engine.weights.current()
        if not building:
            break
        time.sleep(0.05)
    if merged is not None:
        engine.weights.unmerge()
    while engine.weights.memory():
        time.sleep(0.05)
    engine.weights.last_switch = -float("inf")


def _warm_up(engine, adapters: list[str], trace: Trace) -> None:
    """One short request per adapter, so every adapter is read and in a slot before the trace."""
    rec = Recorder(len(adapters))
    for i, (prompt, adapter) in enumerate(zip(decode_prompts(len(adapters)), adapters)):
        engine.add_request(_request(prompt, adapter, 4, trace.prompt_tokens), rec.sink(i))
    rec.wait()


def ratios(results: dict, rounds: int) -> dict:
    """Per auto run and phase, the median over rounds of (within a round): throughput vs base only and vs
    never merging, and the other adapters' TTFT p99 vs never merging."""
    out = {}
    for name in list(RUNS)[2:]:
        rows = []
        for i, phase in enumerate(results["base"][0]["phases"]):
            per_round = [_ratio_row(*(results[k][r]["phases"][i] for k in (name, "base", "never")))
                         for r in range(rounds)]
            rows.append({"kind": phase["kind"], **{key: _median([row[key] for row in per_round])
                                                    for key in per_round[0]}})
        out[name] = rows
    return out


def _ratio_row(mine: dict, base: dict, never: dict) -> dict:
    ttft = (mine["others_ttft_p99_s"] / never["others_ttft_p99_s"]
            if mine["others_ttft_p99_s"] and never["others_ttft_p99_s"] else None)
    return {"vs_base": mine["tok_s"] / base["tok_s"], "vs_never": mine["tok_s"] / never["tok_s"],
            "others_ttft_p99_vs_never": ttft}


def _median(values: list):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [(r, p) for r, run in enumerate(result["runs"]["base"]) for p in run["phases"]]
    x = np.arange(len(phases))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, name in enumerate(RUNS):
        tok_s = [p["tok_s"] for run in result["runs"][name] for p in run["phases"]]
        ax.bar(x + (i - 1.5) * 0.2, tok_s, 0.2, label=name)
    ax.set_xticks(x, [f"{p['kind']}, round {r + 1}" for r, p in phases], fontsize=7)
    ax.set_ylabel(f"decode tokens/s ({result['trace']['clients']} clients)")
    ax.set_title("one adapter, then many, and back: merging as the traffic moves", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return one_run.traced_main(
        argv, "python -m loraplex.bench.auto_merge_bench", __doc__, "auto_merge", "6 clients, 8 and 6 s phases, 8 tokens",
        lambda args, scratch: run(QUICK if args.quick else Trace(), scratch, Settings(wait_quiet=False)), plot,
        lambda result: print(json.dumps(result["ratios"], indent=1)))


if __name__ == "__main__":
    sys.exit(main())
