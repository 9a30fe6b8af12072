"""Adapter kinds in one batch: `python -m loraplex.bench.kinds_bench`.

Our engine decoding a batch of 16 requests, each on its own rank-16 adapter (all 7 projections of the
embedded model), with every adapter plain LoRA, half of them DoRA, or all DoRA, against the same batch on
the base model alone; rounds alternate so that all four see the same drift of a shared machine. Also the
cold load of one adapter of each kind (read, DoRA's norms over the dequantized base weights, slot copy).
Writes kinds.json and kinds.png.
"""

import dataclasses
import datetime
import logging
import pathlib
import sys
import time

from . import machine, one_run
from .adapter_files import make_peft_adapters
from .adapters_bench import Settings, engine_running, ours_decode
from .engine_bench import isolated, measure
from .workload import decode_prompts

log = logging.getLogger("loraplex.bench.kinds")


def run(s: Settings, root: pathlib.Path, rounds: int) -> dict:
    from loraplex.server.model.store import embedded_model_dir

    model_dir = str(embedded_model_dir())
    lora = isolated(lambda: make_peft_adapters(model_dir, root, s.adapters, s.rank))
    dora = isolated(lambda: make_peft_adapters(model_dir, root, s.adapters, s.rank, dora=True))
    prompts = decode_prompts(s.adapters)
    half = s.adapters // 2
    batches = {"lora": lora, "half_dora": lora[:half] + dora[half:], "dora": dora, "base": [""] * s.adapters}
    runs: dict[str, list[float]] = {k: [] for k in batches}
    loads = {}
    with engine_running(root, 2 * s.adapters + 2, s.rank, s) as engine:
        for kind, name in (("lora", lora[0]), ("dora", dora[0])):   # one cold load of each kind, timed
            started = time.perf_counter()
            engine.adapters.preload(name).result()
            loads[f"{kind}_load_ms"] = round((time.perf_counter() - started) * 1000, 1)
        for names in batches.values():                                 # warm-up: every adapter into its slot
            isolated(lambda: ours_decode(engine, prompts, names, s.prompt_tokens, 4))
        for rep in range(rounds):
            for kind, names in batches.items():
                value, _ = measure(lambda: ours_decode(engine, prompts, names, s.prompt_tokens, s.new_tokens), s)
                runs[kind].append(value)
                log.info("%-9s round %d %7.1f tok/s", kind, rep + 1, value)
    best = {k: max(v) for k, v in runs.items()}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(), "settings": dataclasses.asdict(s), "rounds": rounds,
            "tok_s": best, "tok_s_all": runs, **loads,
            "vs_base": {k: best[k] / best["base"] for k in best},
            "vs_lora": {k: best[k] / best["lora"] for k in best}}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["base", "lora", "half_dora", "dora"]
    labels = ["base only", "16 LoRA", "8 LoRA + 8 DoRA", "16 DoRA"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(labels, [result["tok_s"][k] for k in kinds], color=["#999", "#4c72b0", "#6a9bd1", "#dd8452"])
    for bar, kind in zip(bars, kinds):
        ax.annotate(f"{result['vs_base'][kind]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tokens/s (batch 16)")
    ax.set_title("adapter kinds in one batch (x = vs base only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return one_run.main(argv, "python -m loraplex.bench.kinds_bench", __doc__, "kinds", run, plot, ("tok_s", "vs_base", "vs_lora", "lora_load_ms", "dora_load_ms"))


if __name__ == "__main__":
    sys.exit(main())
