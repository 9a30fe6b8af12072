"""The command line the one-batch CPU benchmarks share (kinds_bench, merge_bench): rounds or a quick run,
the JSON and the plot written to docs/benchmarks (a temporary folder for --quick), a summary printed."""

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
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 4, 8 tokens, one round; to a temp dir")
    p.add_argument("--out", help=f"folder for {name}.json/png [docs/benchmarks]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    s = Settings(adapters=4, new_tokens=8, wait_quiet=False) if args.quick else Settings()
    rounds = 1 if args.quick else args.rounds
    out = pathlib.Path(args.out or (os.path.join(tempfile.gettempdir(), f"loraplex-{name}-quick") if args.quick
                                    else "docs/benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"loraplex-{name}-") as tmp:
        result = run(s, pathlib.Path(tmp), rounds)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{name}.png")
    print(json.dumps({k: result[k] for k in summary}, indent=1))
    return 0
