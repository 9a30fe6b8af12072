"""Adapter files are read, validated and normalized in a helper process, not in the server's interpreter.

The decode loop is Python driving torch; a load in the same interpreter holds the interpreter lock for
its Python work (parsing, per-module checks) in slices of up to 5 ms, and every decode step that wants the
lock meanwhile waits (with only 2 cores, load CPU time also competes with the engine's thread pool). A
`ReaderProcess` does the whole read in a child process, which writes the normalized factors into a shared
memory buffer and sends back a small index: the server then makes one copy (lock released) and views of it.
Moving the bytes through a pipe instead would take the lock hundreds of times per adapter (one Python loop
turn per pipe-sized chunk), and each of those is a chance for the decode thread to wait on a descheduled
holder when the cores are busy.

Children are forked from a fork server that has imported this module once (fast to start, and never a
fork of a process that already runs torch threads). Each loader thread owns one child, so a request's load
never queues behind an administrative one, and each child has its own CPU niceness.

A child that dies (killed, out of memory, a file truncated under its mapping) is replaced as often as it
dies, each time after a pause that doubles with the deaths in a row (BACKOFF_*); reads never move into the
server process, whose memory a large adapter would then take. The read that was in flight fails with
UNAVAILABLE; the next one goes to the new child.

A child that stops answering (stopped, or stuck on a hung filesystem) is treated as one that died: when a
read has waited `read_timeout_s` for its answer, the child is killed and replaced the same way, and the read
fails with UNAVAILABLE. The default (`default_read_timeout`) is generous: READ_TIMEOUT_BASE_S, plus the
largest weights file a legal adapter can have for this base at the maximum rank, read at
READ_TIMEOUT_SLOW_BYTES_PER_S (a slow network disk; a local one reads and validates it 20-50 times faster).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers how shared tensors travel to child processes)

from ..server.errors import InternalError, UnavailableError
from ..server.model.config import ModelConfig
from . import native
from .canonical import Adapter, LoraModule
from .formats import AdapterFormatError, factor_elements, read_adapter
from .formats.peft_files import weights_limit

log = logging.getLogger(__name__)
BACKOFF_FIRST_S = 0.05      # pause before starting a child after one died; doubles with each death in a row
READY_TIMEOUT_S = 120.0    # a child that is not set up within this is buried, and a later read tries again
BACKOFF_MAX_S = 5.0
READ_TIMEOUT_BASE_S = 60.0          # a start on a busy machine, and the fixed cost of a read
READ_TIMEOUT_SLOW_BYTES_PER_S = 5e6  # plus the largest legal weights file read at this rate
_CONTEXT_LOCK = threading.Lock()
_context = None


def default_read_timeout(model: ModelConfig, max_rank: int) -> float:
    """Seconds a read may wait for its answer by default: enough for the largest legal adapter of this base
    (about 60 s + 16 s for SmolLM2-135M at rank 64, + 130 s for a 7B Llama, + 670 s for a 70B one)."""
    return READ_TIMEOUT_BASE_S + weights_limit(model, max_rank) / READ_TIMEOUT_SLOW_BYTES_PER_S


def _mp_context():
    global _context
    with _CONTEXT_LOCK:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload([__name__])
        return _context


class ReaderProcess:
    """Reads adapters for one thread of the server in a child process, started on first use and started
    again, after a pause that doubles with each death in a row, whenever it dies or leaves a read
    unanswered for read_timeout_s (None = default_read_timeout)."""

    def __init__(self, model: ModelConfig, max_rank: int, dtype: torch.dtype, nice: int = 0,
                 read_timeout_s: float | None = None, keep_16bit: bool = False):
        if read_timeout_s is not None and not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be positive, got {read_timeout_s}")
        self.read_timeout_s = read_timeout_s or default_read_timeout(model, max_rank)
        self._args = (model, max_rank, str(dtype).removeprefix("torch."), nice, keep_16bit)
        self._capacity = factor_elements(model, max_rank) * dtype.itemsize
        self._shared: torch.Tensor | None = None       # [capacity] uint8 in shared memory, made on first use
        self._lock = threading.Lock()
        self._conn = None
        self._proc = None
        self._deaths = 0           # children that died or failed to start since the last read that worked
        self._died_at = 0.0        # time.monotonic() of the last of them

    def read(self, directory: Path, adapter_id: str) -> Adapter:
        with self._lock:
            request = (str(directory), adapter_id)
            try:
                self._live_connection().send(request)
            except OSError:                    # it died after the look: nothing was asked yet, so ask anew
                self._bury()
                self._ask_again(request)
            try:
                answered = self._conn.poll(self.read_timeout_s)
                reply = self._conn.recv() if answered else None
            except (EOFError, OSError):
                raise self._died_reading(adapter_id) from None
            if not answered:
                raise self._hung_reading(adapter_id)
            self._deaths = 0
            return self._answer(reply, adapter_id)

    def _ask_again(self, request: tuple) -> None:
        try:
            self._live_connection().send(request)
        except OSError:
            raise self._died_reading(request[1]) from None

    def _died_reading(self, adapter_id: str) -> UnavailableError:
        how = self._bury()
        return UnavailableError(f"the adapter reader process died ({how}) while reading adapter {adapter_id!r}; "
                                "a new one serves the next read").because("adapter_load")

    def _hung_reading(self, adapter_id: str) -> UnavailableError:
        """The child took the request and never answered: it is killed (its late answer must never reach a
        later read), and the next read gets a new one."""
        self._proc.kill()
        self._proc.join(2)       # a child in uninterruptible sleep dies when its I/O returns; not waited on
        self._bury()
        return UnavailableError(f"the adapter reader process did not answer within {self.read_timeout_s:.3g} s "
                                f"while reading adapter {adapter_id!r}, so it was killed; a new one serves the "
                                "next read").because("adapter_load")

    def start(self) -> None:
        """Starts the child now (the first one also starts the fork server, a few seconds), so that the
        first read does not wait for it; a failure here is logged, and `read` tries again."""
        with self._lock:
            try:
                self._live_connection()
            except InternalError as exc:
                log.warning("%s", exc)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _answer(self, reply: tuple, adapter_id: str) -> Adapter:
        if reply[0] == "format":
            raise AdapterFormatError(reply[1])
        if reply[0] == "error":
            raise InternalError(f"reading adapter {adapter_id!r} failed: {reply[1]}")
        _, index, nbytes = reply
        return _unpack(index, self._shared[:nbytes].clone())   # the host cache keeps its own copy

    def _live_connection(self):
        """The pipe to a running child: a dead one is buried and a new one started (after the back-off)."""
        if self._proc is not None and not self._proc.is_alive():
            self._bury()                       # died between two reads (killed, out of memory)
        if self._conn is None:
            self._back_off()
            try:
                self._start()
            except (OSError, RuntimeError) as exc:
                # e.g. a main script without the `if __name__ == "__main__":` guard child processes need
                self._deaths, self._died_at = self._deaths + 1, time.monotonic()
                raise InternalError(f"the adapter reader process could not start: {exc}") from None
        return self._conn

    def _back_off(self) -> None:
        if self._deaths:
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._deaths - 1))
            log.warning("adapter reader process: starting a new one (%d died in a row; pause %.2f s)",
                        self._deaths, delay)
            time.sleep(max(0.0, self._died_at + delay - time.monotonic()))

    def _start(self) -> None:
        ctx = _mp_context()
        if self._shared is None:
            self._shared = torch.empty(self._capacity, dtype=torch.uint8).share_memory_()
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self._shared, *self._args), daemon=True,
                           name="loraplex-adapter-reader")
        try:
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._proc, self._conn = proc, parent
        self._await_ready()

    def _await_ready(self) -> None:
        """The child says so once it is set up (~2 s after it is forked, on 2 cores): until then a read
        would wait for it, and `start` is meant to spare the first read that wait."""
        try:
            if self._conn.poll(READY_TIMEOUT_S) and self._conn.recv() == ("ready",):
                return
        except (EOFError, OSError):
            pass
        raise RuntimeError(f"the reader process did not get ready ({self._bury()})")

    def _bury(self) -> str:
        """Closes the dead child's pipe and reaps it; returns how it ended."""
        proc = self._proc
        self._close_locked()
        self._deaths, self._died_at = self._deaths + 1, time.monotonic()
        return _how_it_ended(proc)

    def _close_locked(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
            self._proc = None


def _how_it_ended(proc) -> str:
    code = None if proc is None else proc.exitcode
    if code is None:
        return "no exit status"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _serve(conn, shared: torch.Tensor, model: ModelConfig, max_rank: int, dtype_name: str, nice: int,
           keep_16bit: bool) -> None:
    """The child: read requests until None (or the parent goes away)."""
    torch.set_num_threads(1)
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:
            pass
    dtype = getattr(torch, dtype_name)
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        directory, adapter_id = request
        try:
            adapter = read_adapter(Path(directory), adapter_id, model, max_rank, dtype, keep_16bit)
        except AdapterFormatError as exc:
            conn.send(("format", str(exc)))
            continue
        except Exception as exc:  # reported to the parent, which fails the request; the child goes on
            message = f"{type(exc).__name__}: {exc}".replace(directory, f"<{adapter_id}>")  # no server paths
            conn.send(("error", message))
            continue
        try:
            index, nbytes = _pack(adapter, shared)
        except ValueError as exc:              # cannot happen for a validated adapter; never overrun
            conn.send(("error", str(exc)))
            continue
        conn.send(("ok", index, nbytes))   # DoRA magnitudes (float32, small) travel in the index


def _pack(adapter: Adapter, shared: torch.Tensor) -> tuple[dict, int]:
    """(index, bytes written): every module's a then b, concatenated into `shared` (uint8) in the serving
    dtype. Written in place: a fresh 20 MB tensor per read cost ~10 ms of page faults on a 2-core VM, more
    than the copy itself."""
    keys = list(adapter.modules)
    parts = [t.reshape(-1) for key in keys for t in (adapter.modules[key].a, adapter.modules[key].b)]
    dtype = parts[0].dtype
    nbytes = sum(t.numel() for t in parts) * dtype.itemsize
    if nbytes > shared.numel():
        raise ValueError(f"{nbytes} bytes exceed the {shared.numel()}-byte exchange buffer")
    torch.cat(parts, out=shared[:nbytes].view(dtype))
    index = {"adapter_id": adapter.adapter_id, "alpha": adapter.alpha, "source": adapter.source,
             "format": adapter.format, "dtype": str(dtype).removeprefix("torch."),
             "modules": [(layer, target, m.rank, m.in_features, m.out_features)
                         for (layer, target), m in ((k, adapter.modules[k]) for k in keys)],
             "magnitudes": {i: adapter.modules[k].magnitude for i, k in enumerate(keys)
                            if adapter.modules[k].magnitude is not None},
             "group_sizes": {i: adapter.modules[k].group_size for i, k in enumerate(keys)
                             if adapter.modules[k].group_size is not None},
             "b_scales": {i: adapter.modules[k].b_scale for i, k in enumerate(keys)
                          if adapter.modules[k].b_scale is not None}}
    return index, nbytes


def _unpack(index: dict, raw: torch.Tensor) -> Adapter:
    flat = raw.view(getattr(torch, index["dtype"]))
    entries = index["modules"]
    if native.available():        # all views in one call: fewer points where decoding waits for the lock
        views = torch.ops.loraplex.split_views(flat, [d for _, _, *dims in entries for d in dims])
    else:
        views, offset = [], 0
        for _, _, rank, in_features, out_features in entries:
            for rows, cols in ((rank, in_features), (out_features, rank)):
                views.append(flat[offset:offset + rows * cols].view(rows, cols))
                offset += rows * cols
    magnitudes, groups, scales = (index.get(name, {}) for name in ("magnitudes", "group_sizes", "b_scales"))
    modules = {(layer, target): LoraModule(a=views[2 * i], b=views[2 * i + 1], magnitude=magnitudes.get(i),
                                           group_size=groups.get(i), b_scale=scales.get(i))
               for i, (layer, target, *_) in enumerate(entries)}
    return Adapter(adapter_id=index["adapter_id"], modules=modules, alpha=index["alpha"], source=index["source"],
                   format=index["format"])
