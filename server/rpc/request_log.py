"""One structured (JSON) log line per generation request, on the `loraplex.requests` logger.

Fields: request id, adapter, tokens in and out, how it ended (stop reason, or the status of an error or a
cancellation), time to first token and total time. The prompt text is never logged unless the server runs
with --log-prompts.
"""

import json
import logging
import time

log = logging.getLogger("loraplex.requests")


class RequestLog:
    def __init__(self, request, include_prompt: bool):
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.fields = {"request_id": request.request_id or None, "adapter": request.adapter_id or None}
        if include_prompt:
            self.fields["prompt"] = request.text or [(m.role, m.content) for m in request.messages.messages]

    def output(self, out) -> None:
        if self.first_token is None and out.generated_token_count:
            self.first_token = time.monotonic()
        self.fields.update(request_id=out.request_id, input_tokens=out.input_token_count,
                           output_tokens=out.generated_token_count)

    def done(self, ended: str) -> None:
        now = time.monotonic()
        self.fields.update(ended=ended, total_s=round(now - self.started, 4),
                           ttft_s=round(self.first_token - self.started, 4) if self.first_token else None)
        log.info(json.dumps(self.fields, ensure_ascii=False))
