"""The INT4 base against the NF4 base, and a QA-LoRA adapter merged exactly: `python -m loraplex.bench.int4_bench`.

Two engines on the embedded model, one with each 4-bit format (int4 group 64, nf4 block 64), held at once
and measured in turn within each round (so both see the same drift of a shared machine): base-only decode
at batch 1, 8 and 16; on the int4 engine, a batch all on one rank-16 QA-LoRA adapter (all 7 projections,
group 64) through the LoRA path and merged `exact`. Also the exact merge's build time (the switch: only
the scale/zero tensors are written) and its memory. Best of the rounds. Writes int4.json and int4.png.
"""

import dataclasses
import datetime
import logging
import pathlib
import sys

import torch

from . import machine, one_run
from .adapters_bench import Settings, engine_running, ours_decode
from .engine_bench import isolated, measure
from .workload import decode_prompts

log = logging.getLogger("loraplex.bench.int4")
GROUP = 64
BATCHES = (1, 8, 16)


def make_qalora(root: pathlib.Path, rank: int) -> str:
    """A random QA-LoRA adapter (PEFT's use_qalora layout) on the embedded model, in root/q0."""
    from transformers import AutoModelForCausalLM

    from loraplex.adapters.train_qalora import QALoraModel
    from loraplex.server.model.layout import TARGETS
    from loraplex.server.model.store import embedded_model_dir

    torch.manual_seed(7)
    model = QALoraModel(AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32), TARGETS,
                        rank, 2 * rank, GROUP)
    with torch.no_grad():
        for name, p in model.factors.items():
            if name.endswith("__B"):
                p.normal_(0, 0.02)
    model.save_pretrained(root / "q0")
    return "q0"


def run(s: Settings, root: pathlib.Path, rounds: int) -> dict:
    name = isolated(lambda: make_qalora(root, s.rank))
    batches = BATCHES if s.adapters >= 16 else (1, s.adapters)
    runs: dict[str, list[float]] = {}
    merge = {}
    with engine_running(root, 2, s.rank, s, quant="nf4") as nf4, \
            engine_running(root, 2, s.rank, s, quant="int4", quant_group_size=GROUP) as int4:
        for engine in (nf4, int4):
            isolated(lambda: ours_decode(engine, decode_prompts(2), ["", ""], s.prompt_tokens, 4))   # warm-up

        def decode(key, engine, batch, adapter=""):
            value, _ = measure(lambda: ours_decode(engine, decode_prompts(batch), [adapter] * batch,
                                                   s.prompt_tokens, s.new_tokens), s)
            runs.setdefault(key, []).append(value)
            log.info("%-22s %7.1f tok/s", key, value)

        for _ in range(rounds):
            for batch in batches:
                decode(f"nf4 base, batch {batch}", nf4, batch)
                decode(f"int4 base, batch {batch}", int4, batch)
            top = batches[-1]
            decode(f"int4 qalora unmerged, batch {top}", int4, top, name)
            status = int4.weights.merge(name, "exact").result()
            merge = {"seconds": round(status.seconds, 4), "bytes": status.size_bytes,
                     "retained": round(status.retained, 6)}
            decode(f"int4 qalora exact, batch {top}", int4, top, name)
            int4.weights.unmerge()
    best = {k: max(v) for k, v in runs.items()}
    top = batches[-1]
    ratios = {f"int4 vs nf4, batch {b}": best[f"int4 base, batch {b}"] / best[f"nf4 base, batch {b}"] for b in batches}
    ratios["exact merged vs int4 base"] = best[f"int4 qalora exact, batch {top}"] / best[f"int4 base, batch {top}"]
    ratios["unmerged vs int4 base"] = best[f"int4 qalora unmerged, batch {top}"] / best[f"int4 base, batch {top}"]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.describe(), "settings": dataclasses.asdict(s), "rounds": rounds, "group": GROUP,
            "tok_s": best, "tok_s_all": runs, "exact_merge": merge, "ratios": ratios}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["tok_s"])
    fig, ax = plt.subplots(figsize=(7, 3.4))
    colors = ["#999" if k.startswith("nf4") else "#4c72b0" if "base" in k else "#55a868" for k in keys]
    ax.bar(range(len(keys)), [result["tok_s"][k] for k in keys], color=colors)
    ax.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=6)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("NF4 and INT4 bases; a QA-LoRA adapter unmerged and merged exactly into INT4", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return one_run.main(argv, "python -m loraplex.bench.int4_bench", __doc__, "int4", run, plot,
                        ("tok_s", "ratios", "exact_merge"))


if __name__ == "__main__":
    sys.exit(main())
