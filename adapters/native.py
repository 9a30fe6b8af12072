"""The native CPU kernels, compiled once per machine and torch version, then loaded: the segmented LoRA ops
(`csrc/lora_cpu.cpp`, with `lora_token_cpu.cpp` for one-token segments), the slot copy
(`csrc/slot_copy_cpu.cpp`), paged decode attention (`csrc/decode_attention_cpu.cpp`) and, for CPUs without
AVX512-BF16, the NF4 and bfloat16 weight-tile products (`csrc/nf4_linear_cpu.cpp`, `csrc/bf16_linear_cpu.cpp`
on `csrc/tile_linear_cpu.h`), and the greedy screen's candidate choice (`csrc/greedy_screen_cpu.cpp`), one
library.

`make install` builds them (`python -m loraplex.adapters.native`); at run time `available()` only loads the
cached library (or builds it once if it is missing). `--no-native-kernels` (`LORAPLEX_NATIVE_KERNELS=0`)
turns them off; without a compiler the torch ops serve instead. The server sets both settings here once
(`configure`), from its ServerConfig; tools that take no flags get the ones the environment gives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import platform
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("lora_cpu.cpp", "lora_token_cpu.cpp", "slot_copy_cpu.cpp", "decode_attention_cpu.cpp",
                                             "nf4_linear_cpu.cpp", "bf16_linear_cpu.cpp", "greedy_screen_cpu.cpp",
                                             "layer_ops_cpu.cpp")]
HEADERS = [CSRC / "lora_token_cpu.h", CSRC / "tile_linear_cpu.h"]
# -fopenmp makes at::parallel_for's inline OpenMP region real; the library links libgomp.so.1 by soname and
# so shares the runtime torch already loaded (one thread pool, not two).
CFLAGS = ["-O3", "-fopenmp"]
TILE_ROWS = 16   # output rows per tile of the weight-tile products' layouts (kRows in csrc/tile_linear_cpu.h)
TILE_ISA_AVX2 = 2   # tile_isa()'s AVX2+FMA variant (1 scalar, 3 AVX-512: tiles::Isa in csrc/tile_linear_cpu.h)
_state: dict[str, object] = {}


def configure(enabled: bool, cache_dir: str) -> None:
    """Whether the kernels may be used, and the cache directory their build lives under. Before the first
    `available()`; later calls change nothing already loaded."""
    _state["settings"] = (enabled, cache_dir)


def _settings() -> tuple[bool, str]:
    if "settings" not in _state:
        from ..server.config import environment_config

        config = environment_config()
        configure(config.native_kernels, config.resolved_cache_dir())
    return _state["settings"]  # type: ignore[return-value]


def enabled() -> bool:
    return _settings()[0]


def available() -> bool:
    """True when the torch.ops.loraplex kernels can be called (loads or builds on first call)."""
    if "ok" not in _state:
        _state["ok"] = enabled() and _load()
    return bool(_state["ok"])


def build_dir() -> Path:
    parts = [*(source.read_bytes() for source in SOURCES + HEADERS), torch.__version__.encode(), platform.machine().encode(), " ".join(CFLAGS).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return Path(_settings()[1]) / "native" / key


def _load() -> bool:
    try:
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with _build_lock(directory):
            cpp_extension.load(name="loraplex_lora_cpu", sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(directory), is_python_module=False, verbose=False)
        log.debug("native LoRA kernels ready in %.1fs (%s)", time.perf_counter() - started, directory)
        return hasattr(torch.ops.loraplex, "lora_shrink") and hasattr(torch.ops.loraplex, "paged_decode_attention")
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the torch ops still work
        _state["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("native LoRA kernels unavailable, using torch ops: %s", _state["error"])
        return False


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build at a time per directory, held through a kernel lock the OS drops when its process dies.
    torch's own lock is a plain file (`lock`) it polls for until it disappears: a build killed mid-way leaves
    it behind and every later load would wait forever. Under our lock nobody else is building, so a `lock`
    file found there is such a leftover and is removed."""
    with open(directory / "build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing a native build lock left by a build that did not finish (%s)", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tile_products_fast() -> bool:
    """Whether the weight-tile products (NF4, bf16 screen) beat bitsandbytes' and torch's own paths here: the
    kernels loaded and the CPU has AVX2+FMA or AVX-512. Their scalar variant, all a CPU without AVX2 would
    get, is far slower: on a 2-core Ice Lake Xeon, forced, one layer's three NF4 products took 90 ms at 32
    rows against 137 ms for the whole model's dequantize-then-matmul step, and the bf16 screen of a
    [49152, 576] head 633 ms at 16 rows against 25 ms for torch's bfloat16 matmul (docs/decode-profile.md)."""
    return available() and tile_isa() >= TILE_ISA_AVX2


def tile_isa() -> int:
    """The best variant of the weight-tile products this CPU runs (tiles::Isa); the kernels must be loaded."""
    return int(torch.ops.loraplex.tile_isa())


def use_one_thread() -> bool:
    """The calling thread's torch work stays on that thread (no thread pool of its own); other threads keep
    their settings. False where the kernels are unavailable (then nothing changes)."""
    if not available():
        return False
    torch.ops.loraplex.use_one_thread()
    return True


def error() -> str | None:
    """Why the kernels are unavailable (None when they loaded or were never tried)."""
    return _state.get("error")  # type: ignore[return-value]


def main() -> int:
    started = time.perf_counter()
    if not enabled():
        print("native LoRA kernels disabled (LORAPLEX_NATIVE_KERNELS=0)")
        return 0
    if not available():
        print(f"native LoRA kernels could not be built: {error()}", file=sys.stderr)
        return 1
    print(f"native LoRA kernels ready in {time.perf_counter() - started:.1f}s ({build_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
