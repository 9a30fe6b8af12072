"""One adapter merged into the weights against the base alone: `python -m loraplex.bench.merge_bench`.

Our engine decoding a batch of 16 requests, all on one rank-16 adapter (all 7 projections of the embedded
model): the base model alone, the adapter through the LoRA path, the adapter merged `dense` and merged
`requantize`; rounds alternate the four so that all see the same drift of a shared machine, and the merges
are made (and undone) inside each round. Also each merge's build time, memory and share of the update kept.
Writes merge.json and merge.png.
"""

import dataclasses
import datetime
import logging
import pathlib
import sys

from . import machine, one_run
from .adapter_files import make_peft_adapters
from .adapters_bench import Settings, engine_running, ours_decode
from .engine_bench import isolated, measure
from .workload import decode_prompts

log = logging.getLogger("loraplex.bench.merge")
CASES = ("base", "unmerged", "dense", "requantize")


def run(s: Settings, root: pathlib.Path, rounds: int) -> dict:
    from loraplex.server.model.store import embedded_model_dir

    name = isolated(lambda: make_peft_adapters(str(embedded_model_dir()), root, 1, s.rank))[0]
    prompts = decode_prompts(s.adapters)
    runs: dict[str, list[float]] = {k: [] for k in CASES}
    merges: dict[str, dict] = {}
    with engine_running(root, 2, s.rank, s) as engine:
        isolated(lambda: ours_decode(engine, prompts, [name] * s.adapters, s.prompt_tokens, 4))   # warm-up
        for rep in range(rounds):
            for case in CASES:
                if case in ("dense", "requantize"):
                    status = engine.weights.merge(name, case).result()
                    merges[case] = {"seconds": round(status.seconds, 3), "bytes": status.size_bytes,
                                    "retained": round(status.retained, 4)}
                adapter = "" if case == "base" else name
                value, _ = measure(lambda: ours_decode(engine, prompts, [adapter] * s.adapters, s.prompt_tokens,
                                                       s.new_tokens), s)
                if case in ("dense", "requantize"):
                    engine.weights.unmerge()
                runs[case].append(value)
                log.info("%-10s round %d %7.1f tok/s", case, rep + 1, value)
    best = {k: max(v) for k, v in runs.items()}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(), "settings": dataclasses.asdict(s), "rounds": rounds,
            "tok_s": best, "tok_s_all": runs, "merges": merges,
            "vs_base": {k: best[k] / best["base"] for k in best}}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["base only", "adapter (LoRA path)", "merged dense", "merged requantize"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(labels, [result["tok_s"][k] for k in CASES], color=["#999", "#4c72b0", "#55a868", "#dd8452"])
    for bar, case in zip(bars, CASES):
        ax.annotate(f"{result['vs_base'][case]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"decode tokens/s (batch {result['settings']['adapters']})")
    ax.set_title("one adapter for every request, merged or not (x = vs base only)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return one_run.main(argv, "python -m loraplex.bench.merge_bench", __doc__, "merge", run, plot, ("tok_s", "vs_base", "merges"))


if __name__ == "__main__":
    sys.exit(main())
