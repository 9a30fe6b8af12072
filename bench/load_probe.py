"""Where a cold adapter load's time goes: `python -m loraplex.bench.load_probe [--device cuda]`.

Builds the engine on the default model with a root of synthetic rank-16 adapters, then loads adapters one
after another from a loader-like thread (its own reader process, as the server's loader has), idle and
then beside decoding streams, timing each stage: the read (reader process, validation, transfer to this
process), the copy into a device slot (synchronized on a GPU), and the whole acquire.
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraplex.bench.load_probe", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--loads", type=int, default=12, help="cold loads per phase [12]")
    p.add_argument("--streams", type=int, default=8, help="decoding streams in the busy phase [8]")
    args = p.parse_args(argv)
    from loraplex.adapters.reader import ReaderProcess
    from loraplex.server.build import launch_engine
    from loraplex.server.config import ServerConfig
    from loraplex.server.engine.request import GenerationRequest, StoppingParams
    from loraplex.server.model.store import embedded_model_dir

    from .adapter_files import make_peft_adapters, make_synthetic_adapters

    with tempfile.TemporaryDirectory(prefix="loraplex-probe-") as tmp:
        root = pathlib.Path(tmp)
        model_dir = str(embedded_model_dir())
        template = make_peft_adapters(model_dir, root, 1, 16)[0]
        names = make_synthetic_adapters(root / template, root, 2 * args.loads + 1, 0, 8)
        engine, desc = launch_engine(ServerConfig(device=args.device, dtype=args.dtype, adapter_roots=str(root),
                                                  adapter_slots=32, max_lora_rank=16, max_batch_size=32))
        adapters = engine.adapters
        stages: dict[str, list[float]] = {}

        def timed(name, fn, sync=False):
            def wrapper(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    if sync and torch.cuda.is_available():
                        torch.cuda.synchronize()
                    stages.setdefault(name, []).append(time.perf_counter() - start)
            return wrapper

        adapters._read = timed("read", adapters._read)
        adapters.buffers.write = timed("copy", adapters.buffers.write, sync=True)
        results = {"device": desc.device, "dtype": desc.dtype}

        def phase(label, batch):
            stages.clear()
            totals = []

            def loads():
                r = adapters.reading
                reader = ReaderProcess(r.model, r.max_rank, r.dtype, 0)
                reader.start()
                for name in batch:          # as a request's load: this thread's reader, the copy at once
                    start = time.perf_counter()
                    adapters.release(adapters._take_slot(reader, name, lambda copy: copy()).key)
                    totals.append(time.perf_counter() - start)
                reader.close()
            thread = threading.Thread(target=loads)
            thread.start()
            thread.join()
            results[label] = {k: round(statistics.median(v) * 1000, 1) for k, v in
                              {"acquire_ms": totals, **{f"{s}_ms": t for s, t in stages.items()}}.items()}
            print(label, results[label], flush=True)

        try:
            phase("idle", names[1:args.loads + 1])
            done = threading.Event()
            left = [args.streams]

            def sink(out):
                if out.finished:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
            for _ in range(args.streams):
                engine.add_request(GenerationRequest(prompt="Once upon a time", stopping=StoppingParams(
                    max_new_tokens=1000, min_new_tokens=1000)), sink)
            time.sleep(2)
            phase("decoding", names[args.loads + 1:])
        finally:
            engine.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
