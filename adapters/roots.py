"""The adapter roots on disk: which ids exist, where each one's directory is, and whether its files
changed. Lookups only (names, stat): the files themselves are read by a reader process (`reader.py`)."""

from pathlib import Path

from ..server.errors import InvalidArgumentError, LoraplexError, NotFoundError
from .ids import AdapterNotFound, InvalidAdapterId, resolve_adapter_dir

FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterRoots:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(r) for r in roots]

    def resolve(self, adapter_id: str) -> Path:
        """The adapter's directory. InvalidArgument for a malformed id, NotFound for one no root holds,
        FailedPrecondition (ids.AdapterUnreadable) for a directory that loops or cannot be entered."""
        try:
            return resolve_adapter_dir(adapter_id, self.roots)
        except InvalidAdapterId as exc:
            raise InvalidArgumentError("adapter_id", str(exc)) from None
        except AdapterNotFound:
            raise NotFoundError(f"adapter {adapter_id!r} not found") from None

    def scan(self) -> list[str]:
        """Ids of the adapter directories under the roots: name or namespace/name."""
        found = set()
        for root in self.roots:
            for config in [*root.glob(f"*/{FILES[0]}"), *root.glob(f"*/*/{FILES[0]}")]:
                found.add(config.parent.relative_to(root).as_posix())
        return sorted(found)

    def signature_now(self, adapter_id: str) -> tuple | None:
        """(mtime_ns, size) of the adapter's files now; None when its directory is gone or unreadable."""
        try:
            return signature(self.resolve(adapter_id))
        except LoraplexError:      # gone, or no longer a directory it may enter
            return None


def signature(directory: Path) -> tuple:
    """(mtime_ns, size) per file: a change means a new version."""
    return tuple(_stat(directory / name) for name in FILES)


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
