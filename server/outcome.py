"""How each generation request ended: one structured (JSON) log line on the `loraplex.requests` logger, and
its outcome in the metrics (success by stop reason, or failure by reason, see metrics.py). Every transport
records through here (see session.py).

Log fields: request id, adapter, tokens in and out, how it ended (stop reason, or the canonical status of an
error or a cancellation), time to first token and total time. The prompt text is never logged unless the
server runs with --log-prompts.
"""

import json
import logging
import time
from dataclasses import dataclass

from .errors import LoraplexError, status_of
from .metrics import NO_METRICS, Metrics

log = logging.getLogger("loraplex.requests")

# A call cancelled this close to its deadline was ended by the deadline (the client's clock runs out first).
DEADLINE_SLACK_S = 0.1


@dataclass(frozen=True)
class Arrival:
    """What a transport knows of a request before it is validated: enough to log it."""
    request_id: str = ""
    adapter_id: str = ""
    prompt: object = None            # text, or chat messages; logged only with --log-prompts


class Outcome:
    def __init__(self, arrival: Arrival, include_prompt: bool, metrics: Metrics = NO_METRICS):
        self.started = time.monotonic()
        self.metrics = metrics
        self.first_token: float | None = None
        self.fields = {"request_id": arrival.request_id or None, "adapter": arrival.adapter_id or None}
        if include_prompt:
            self.fields["prompt"] = arrival.prompt

    def output(self, out) -> None:
        if self.first_token is None and out.generated_token_count:
            self.first_token = time.monotonic()
        self.fields.update(request_id=out.request_id, input_tokens=out.input_token_count,
                           output_tokens=out.generated_token_count)

    def succeeded(self, stop_reason: str) -> None:
        self.metrics.succeeded(stop_reason, time.monotonic() - self.started)
        self._write(stop_reason)

    def failed(self, error: BaseException) -> None:
        self.metrics.failed(error.reason if isinstance(error, LoraplexError) else "internal")
        self._write(status_of(error))

    def abandoned(self, time_remaining: float | None) -> None:
        """The client went away before the end: it cancelled, or its deadline passed."""
        deadline = time_remaining is not None and time_remaining <= DEADLINE_SLACK_S
        self.metrics.failed("deadline" if deadline else "cancelled")
        self._write("DEADLINE_EXCEEDED" if deadline else "CANCELLED")

    def _write(self, ended: str) -> None:
        now = time.monotonic()
        self.fields.update(ended=ended, total_s=round(now - self.started, 4),
                           ttft_s=round(self.first_token - self.started, 4) if self.first_token else None)
        log.info(json.dumps(self.fields, ensure_ascii=False))
