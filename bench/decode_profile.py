"""Where a decode step's time goes: `python -m loraplex.bench.decode_profile [--batch 16]`.

Runs decode rounds on a fresh engine (B prompts of 32 tokens, 64 new tokens each, greedy, as in
`loraplex bench`) under py-spy, a sampling profiler, and sorts the engine thread's samples by the code they
were in: the 4-bit matmuls, decode attention and the KV cache, the output head, the LoRA ops, the other
model code (norms, rotary, activations, residuals) and the rest (scheduling, sampling, Python glue). Each
share times the measured step time gives milliseconds a step. Prints a markdown table; the table per
machine is kept in docs/decode-profile.md.
"""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# (part, test on a sample's innermost loraplex frame "function (file:line)"), first match wins
PARTS = [
    ("4-bit matmuls", lambda f: any(name in f for name in ("nf4_cpu.py", "nf4_native.py", "int4.py", "nf4.py"))),
    ("decode attention and KV cache", lambda f: "decode_attention.py" in f
        or ("llama.py" in f and ("Attention." in f or "_causal" in f or "_after_prefix" in f))),
    ("output head", lambda f: "lm_head.py" in f),
    ("LoRA kernels (the segmented shrink and expand)", lambda f: "adapters/ops.py" in f),
    ("LoRA layers' glue (step metadata, buffers, DoRA scales)", lambda f: "/adapters/" in f or "lora" in f.lower()),
    ("other model code (norms, rotary, MLP glue, residuals)", lambda f: "/model/" in f),
]
REST = "the rest (scheduling, step inputs, sampling, Python)"


def _is_own(frame: str, root: str) -> bool:
    """A frame "function (path:line)" of our sources: py-spy writes their paths in full or, for a package
    installed in place, relative to the folder it is imported from."""
    path = frame.rpartition(" (")[2].rpartition(":")[0]
    return path.startswith(root) or (not path.startswith("/") and (pathlib.Path(root) / path).is_file())


def _innermost_own_frame(frames: list[str], root: str) -> str:
    for frame in reversed(frames):
        if _is_own(frame, root):
            return frame
    return frames[-1]


def shares(raw_path: str) -> dict[str, float]:
    """Share of the engine thread's samples inside steps, by part (py-spy's raw format: stack count)."""
    import loraplex.server

    root = str(pathlib.Path(loraplex.server.__path__[0]).parent)   # our sources, installed or editable
    counts, total = collections.Counter(), 0
    with open(raw_path) as raw:
        for line in raw:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not any("ModelRunner.step" in f or "Engine._run " in f for f in frames):
                continue
            own = _innermost_own_frame(frames, root)
            if any("bitsandbytes/" in f for f in frames):    # bitsandbytes' Linear4bit, called from our model
                part = PARTS[0][0]
            else:
                part = next((name for name, test in PARTS if test(own)), REST)
            counts[part] += int(n)
            total += int(n)
    return {name: counts[name] / total for name, _ in PARTS + [(REST, None)]} if total else {}


def workload(batch: int, rounds: int, adapters: int, out: str) -> None:
    """With adapters: that many distinct rank-16 adapters on all 7 projections (as the mixed-adapter
    benchmark makes them), request i on adapter i % adapters."""
    from . import ours
    from .adapter_files import make_peft_adapters
    from .adapters_bench import ours_decode
    from .engine_bench import isolated
    from .workload import decode_prompts

    def go(root: str):
        names = make_peft_adapters(str(embedded_model_dir()), pathlib.Path(root), adapters, 16) if adapters else []
        config = dict(adapter_roots=root, adapter_slots=adapters, max_lora_rank=16) if adapters else {}
        picks = [names[i % adapters] if adapters else "" for i in range(batch)]
        with ours.running("", 32, 512, **config) as (engine, _):
            ours_decode(engine, decode_prompts(batch), picks, 32, 4)      # puts every adapter in its slot
            rates = [ours_decode(engine, decode_prompts(batch), picks, 32, 64) for _ in range(rounds)]
        return [batch / r for r in rates]

    from loraplex.server.model.store import embedded_model_dir

    with tempfile.TemporaryDirectory() as root, open(out, "w") as f:
        json.dump({"step_s": isolated(lambda: go(root))}, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--rate", type=int, default=100, help="samples a second")
    p.add_argument("--adapters", type=int, default=0, help="distinct LoRA adapters in the batch [default none]")
    p.add_argument("--keep", metavar="PATH", help="also write py-spy's raw samples here")
    p.add_argument("--workload", metavar="JSON", help=argparse.SUPPRESS)   # the profiled child
    args = p.parse_args(argv)
    if args.workload:
        workload(args.batch, args.rounds, args.adapters, args.workload)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        raw, steps = os.path.join(tmp, "profile.txt"), os.path.join(tmp, "steps.json")
        child = [sys.executable, "-m", "loraplex.bench.decode_profile", "--batch", str(args.batch),
                 "--rounds", str(args.rounds), "--adapters", str(args.adapters), "--workload", steps]
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--rate",
                        str(args.rate), "--format", "raw", "--output", raw, "--nonblocking", "--", *child],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        step_s = min(json.load(open(steps))["step_s"])
        parts = shares(raw)
        if args.keep:
            shutil.copy(raw, args.keep)
    with_adapters = f", {args.adapters} distinct adapters" if args.adapters else ""
    print(f"batch {args.batch}{with_adapters}: fastest round {step_s * 1000:.1f} ms a step\n")
    print("| part | share | ms a step |\n|---|---:|---:|")
    for name, share in parts.items():
        print(f"| {name} | {share:.1%} | {share * step_s * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
