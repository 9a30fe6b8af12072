"""The machine the benchmark runs on, and how busy other processes keep it.

On a small shared machine a neighbour's burst can slow a multi-threaded step many times over (torch's
worker threads wait for a descheduled peer), so every measurement records how much CPU *other*
processes used meanwhile, and measurements wait for a quiet moment first.
"""

import os
import pathlib
import platform
import time

import torch

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    import bitsandbytes
    import transformers

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_start": os.getloadavg()[0]}


def _busy_seconds() -> float | None:
    """CPU seconds the machine spent busy (or stolen) since boot (None where /proc/stat is missing)."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK   # steal: the hypervisor ran someone else


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Foreign:
    """Share of the machine's CPU other processes used between start() and stop() (0 = none, 1 = all)."""

    def start(self) -> "Foreign":
        self._busy, self._own, self._wall = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def stop(self) -> float:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return 0.0
        wall = time.perf_counter() - self._wall
        other = (busy - self._busy) - (_own_seconds() - self._own)
        return max(0.0, other) / max(wall * (os.cpu_count() or 1), 1e-9)


def wait_quiet(threshold: float = 0.05, window: float = 1.0, limit: float = 120.0) -> float:
    """Waits (up to `limit` seconds) for a `window` in which other processes use < threshold of the CPU;
    returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        probe = Foreign().start()
        time.sleep(window)
        if probe.stop() < threshold:
            break
    return time.perf_counter() - started
