"""Adapter ids are names, never paths: validate them and resolve them inside configured roots only."""

import errno
import os
import re
import stat
from pathlib import Path

from ..server.errors import FailedPreconditionError

MAX_ID_LENGTH = 200
# One segment: letters, digits, '.', '_', '-'. Segments are joined by single '/' (namespacing: "org/name").
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class InvalidAdapterId(ValueError):
    pass


class AdapterNotFound(LookupError):
    pass


class AdapterUnreadable(FailedPreconditionError):
    """The adapter's directory is there but cannot be used (a symlink loop, no permission). A server error
    as it stands: no root-relative path in the message, and callers pass it on as FAILED_PRECONDITION."""


def validate_adapter_id(adapter_id: str) -> tuple[str, ...]:
    """The id's segments; raises InvalidAdapterId naming the first problem found."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidAdapterId("adapter id is empty")
    if len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidAdapterId(f"adapter id is longer than {MAX_ID_LENGTH} characters")
    _reject_characters(adapter_id)
    if adapter_id.startswith("/"):
        raise InvalidAdapterId(f"adapter id {adapter_id!r} is an absolute path; ids are names")
    segments = tuple(adapter_id.split("/"))
    for segment in segments:
        _check_segment(adapter_id, segment)
    return segments


def _reject_characters(adapter_id: str) -> None:
    # Checked one by one so the message says which kind of character is wrong.
    if "\x00" in adapter_id:
        raise InvalidAdapterId("adapter id contains a NUL character")
    if "\\" in adapter_id:
        raise InvalidAdapterId(f"adapter id {adapter_id!r} contains a backslash")
    if "%" in adapter_id:
        # Ids are never URL-decoded; '%' could only be an attempt at encoding ("%2e%2e").
        raise InvalidAdapterId(f"adapter id {adapter_id!r} contains '%' (percent-encoding is not allowed)")
    if any(ch.isspace() for ch in adapter_id):
        raise InvalidAdapterId(f"adapter id {adapter_id!r} contains whitespace")


def _check_segment(adapter_id: str, segment: str) -> None:
    if segment == "":
        raise InvalidAdapterId(f"adapter id {adapter_id!r} has an empty segment (leading, trailing or '//')")
    if segment in (".", ".."):
        raise InvalidAdapterId(f"adapter id {adapter_id!r} has a {segment!r} segment; ids are names, not paths")
    if not _SEGMENT.fullmatch(segment):
        raise InvalidAdapterId(
            f"adapter id {adapter_id!r} has characters outside [A-Za-z0-9._-] in segment {segment!r}")


def resolve_adapter_dir(adapter_id: str, roots: list[Path]) -> Path:
    """The real directory of `adapter_id` under the first root that has it.

    Symlinks are followed, and the result must stay inside that root's real path, so a link pointing out of
    a root is refused rather than read. A loop or a directory the server may not enter is AdapterUnreadable.
    """
    segments = validate_adapter_id(adapter_id)
    for root in roots:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(real_root.joinpath(*segments)))   # never raises; a loop stays unresolved
        if not real.is_relative_to(real_root):
            raise InvalidAdapterId(f"adapter id {adapter_id!r} resolves outside its adapter root")
        if _is_dir(adapter_id, real):
            return real
    raise AdapterNotFound(f"adapter {adapter_id!r} not found in any adapter root")


def _is_dir(adapter_id: str, real: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(real).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        why = "its directory is a symlink loop" if exc.errno == errno.ELOOP else \
            f"its directory cannot be read: {(exc.strerror or str(exc)).lower()}"
        raise AdapterUnreadable(f"adapter {adapter_id!r} cannot be served: {why}") from None
