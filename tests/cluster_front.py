"""Test helpers for `loraplex serve --replicas N` (started by loraplex.bench.front_process): the
processes of its local Ray cluster and replicas, found in /proc, and the sockets they listen on."""

import os
import time
from pathlib import Path



def replica_pids() -> list[int]:
    """The processes of Serve replicas of our engine deployment (Ray names them `ray::ServeReplica:...`)."""
    return [pid for pid, cmd in _processes() if cmd.startswith("ray::ServeReplica:loraplex:engine")]


def ray_processes_of(temp_prefix: str = "loraplex-ray-") -> list[int]:
    """Processes whose command line names a loraplex local cluster's directory (raylet, gcs, agents)."""
    return [pid for pid, cmd in _processes() if temp_prefix in cmd or cmd.startswith("ray::")]


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue


def wait_for(condition, timeout: float, every: float = 0.1):
    """condition()'s first truthy value within timeout seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def listening_sockets(pids: list[int]) -> list[str]:
    """'address:port' of each TCP socket the processes listen on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:     # state LISTEN
                address, port = fields[1].split(":")
                found.append(f"{_address(address, width)}:{int(port, 16)}")
    return found


def _address(hexed: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hexed)
    # /proc shows each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if width == 8:
        return str(ipaddress.IPv4Address(words))
    v6 = ipaddress.IPv6Address(words)
    return str(v6.ipv4_mapped or v6)
