"""`loraplex bench`: our engine against HF transformers `generate` on the same NF4 model, in one process.

Measures decode throughput at several batch sizes, the weights-only floor of a decode step, and an online
Poisson workload, then writes engine.json, engine.png and the markdown report.
"""

import argparse
import dataclasses
import datetime
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

from . import floor as floor_mod, hf, ours, report
from .workload import PROMPTS, decode_prompts, poisson_stream

log = logging.getLogger("loraplex.bench")


@dataclasses.dataclass
class Settings:
    quick: bool = False
    batches: tuple[int, ...] = (1, 8, 16, 32)
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3
    floor_repeats: int = 10
    requests: int = 64
    rate: float = 3.0
    seed: int = 1234
    min_out: int = 8
    max_out: int = 128
    hf_batch: int = 16
    max_batch_size: int = 32
    kv_cache_mb: int = 512


QUICK = dict(batches=(1, 4), new_tokens=8, repeats=1, floor_repeats=2, requests=8, rate=20.0, min_out=4,
             max_out=12, hf_batch=4)


def parse_args(argv) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="loraplex bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min); writes to a temp dir by default")
    p.add_argument("--out", help="folder for engine.json and engine.png; the report goes to <out>.md "
                                 "[default docs/benchmarks, or a temp dir with --quick]")
    p.add_argument("--batches", help="comma-separated decode batch sizes")
    for name, kind in (("prompt_tokens", int), ("new_tokens", int), ("repeats", int), ("requests", int),
                       ("rate", float), ("seed", int), ("hf_batch", int), ("min_out", int), ("max_out", int)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    p.add_argument("--model", default="", help="checkpoint directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    settings = Settings(quick=args.quick, **(QUICK if args.quick else {}))
    if args.batches:
        settings.batches = tuple(int(b) for b in args.batches.split(","))
    for f in dataclasses.fields(Settings):
        if getattr(args, f.name, None) is not None and f.name not in ("quick", "batches"):
            setattr(settings, f.name, getattr(args, f.name))
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "loraplex-bench-quick") if args.quick else "docs/benchmarks"
    return settings, args


def machine_info(model: str) -> dict:
    import bitsandbytes
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "model": model, "load_start": os.getloadavg()[0]}


def run_decode(engine, hf_model, tokenizer, floor, s: Settings) -> list[dict]:
    ours_all = {b: [] for b in s.batches}
    hf_all = {b: [] for b in s.batches}
    for rep in range(-1, s.repeats):            # rep -1 is the warm-up
        for b in s.batches:
            prompts = decode_prompts(b)
            o = ours.decode_tokens_per_s(engine, prompts, s.prompt_tokens, s.new_tokens)
            h = hf.decode_tokens_per_s(hf_model, tokenizer, prompts, s.prompt_tokens, s.new_tokens)
            log.info("decode B=%d %s: loraplex %.1f tok/s, HF %.1f tok/s", b, "warm-up" if rep < 0 else rep, o, h)
            if rep >= 0:
                ours_all[b].append(o)
                hf_all[b].append(h)
    rows = []
    for b in s.batches:
        dq = b / floor.step_seconds(b, fused=False, repeats=s.floor_repeats)
        fu = b / floor.step_seconds(b, fused=True, repeats=s.floor_repeats)
        o, h = max(ours_all[b]), max(hf_all[b])
        log.info("floor B=%d: dequant %.1f tok/s, fused %.1f tok/s", b, dq, fu)
        rows.append({"batch": b, "ours_tok_s": o, "hf_tok_s": h, "ratio": o / h, "ours_all": ours_all[b],
                     "hf_all": hf_all[b], "floor_dequant_tok_s": dq, "floor_fused_tok_s": fu,
                     "ours_vs_floor_dequant": o / dq, "ours_vs_floor_fused": o / fu})
    return rows


def run_online(engine, hf_model, tokenizer, s: Settings) -> dict:
    stream = poisson_stream(s.requests, s.rate, s.seed, s.min_out, s.max_out)
    log.info("online: %d requests at %.2f/s, last arrival %.1f s", len(stream), s.rate, stream[-1].arrival)
    mine = ours.online(engine, stream)
    log.info("online loraplex: %.1f tok/s", mine["throughput_tok_s"])
    theirs = hf.online(hf_model, tokenizer, stream, s.hf_batch)
    log.info("online HF: %.1f tok/s", theirs["throughput_tok_s"])
    lengths = [len(tokenizer.encode(r.prompt)) for r in stream]
    keys = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s")
    return {"ours": mine, "hf": theirs, "ratios": {k.removesuffix("_s").removesuffix("_tok"): mine[k] / theirs[k]
                                                   for k in keys},
            "arrivals_s": [r.arrival for r in stream], "output_lens": [r.output_len for r in stream],
            "prompt_tokens": lengths, "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
            "last_arrival_s": stream[-1].arrival}


def run(s: Settings, model: str = "") -> dict:
    from loraplex.server.build import build_engine
    from loraplex.server.config import ServerConfig

    started = time.perf_counter()
    engine, desc = build_engine(ServerConfig(model=model, max_batch_size=s.max_batch_size, kv_cache_mb=s.kv_cache_mb,
                                             warmup=False))
    machine = machine_info(desc.name)
    hf_model, tokenizer = hf.load(desc.directory)
    floor = floor_mod.Floor(desc.directory)
    machine["quantized_parameters"] = floor.parameters
    engine.start()
    try:
        decode = run_decode(engine, hf_model, tokenizer, floor, s)
        online = run_online(engine, hf_model, tokenizer, s)
    finally:
        engine.stop()
    machine["load_end"] = os.getloadavg()[0]
    return {"date": datetime.date.today().isoformat(), "machine": machine, "settings": dataclasses.asdict(s),
            "decode": decode, "floor": {"dequant_only_s": floor.dequant_only_seconds(s.floor_repeats),
                                        "parameters": floor.parameters},
            "online": online, "wall_s": time.perf_counter() - started,
            "goals": [{"goal": g, "measured": v, "met": ok} for g, v, ok in report.goals(
                {"decode": decode, "online": online})]}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    settings, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(settings, args.model)
    out = pathlib.Path(args.out)
    doc = out.with_suffix(".md") if out.suffix == "" else out.with_name(out.name + ".md")
    report.write_all(results, out, doc)
    for name, value, ok in report.goals(results):
        print(f"{'MET    ' if ok else 'NOT MET'} {name}: {value}")
    print(f"wrote {doc}, {out / 'engine.json'}, {out / 'engine.png'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
