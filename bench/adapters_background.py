"""The adapter benchmark's background-loading part: decoding while other adapters load, and how long a
load takes to reach a device slot."""

import itertools
import logging
import pathlib
import threading
import time

import numpy as np

from .adapters_bench import Settings, _request, engine_running, ours_decode
from .ours import Recorder
from .workload import decode_prompts

log = logging.getLogger("loraplex.bench.adapters")

IDLE_LOADS = 8


def run_background(s: Settings, root: pathlib.Path, many: list[str]) -> dict:
    """Decode inter-token latency of a steady batch on one adapter: alone, while other adapters load at a
    steady pace (s.background_rate per second), and while they load back to back (as fast as the loader
    goes). Loads go through the loader like LoadAdapter: read from disk, validated, copied into a slot.
    Also load-to-ready times, idle and under each kind of load.

    The three phases alternate for s.background_rounds rounds, and each phase reports the median of its
    rounds: on a shared machine the steady p99 alone moves by 1.5x from one phase to the next, so one
    phase of each, one after the other, compares noise as much as loads."""
    prompts = decode_prompts(s.background_streams)
    hot = [many[0]] * len(prompts)
    queue = itertools.cycle(many[1:])          # (only the quick run comes round again)
    phases = {"steady": None, "paced": 1.0 / s.background_rate, "flat_out": 0.0}
    rounds: dict[str, list] = {label: [] for label in phases}
    with engine_running(root, s.online_slots, s.rank, s) as engine:
        ours_decode(engine, prompts[:1], hot[:1], s.prompt_tokens, 4)              # warm-up, puts s0 in a slot
        idle = [load_to_ready(engine, next(queue)) for _ in range(IDLE_LOADS)]     # nothing else running
        for _ in range(s.background_rounds):
            for label, interval in phases.items():
                rounds[label].append(itl_while_loading(engine, prompts, hot, s, queue, interval))
    out = {"streams": len(prompts), "tokens": s.background_tokens, "rate_per_s": s.background_rate,
           "rounds": s.background_rounds, "load_to_ready_idle_p50_s": float(np.percentile(idle, 50))}
    for label, runs in rounds.items():
        out[label] = {key: float(np.median([r[key] for r in runs])) for key in ("itl_p50_s", "itl_p99_s", "itl_max_s")}
        out[label]["itl_p99_rounds_s"] = [r["itl_p99_s"] for r in runs]
        if label != "steady":
            ready = [t for r in runs for t in r["ready"]]
            out[label].update(loads=len(ready), load_to_ready_p50_s=float(np.percentile(ready, 50)),
                              itl_p99_vs_steady=out[label]["itl_p99_s"] / out["steady"]["itl_p99_s"])
            log.info("background loads, %s: %d loads, ITL p99 %.4f s vs %.4f s steady (x%.2f; median of %d "
                     "rounds), load-to-ready p50 %.3f s", label, len(ready), out[label]["itl_p99_s"],
                     out["steady"]["itl_p99_s"], out[label]["itl_p99_vs_steady"], len(runs),
                     out[label]["load_to_ready_p50_s"])
    return out


def itl_while_loading(engine, prompts, adapters, s: Settings, queue, interval: float | None) -> dict:
    """stream_itl, with adapters loading meanwhile every `interval` seconds (0: back to back; None: none)."""
    if interval is None:
        return stream_itl(engine, prompts, adapters, s)
    stop, ready = threading.Event(), []

    def load_continuously():
        while not stop.is_set():
            started = time.perf_counter()
            ready.append(load_to_ready(engine, next(queue)))
            stop.wait(max(0.0, interval - (time.perf_counter() - started)))

    loader = threading.Thread(target=load_continuously)
    loader.start()
    time.sleep(0.2)                                        # loads under way before the batch starts
    try:
        result = stream_itl(engine, prompts, adapters, s)
    finally:
        stop.set()
        loader.join()
    return {**result, "ready": ready}


def load_to_ready(engine, adapter_id: str) -> float:
    """Seconds from asking the loader until the adapter sits in a device slot (as LoadAdapter + preload)."""
    started = time.perf_counter()
    engine.adapters.preload(adapter_id).result()
    return time.perf_counter() - started


def stream_itl(engine, prompts: list[str], adapters: list[str], s: Settings) -> dict:
    rec = Recorder(len(prompts))
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(_request(prompt, adapter, s.background_tokens, s.prompt_tokens), rec.sink(i))
    rec.wait()
    itl = np.concatenate([np.diff(times[1:]) for times in rec.token_times])   # decode steps only
    return {"itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
            "itl_max_s": float(itl.max()), "samples": int(itl.size)}
