"""The command line the benchmarks share: a quick run or a full one (with rounds, for the one-batch CPU
benchmarks), the JSON and the plot written to docs/benchmarks (a temporary folder for --quick), a summary
printed."""

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Callable

from .adapters_bench import Settings


def main(argv, prog: str, doc: str, name: str, run: Callable, plot: Callable, summary: tuple[str, ...]) -> int:
    """run(settings, scratch folder, rounds) -> result; plot(result, path); writes NAME.json and NAME.png."""
    def run_one(args, scratch):
        s = Settings(adapters=4, new_tokens=8, wait_quiet=False) if args.quick else Settings()
        return run(s, scratch, 1 if args.quick else args.rounds)

    def rounds(p):
        p.add_argument("--rounds", type=int, default=3)

    return traced_main(argv, prog, doc, name, "batch 4, 8 tokens, one round", run_one, plot,
                       lambda result: print(json.dumps({k: result[k] for k in summary}, indent=1)), rounds)


def traced_main(argv, prog: str, doc: str, name: str, quick_help: str, run: Callable, plot: Callable,
                report: Callable, more_flags: Callable = lambda parser: None) -> int:
    """The command line of every benchmark that writes NAME.json and NAME.png: run(args, scratch folder) ->
    result, plot(result, path), report(result) prints the summary; --quick writes to a temp dir."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    more_flags(p)
    p.add_argument("--quick", action="store_true", help=f"{quick_help}; to a temp dir")
    p.add_argument("--out", help=f"folder for {name}.json/png [docs/benchmarks]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = pathlib.Path(args.out or (os.path.join(tempfile.gettempdir(), f"loraplex-{name}-quick") if args.quick
                                    else "docs/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"loraplex-{name}-") as tmp:
        result = run(args, pathlib.Path(tmp))
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(result, out / f"{name}.png")
    report(result)
    return 0
