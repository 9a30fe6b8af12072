"""CPU time by process role, from /proc: how a benchmark's cores were shared between the server's parts
(a cluster front, its replicas, Ray's own processes) and the client that drives it."""

import os
import time
from pathlib import Path

from .machine import _TICK


def _snapshot() -> dict[int, tuple[int, str, float]]:
    """{pid: (parent pid, command line, CPU seconds)} of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry.name)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / _TICK)
    return found


def _role(pid: int, snap: dict, server_pid: int) -> str:
    parent, cmd, _ = snap[pid]
    if pid == os.getpid():
        return "client"
    if pid == server_pid:
        return "front"
    if cmd.startswith("ray::ServeReplica"):
        return "replicas"
    seen = set()
    while parent in snap and parent not in seen:     # a descendant of the server: Ray's processes
        if parent == server_pid:
            return "ray"
        seen.add(parent)
        parent = snap[parent][0]
    return "other"


class CoreShares:
    """Cores each role used between start() and stop() (CPU seconds / wall seconds)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def start(self) -> "CoreShares":
        self._before, self._at = _snapshot(), time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        after, wall = _snapshot(), time.perf_counter() - self._at
        shares: dict[str, float] = {}
        for pid, (_, _, seconds) in after.items():
            used = seconds - (self._before[pid][2] if pid in self._before else 0.0)
            role = _role(pid, after, self.server_pid)
            shares[role] = shares.get(role, 0.0) + used / wall
        return {k: round(v, 3) for k, v in sorted(shares.items())}
