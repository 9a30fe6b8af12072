"""Test helper: `loraplex serve --replicas N` as a subprocess (the front, its local Ray cluster and the
replicas), its ports read from what it prints, and the processes it owns found in /proc."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
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


class FrontProcess:
    def __init__(self, *flags: str, timeout: float = 240):
        args = [sys.executable, "-m", "loraplex.server.main", "--port", "0", "--metrics-port", "0", *flags]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("the front did not start:\n" + "".join(self.lines[-40:]))
        text = "".join(self.lines)
        self.port = int(re.search(r"listening on [\d.]+:(\d+)", text).group(1))
        self.metrics_port = int(re.search(r"metrics on http://[\d.]+:(\d+)/metrics", text).group(1))
        self.target = f"127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready: SERVING" in line:
                self.ready.set()
        self.ready.set()

    def exposition(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=20).read().decode()

    def samples(self, name: str) -> dict[tuple, float]:
        """{sorted label items: value} of one metric's samples, parsed from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        found = {}
        for family in text_string_to_metric_families(self.exposition()):
            for s in family.samples:
                if s.name == name:
                    found[tuple(sorted(s.labels.items()))] = s.value
        return found

    def terminate(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


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
