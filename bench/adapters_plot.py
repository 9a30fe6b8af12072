"""The mixed-adapter benchmark's plot: decode, online trace and decoding while adapters load."""

import pathlib

import numpy as np


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result["decode"]
    online, background = result.get("online"), result.get("background")
    panels = 1 + bool(online) + bool(background)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    bars = [("ours\n16 distinct", "ours_distinct", "#1f77b4"), ("ours, 16\nsaved bf16", "ours_distinct_bf16", "#6baed6"),
            ("ours\nbase only", "ours_base", "#9ecae1"), ("PEFT\n16 mixed", "peft_mixed", "#d62728"),
            ("PEFT\nbase only", "peft_base", "#fcae91")]
    bars = [(label.replace("16", str(d["adapters"])), d[f"{key}_tok_s"], color) for label, key, color in bars
            if f"{key}_tok_s" in d]
    bars = ax.bar([l for l, _, _ in bars], [v for _, v, _ in bars], color=[c for _, _, c in bars])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode, batch {d['batch']}, {d['new_tokens']} new tokens, rank {d['rank']} on 7 projections",
                 fontsize=9)
    if online:
        ax = axes.pop(0)
        vals = [online["many"]["throughput_tok_s"], online["one"]["throughput_tok_s"]]
        bars = ax.bar([f"{online['registered_adapters']} adapters\n(power law)", "one adapter"], vals,
                      color=["#1f77b4", "#9ecae1"])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Online: {online['requests']} Poisson requests at {online['rate_per_s']:g}/s", fontsize=9)
    if background:
        ax = axes.pop(0)
        runs = [("steady", background["steady"]),
                (f"{background['rate_per_s']:g} loads/s", background["paced"]),
                (f"back to back ({background['flat_out']['loads']} loads)", background["flat_out"])]
        x = np.arange(2)
        for i, (label, run) in enumerate(runs):
            bars = ax.bar(x + (i - 1) * 0.27, [run["itl_p50_s"] * 1e3, run["itl_p99_s"] * 1e3], 0.27, label=label,
                          color=["#9ecae1", "#4292c6", "#08519c"][i])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, ["ITL p50", "ITL p99"])
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
        ax.set_title(f"Decode of {background['streams']} streams while adapters load", fontsize=9)
    m = result["machine"]
    where = f"{m['gpu']} ({m.get('dtype', '')})" if m.get("gpu") else f"{m['cpu']} ({m['cores']} cores)"
    fig.suptitle(f"{m['model']} NF4 on {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
