"""Opening an adapter's files: only inside the adapter's own directory, never through a symlink that leads out
of it or loops, regular files only, and each file's size checked against a limit before a byte is read.

A symlink inside the directory that points to another file inside it is followed; one that points out (to
another adapter, or to any file the server can read) is refused, and so is a loop. The path is resolved,
checked, then opened one component at a time from the directory with O_NOFOLLOW, so a link swapped in
after the check fails the open instead of being followed. O_NONBLOCK keeps a FIFO from hanging the open.

Weights are parsed by the `safetensors` library (`safe_open`), through /proc/self/fd so that it maps the
very file checked here. Measured in a fresh process on the 2-core CPU (30 layers x 7 targets of the
embedded model, 420 tensors, read + norm of every tensor): rank 16, 20 MB: 35 ms (the hand-written
readinto parser it replaces: 18 ms); rank 64, 78 MB: 96-120 ms (hand-written: 135-152 ms). Reads run in
the reader process, so no decode step waits for them. `get_tensor` returns views of a mapping of the file,
which an in-place writer could change after validation, so each tensor is copied out at once (the same
single copy `readinto` made). A file truncated while it is mapped kills the reading process (SIGBUS); the
reader process is restarted for the next read (reader.py).
"""

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open


class FileRefused(ValueError):
    """A file that cannot be read; the message names the file, never the server's path."""


class FileMissing(FileRefused):
    pass


@contextmanager
def open_inside(directory: Path, name: str, limit: int, limit_why: str) -> Iterator[tuple[int, str]]:
    """(fd, resolved path) of the regular file `name` in `directory`, refused when larger than `limit`
    bytes (`limit_why` says where the limit comes from, for the message)."""
    fd, real = _open(os.path.realpath(directory), name)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{name} is not a regular file")
        if st.st_size > limit:
            raise FileRefused(f"{name} is {st.st_size} bytes, more than the {limit} bytes {limit_why}")
        yield fd, real
    finally:
        os.close(fd)


def read_small(directory: Path, name: str, limit: int, limit_why: str) -> bytes:
    with open_inside(directory, name, limit, limit_why) as (fd, _):
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(limit + 1)        # +1: a file that grew after the size check is refused too
        except OSError as exc:
            raise FileRefused(f"{name} {_why(exc)}") from None
    if len(data) > limit:
        raise FileRefused(f"{name} is more than the {limit} bytes {limit_why}")
    return data


def read_tensors(directory: Path, name: str, limit: int, limit_why: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each in memory of its own (not a view of the file)."""
    with open_tensors(directory, name, limit, limit_why) as f:
        return {key: f.get_tensor(key).clone() for key in f.keys()}


@contextmanager
def open_tensors(directory: Path, name: str, limit: int, limit_why: str) -> Iterator[safe_open]:
    """The library's handle on the checked file: keys(), get_tensor() (a view of the file's mapping).
    Library errors inside the block are the file's: FileRefused."""
    with open_inside(directory, name, limit, limit_why) as (fd, real):
        where = _fd_path(fd, real)
        try:
            with safe_open(where, framework="pt") as f:
                yield f
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            message = str(exc).replace(where, name).replace(real, name)
            raise FileRefused(f"{name} is corrupt or truncated: {message}") from None


def _open(top: str, name: str) -> tuple[int, str]:
    try:
        real = os.path.realpath(os.path.join(top, name), strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise FileMissing(f"{name} is missing") from None
    except OSError as exc:
        raise FileRefused(f"{name} {_why(exc)}") from None
    parts = os.path.relpath(real, top).split(os.sep)
    if parts[0] == os.pardir:
        raise FileRefused(f"{name} is a symlink that leads out of the adapter's directory")
    try:
        return _open_beneath(top, parts), real
    except OSError as exc:
        raise FileRefused(f"{name} {_why(exc)}") from None


def _open_beneath(top: str, parts: list[str]) -> int:
    """parts: a path relative to top with no symlink in it (as resolved); each is opened with O_NOFOLLOW."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = step
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _fd_path(fd: int, real: str) -> str:
    # The file already opened and checked, not whatever its path names by now. Linux only; elsewhere the
    # path itself, with the window between the check and the library's own open.
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else real


def _why(exc: OSError) -> str:
    """What went wrong, without the path the OSError carries."""
    if exc.errno == errno.ELOOP:
        return "is a symlink loop (or a symlink appeared while it was opened)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "disappeared while it was opened"
    return f"cannot be read: {exc.strerror or exc}"
