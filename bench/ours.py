"""Our engine under the benchmark: requests go in through Engine.add_request, token times come back
through the sinks (called on the engine thread after each step)."""

import contextlib
import dataclasses
import gc
import threading
import time

from loraplex.server.engine.request import GenerationRequest, StoppingParams

from .workload import OnlineRequest, summarize


class Recorder:
    """Each request's token timestamps; done is set once every request has finished."""

    def __init__(self, n: int):
        self.token_times: list[list[float]] = [[] for _ in range(n)]
        self.errors: list[str] = []
        self.done = threading.Event()
        self._left = n
        self._lock = threading.Lock()

    def sink(self, i: int):
        times = self.token_times[i]

        def on_output(out) -> None:
            now = time.perf_counter()
            while len(times) < out.generated_token_count:
                times.append(now)
            if out.error is not None:
                self.errors.append(str(out.error))
            if out.finished:
                with self._lock:
                    self._left -= 1
                    if self._left == 0:
                        self.done.set()
        return on_output

    def wait(self, timeout: float = 3600) -> None:
        if not self.done.wait(timeout):
            raise TimeoutError("the engine did not finish the benchmark requests")
        if self.errors:
            raise RuntimeError(f"engine errors: {self.errors[:3]}")


@contextlib.contextmanager
def running(model: str, max_batch_size: int, kv_cache_mb: int, **config):
    """A fresh engine, loaded and run on its own thread (as the server does), started, warmed up with one short
    request; stopped on exit, so its thread and that thread's OpenMP worker pool are gone afterwards.
    config: further ServerConfig fields (else what the LORAPLEX_* variables give, else their defaults)."""
    from loraplex.server.build import launch_engine
    from loraplex.server.config import environment_config

    engine, desc = launch_engine(dataclasses.replace(environment_config(), model=model, max_batch_size=max_batch_size,
                                                     kv_cache_mb=kv_cache_mb, **config))
    try:
        decode_tokens_per_s(engine, ["Hello there, how are you today?"], 0, 4)
        yield engine, desc
    finally:
        engine.stop()
        del engine
        gc.collect()


def _request(prompt: str, new_tokens: int, truncate: int = 0) -> GenerationRequest:
    stopping = StoppingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return GenerationRequest(prompt=prompt, stopping=stopping, truncate_input_tokens=truncate)


def decode_tokens_per_s(engine, prompts: list[str], prompt_tokens: int, new_tokens: int) -> float:
    """All prompts submitted at once; decode rate = B * (N - 1) / (last first token -> last token)."""
    rec = Recorder(len(prompts))
    for i, prompt in enumerate(prompts):
        engine.add_request(_request(prompt, new_tokens, prompt_tokens), rec.sink(i))
    rec.wait()
    start = max(times[0] for times in rec.token_times)
    end = max(times[-1] for times in rec.token_times)
    return len(prompts) * (new_tokens - 1) / (end - start)


def online(engine, stream: list[OnlineRequest]) -> dict:
    """Submits each request at its arrival time (this thread sleeps in between)."""
    rec = Recorder(len(stream))
    arrivals = []
    origin = time.perf_counter()
    for req in stream:
        delay = origin + req.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrivals.append(time.perf_counter())
        engine.add_request(_request(req.prompt, req.output_len), rec.sink(req.index))
    rec.wait()
    first = arrivals[0]
    result = summarize([a - first for a in arrivals], [[t - first for t in ts] for ts in rec.token_times])
    result["ttft_s"] = [ts[0] - a for a, ts in zip(arrivals, rec.token_times)]
    return result
