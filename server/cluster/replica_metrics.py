"""The front's /metrics on a cluster: its own request counters (how each call ended, end-to-end latency,
refused tokens, its process), and every replica's engine metrics with a `replica` label.

At each scrape the front asks every replica for its exposition (Serve's broadcast, on the front's event
loop), parses it and merges each family across replicas, so that each name appears once. A family is
either the front's (FRONT_FAMILIES, process_*) or the replicas': the front's zero-valued engine series and
the replicas' unused request counters are left out.
"""

import asyncio
import logging

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ..metrics import PREFIX

log = logging.getLogger(__name__)

FRONT_FAMILIES = {PREFIX + name for name in ("request_success", "request_failure", "request_duration_seconds",
                                             "unauthenticated_calls")}
SCRAPE_TIMEOUT_S = 5.0


def front_owned(name: str) -> bool:
    return name in FRONT_FAMILIES or name.startswith("process_")


class FrontAndReplicas:
    """A collector: the front registry's own families, then the replicas' merged ones."""

    def __init__(self, front_registry, handle, loop: asyncio.AbstractEventLoop):
        self.front = front_registry
        self.handle = handle
        self.loop = loop

    def collect(self):
        for family in self.front.collect():
            if front_owned(family.name):
                yield family
        yield from merged(self._expositions())

    def _expositions(self) -> list[tuple[str, str]]:
        """(replica id, exposition text) of each replica that answered in time."""
        async def ask():
            responses = self.handle.broadcast("metrics_text")
            return await responses.results_async(timeout_s=SCRAPE_TIMEOUT_S, return_exceptions=True)
        try:
            results = asyncio.run_coroutine_threadsafe(ask(), self.loop).result(SCRAPE_TIMEOUT_S + 1)
        except Exception as exc:   # noqa: BLE001 - a scrape shows what it can
            log.warning("replica metrics unavailable: %s", type(exc).__name__)
            return []
        return [r for r in results if isinstance(r, tuple)]


def merged(expositions: list[tuple[str, str]]) -> list[Metric]:
    families: dict[str, Metric] = {}
    for replica_id, text in expositions:
        for family in text_string_to_metric_families(text):
            if front_owned(family.name):
                continue
            into = families.get(family.name)
            if into is None:
                into = families[family.name] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                into.add_sample(s.name, {**s.labels, "replica": replica_id}, s.value, s.timestamp, s.exemplar)
    return list(families.values())
