"""A real Prometheus server (Debian package, installed by scripts/install-prometheus.sh) on loopback,
scraping one target, and queries of its HTTP API."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make install` (scripts/install-prometheus.sh)")
    return path


class Prometheus:
    def __init__(self, workdir: Path, target: str, rule_files: tuple[Path, ...] = (), interval_ms: int = 500):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        rules = "".join(f"  - {path}\n" for path in rule_files)
        config.write_text(f"global:\n  scrape_interval: {interval_ms}ms\n  scrape_timeout: {interval_ms}ms\n"
                          f"  evaluation_interval: {interval_ms}ms\n"
                          + (f"rule_files:\n{rules}" if rules else "")
                          + f"scrape_configs:\n  - job_name: loraplex\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(workdir / "prometheus.log")

    def _wait_ready(self, log_path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus was not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")

    def api(self, path: str, **params) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """Instant query: {sorted label items (without __name__): value}."""
        data = self.api("query", query=expr)
        return {tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(s["value"][1])
                for s in data["result"]}

    def scalar(self, expr: str) -> float:
        values = list(self.query(expr).values())
        assert len(values) == 1, f"{expr} gave {values}"
        return values[0]

    def wait_for_scrape_after(self, moment: float, timeout: float = 30) -> dict:
        """Blocks until a scrape that started after `moment` (time.time()) has succeeded; returns the target."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for target in self.api("targets")["activeTargets"]:
                scraped = target.get("lastScrape", "")
                if target["health"] == "up" and _unix(scraped) > moment:
                    return target
            time.sleep(0.2)
        raise AssertionError(f"no successful scrape after {moment} within {timeout}s: {self.api('targets')}")

    def rules(self, timeout: float = 30) -> list[dict]:
        """The loaded rules, once each has been evaluated at least once."""
        deadline = time.monotonic() + timeout
        while True:
            rules = [r for group in self.api("rules")["groups"] for r in group["rules"]]
            if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
                return rules
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _unix(rfc3339: str) -> float:
    """Prometheus's timestamps (RFC 3339, nanoseconds, 'Z' or an offset) as seconds since the epoch."""
    from datetime import datetime
    if not rfc3339 or rfc3339.startswith("0001"):
        return 0.0
    text = rfc3339.replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:                                    # keep microseconds: datetime takes at most 6 digits
        digits = "".join(c for c in rest if c.isdigit())
        offset = rest[len(digits):]
        text = f"{head}.{digits[:6]}{offset}"
    return datetime.fromisoformat(text).timestamp()
