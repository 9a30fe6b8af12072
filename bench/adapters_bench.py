"""Mixed-adapter benchmark: `python -m loraplex.bench.adapters_bench`.

Our engine serving a batch in which every request names a different LoRA adapter, against the same batch
with no adapter, and against PEFT's mixed-adapter `generate(adapter_names=...)` on the same NF4 base.
Optionally an online Poisson trace whose requests pick adapters by a power law over many registered
adapters, against the same trace all on one adapter. Writes adapters.json, adapters.png and the report.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

import torch

from loraplex.server.config import ServerConfig
from loraplex.server.engine.request import GenerationRequest, StoppingParams
from loraplex.server.metrics import Metrics
from loraplex.server.model.layout import TARGETS

from . import hf, machine
from .engine_bench import isolated, measure
from .adapter_files import make_peft_adapters, make_synthetic_adapters, saved_in_16bit, zipf_choice
from .adapters_plot import plot
from .bandwidth import adapter_reads, adapter_size, bandwidth_floor, read_bandwidth, trace_ceiling
from .ours import Recorder
from .workload import decode_prompts, last_tokens, poisson_stream, summarize

log = logging.getLogger("loraplex.bench.adapters")



@dataclasses.dataclass
class Settings:
    adapters: int = 16          # distinct adapters in the decode batch (= batch size)
    rank: int = 16
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 2            # decode rounds, best kept
    online: bool = True
    registered: int = 2000      # adapters on disk for the online trace
    distinct_files: int = 64    # distinct weight files behind them (hard links; see make_synthetic_adapters)
    zipf: float = 1.0           # popularity of the adapter ranked k is proportional to k^-zipf
    requests: int = 64
    rate: float = 8.0
    min_out: int = 8
    max_out: int = 64
    seed: int = 1234
    max_batch_size: int = 32
    kv_cache_mb: int = 512
    online_slots: int = 32
    online_rounds: int = 2      # the many- and one-adapter runs, alternated this many times
    wait_quiet: bool = True
    max_foreign: float = 0.10
    retries: int = 1
    background: bool = True     # ITL while adapters load in the background, and load-to-ready times
    background_streams: int = 8
    background_tokens: int = 192
    background_rate: float = 2.0   # adapter loads per second in the paced part
    background_rounds: int = 3     # steady / paced / back-to-back phases, alternated this many times
    loader_nice: int = 10       # the server's --adapter-loader-nice
    device: str = "auto"        # both sides: cpu, cuda[:N] or auto (cuda when available)
    dtype: str = "auto"         # both sides' compute dtype: auto = float32 on the CPU, bfloat16 on CUDA


QUICK = dict(adapters=4, new_tokens=8, repeats=1, registered=12, distinct_files=4, requests=8, rate=20.0,
             min_out=4, max_out=10, wait_quiet=False, online_slots=8, background_streams=2, background_tokens=24,
             background_rounds=1, online_rounds=1)


# Settings that have a flag of their own (--device cuda, --max-batch-size 64, ...).
TUNABLE = ("device", "dtype", "adapters", "rank", "prompt_tokens", "new_tokens", "repeats", "registered",
           "distinct_files", "requests", "rate", "max_out", "max_batch_size", "kv_cache_mb", "online_slots",
           "online_rounds", "background_streams", "background_tokens", "background_rate", "background_rounds")


# ---- our engine --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def engine_running(root: pathlib.Path | None, slots: int, rank: int, s: Settings, lora_fused: bool = True,
                   **settings):
    """settings: more ServerConfig fields (auto_merge=True, ...)."""
    from loraplex.server.build import launch_engine

    config = ServerConfig(max_batch_size=s.max_batch_size, kv_cache_mb=s.kv_cache_mb,
                          adapter_roots=str(root) if root else "", adapter_slots=slots, max_lora_rank=rank,
                          adapter_loader_nice=s.loader_nice, device=s.device, dtype=s.dtype, lora_fused=lora_fused,
                          **settings)
    engine, _ = launch_engine(config)
    try:
        yield engine
    finally:
        engine.stop()
        del engine
        gc.collect()


def _request(prompt: str, adapter: str, new_tokens: int, truncate: int = 0) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, adapter_id=adapter, truncate_input_tokens=truncate,
                             stopping=StoppingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))


def ours_decode(engine, prompts: list[str], adapters: list[str], prompt_tokens: int, new_tokens: int) -> float:
    """All submitted at once; B * (N - 1) / (last first token -> last token), as bench/ours.py."""
    rec = Recorder(len(prompts))
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(_request(prompt, adapter, new_tokens, prompt_tokens), rec.sink(i))
    rec.wait()
    start = max(times[0] for times in rec.token_times)
    end = max(times[-1] for times in rec.token_times)
    return len(prompts) * (new_tokens - 1) / (end - start)


def ours_online(engine, stream, adapters: list[str]) -> dict:
    rec = Recorder(len(stream))
    arrivals = []
    origin = time.perf_counter()
    for req, adapter in zip(stream, adapters):
        delay = origin + req.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrivals.append(time.perf_counter())
        engine.add_request(_request(req.prompt, adapter, req.output_len), rec.sink(req.index))
    rec.wait()
    first = arrivals[0]
    return summarize([a - first for a in arrivals], [[t - first for t in ts] for ts in rec.token_times])


# ---- PEFT --------------------------------------------------------------------------------------------------
def device_and_dtype(s: Settings) -> tuple[torch.device, torch.dtype]:
    """What the engine resolves s.device and s.dtype to (the same rules as the server's)."""
    from loraplex.server.build import pick_device, pick_dtype

    device = pick_device(s.device)
    return device, pick_dtype(s.dtype, device)


def peft_load(model_dir: str, root: pathlib.Path, names: list[str], s: Settings):
    from peft import PeftModel

    base, tokenizer = hf.load(model_dir, *device_and_dtype(s))
    model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(root / name), adapter_name=name)
    return model.eval(), tokenizer


def peft_decode(model, tokenizer, prompts: list[str], adapters: list[str] | None, prompt_tokens: int,
                new_tokens: int) -> float:
    """Equal-length prompts (no padding); decode rate from the streamer's per-step timestamps."""
    ids = torch.tensor([last_tokens(tokenizer, p, prompt_tokens) for p in prompts], device=model.device)
    streamer = hf.TimingStreamer()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    with torch.inference_mode():
        if adapters is None:
            with model.disable_adapter():
                model.generate(**kw)
        else:
            model.generate(adapter_names=adapters, **kw)
    times = streamer.token_times
    if len(times) != new_tokens:
        raise RuntimeError(f"generate made {len(times)} steps, expected {new_tokens}")
    return len(prompts) * (new_tokens - 1) / (times[-1] - times[0])


# ---- the run -----------------------------------------------------------------------------------------------
def run(s: Settings, root: pathlib.Path) -> dict:
    from loraplex.server.model.store import embedded_model_dir

    started = time.perf_counter()
    info = machine.describe()
    model_dir = str(embedded_model_dir())
    info["model"] = pathlib.Path(model_dir).name
    device, dtype = device_and_dtype(s)
    info["device"], info["dtype"] = str(device), str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    names = isolated(lambda: make_peft_adapters(model_dir, root, s.adapters, s.rank))
    log.info("made %d PEFT adapters in %.1f s", len(names), time.perf_counter() - t0)
    # the same adapters saved in bfloat16, which the CPU engine keeps as saved (float32 compute only)
    halves = saved_in_16bit(root, names) if device.type == "cpu" and dtype == torch.float32 else []
    prompts = decode_prompts(s.adapters)
    b = len(prompts)
    kinds = ("ours_distinct", "ours_distinct_bf16", "ours_base", "peft_mixed", "peft_base")
    runs: dict[str, list] = {k: [] for k in kinds if halves or k != "ours_distinct_bf16"}

    def record(kind, fn, rep):
        value, foreign = measure(fn, s)
        log.info("%-25s %s %7.1f tok/s (others used %.0f%% of the CPU)", kind,
                 "warm-up" if rep < 0 else f"round {rep + 1}", value, foreign * 100)
        if rep >= 0:
            runs[kind].append((value, foreign))

    with engine_running(root, len(names + halves), s.rank, s) as engine:
        # warm-up: compiles/loads everything, and puts all adapters into their device slots
        record("ours_distinct", lambda: ours_decode(engine, prompts, names, s.prompt_tokens, 4), -1)
        if halves:
            record("ours_distinct_bf16", lambda: ours_decode(engine, prompts, halves, s.prompt_tokens, 4), -1)
        for rep in range(s.repeats):
            record("ours_distinct", lambda: ours_decode(engine, prompts, names, s.prompt_tokens, s.new_tokens), rep)
            if halves:
                record("ours_distinct_bf16",
                       lambda: ours_decode(engine, prompts, halves, s.prompt_tokens, s.new_tokens), rep)
            record("ours_base", lambda: ours_decode(engine, prompts, [""] * b, s.prompt_tokens, s.new_tokens), rep)
    if device.type == "cuda":    # the LoRA path the CUDA engine does not take by default, for comparison
        runs["ours_distinct_two_kernels"] = []
        with engine_running(root, s.adapters, s.rank, s, lora_fused=False) as engine:
            ours_decode(engine, prompts, names, s.prompt_tokens, 4)
            for rep in range(s.repeats):
                record("ours_distinct_two_kernels",
                       lambda: ours_decode(engine, prompts, names, s.prompt_tokens, s.new_tokens), rep)
    model, tokenizer = isolated(lambda: peft_load(model_dir, root, names, s))
    record("peft_mixed", lambda: peft_decode(model, tokenizer, prompts, names, s.prompt_tokens, 4), -1)
    for rep in range(s.repeats):
        record("peft_mixed", lambda: peft_decode(model, tokenizer, prompts, names, s.prompt_tokens, s.new_tokens),
               rep)
        record("peft_base", lambda: peft_decode(model, tokenizer, prompts, None, s.prompt_tokens, s.new_tokens), rep)
    del model
    gc.collect()
    best = {k: max(v for v, _ in vals) for k, vals in runs.items()}
    decode = {"batch": b, "adapters": s.adapters, "rank": s.rank, "targets": list(TARGETS),
              "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
              **{f"{k}_tok_s": v for k, v in best.items()},
              **{f"{k}_all": [v for v, _ in vals] for k, vals in runs.items()},
              **{f"{k}_foreign_cpu": [f for _, f in vals] for k, vals in runs.items()},
              "ours_distinct_vs_peft_mixed": best["ours_distinct"] / best["peft_mixed"],
              "ours_distinct_vs_ours_base": best["ours_distinct"] / best["ours_base"],
              "peft_mixed_vs_peft_base": best["peft_mixed"] / best["peft_base"]}
    decode.update(bandwidth_floor(best["ours_base"], b, s.rank, device, dtype))
    if halves:
        decode.update({"ours_distinct_bf16_vs_ours_base": best["ours_distinct_bf16"] / best["ours_base"],
                       "ours_distinct_bf16_vs_peft_mixed": best["ours_distinct_bf16"] / best["peft_mixed"],
                       "ours_distinct_bf16_vs_ours_distinct": best["ours_distinct_bf16"] / best["ours_distinct"]})
        log.info("decode, adapters saved in bfloat16: ours-distinct/ours-base %.3f (floor %.3f)",
                 decode["ours_distinct_bf16_vs_ours_base"], decode["floor_ratio_vs_base_16bit"])
    log.info("decode: ours-distinct/PEFT-mixed %.2fx, ours-distinct/ours-base %.3f",
             decode["ours_distinct_vs_peft_mixed"], decode["ours_distinct_vs_ours_base"])
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": dataclasses.asdict(s), "machine": info, "decode": decode}
    if s.online or s.background:
        t0 = time.perf_counter()
        many = isolated(lambda: make_synthetic_adapters(root / names[0], root, s.registered, s.seed,
                                                        s.distinct_files))
        log.info("wrote %d adapters in %.1f s", len(many), time.perf_counter() - t0)
    if s.online:
        result["online"] = run_online(s, root, many)
    if s.background:
        from .adapters_background import run_background

        result["background"] = run_background(s, root, many)
    result["seconds"] = time.perf_counter() - started
    return result


def run_online(s: Settings, root: pathlib.Path, many: list[str]) -> dict:
    stream = poisson_stream(s.requests, s.rate, s.seed, s.min_out, s.max_out)
    picks = zipf_choice(many, len(stream), s.zipf, s.seed)
    traces = {"many": picks, "one": [many[0]] * len(stream)}
    runs: dict[str, list] = {"many": [], "one": []}
    for _ in range(s.online_rounds):   # alternated, so that both halves see the same drift of a shared machine
        for label in runs:             # a fresh engine each, so "many" starts with cold host cache and slots
            with engine_running(root, s.online_slots, s.rank, s) as engine:
                ours_decode(engine, ["Hello there, how are you today?"], [many[-1]], 0, 4)   # warm-up
                metrics = Metrics()
                engine.observe(metrics)
                res, foreign = measure(lambda: ours_online(engine, stream, traces[label]), s)
            res["foreign_cpu"] = foreign
            res["adapter_reads"], res["steps"] = adapter_reads(metrics)
            runs[label].append(res)
            log.info("online %-4s: %.1f tok/s, TTFT p50 %.3f p99 %.3f s, ITL p50 %.3f p99 %.3f s", label,
                     res["throughput_tok_s"], res["ttft_p50_s"], res["ttft_p99_s"], res["itl_p50_s"],
                     res["itl_p99_s"])
    # each half's best round (as for decode: noise only ever slows a round), every round's throughput beside it
    out = {label: {**max(rs, key=lambda r: r["throughput_tok_s"]),
                   "throughput_rounds_tok_s": [r["throughput_tok_s"] for r in rs]} for label, rs in runs.items()}
    device, dtype = device_and_dtype(s)
    bandwidth = read_bandwidth(device)
    ceiling = trace_ceiling(out["many"], out["one"], adapter_size(s.rank, dtype), bandwidth)
    log.info("online: many/one %.3f against a ceiling of %.3f (%.2f against %.2f adapters read a step)",
             out["many"]["throughput_tok_s"] / out["one"]["throughput_tok_s"], ceiling,
             out["many"]["adapter_reads"] / out["many"]["steps"], out["one"]["adapter_reads"] / out["one"]["steps"])
    counts = sorted(((picks.count(n), n) for n in set(picks)), reverse=True)
    return {"registered_adapters": len(many), "distinct_adapters_used": len(counts),
            "top_adapter_requests": counts[0][0], "requests": len(stream), "rate_per_s": s.rate,
            "output_lens": [r.output_len for r in stream], "last_arrival_s": stream[-1].arrival,
            "slots": s.online_slots, **out, "read_bandwidth_gb_s": bandwidth / 1e9, "ceiling_ratio_many_vs_one": ceiling,
            "throughput_ratio_many_vs_one": out["many"]["throughput_tok_s"] / out["one"]["throughput_tok_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraplex.bench.adapters_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir by default")
    p.add_argument("--no-online", action="store_true", help="skip the online power-law trace")
    p.add_argument("--no-background", action="store_true", help="skip the background-loading measurement")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet CPU")
    p.add_argument("--out", help="folder for adapters.json/png [default docs/benchmarks]")
    p.add_argument("--name", default="adapters", help="file names: NAME.json, NAME.png [default adapters]")
    for name in TUNABLE:
        kind = type(getattr(Settings, name))
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                       help=f"[default {getattr(Settings, name)!r}]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    s = Settings(**(QUICK if args.quick else {}))
    for name in TUNABLE:
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.online = not args.no_online
    s.background = not args.no_background
    if args.no_wait:
        s.wait_quiet = False
    out = pathlib.Path(args.out or (os.path.join(tempfile.gettempdir(), "loraplex-adapters-quick") if args.quick
                                    else "docs/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-adapters-") as tmp:
        result = run(s, pathlib.Path(tmp))
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{args.name}.png")
    print(json.dumps({k: v for k, v in result["decode"].items() if not k.endswith(("_all", "_cpu", "targets"))},
                     indent=1))
    if "online" in result:
        o = result["online"]
        print(json.dumps({k: {m: o[k][m] for m in ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
                                                  "itl_p99_s")} for k in ("many", "one")}, indent=1))
        print("online throughput ratio many/one:", round(o["throughput_ratio_many_vs_one"], 3),
              "against a ceiling of", round(o["ceiling_ratio_many_vs_one"], 3))
    if "background" in result:
        print(json.dumps({k: v for k, v in result["background"].items()}, indent=1))
    print("wrote", out / f"{args.name}.json", out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
