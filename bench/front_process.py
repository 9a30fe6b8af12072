"""A loraplex server as a subprocess (`loraplex serve`, a single server or a cluster front with its Ray
cluster and replicas), its ports read from what it prints: for benchmarks and tests that need the
server in a process of its own (signals, CPU apart from the client)."""

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request


class FrontProcess:
    """`python -m loraplex.server.main` with `flags` (on free ports), up once it reports SERVING."""

    def __init__(self, *flags: str, timeout: float = 240, env: dict | None = None):
        args = [sys.executable, "-m", "loraplex.server.main", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                *flags]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)
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
        http = re.search(r"OpenAI-compatible API on https?://[\d.]+:(\d+)/v1", text)
        self.http_port = int(http.group(1)) if http else None      # None: started with --no-http

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
