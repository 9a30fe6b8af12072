"""Benchmarks: `loraplex bench` / `python -m loraplex.bench` (see engine_bench.py)."""


def main(argv=None) -> int:
    from .engine_bench import main as run

    return run(argv)
