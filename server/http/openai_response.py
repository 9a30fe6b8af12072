"""Engine outputs -> OpenAI response bodies: whole answers and the chunks of a stream. No engine logic."""

import time

from ..engine.sequence import RequestOutput, StopReason, TokenInfo
from .openai_request import OpenAIRequest

# OpenAI knows two reasons a generation ends by itself: it stopped ("stop") or ran out of room ("length").
FINISH_REASONS = {StopReason.EOS_TOKEN: "stop", StopReason.STOP_SEQUENCE: "stop",
                  StopReason.MAX_TOKENS: "length", StopReason.TOKEN_LIMIT: "length", StopReason.TIME_LIMIT: "length"}


class Answer:
    """The bodies of one request's answer, whole or as stream chunks, in OpenAI's shapes."""

    def __init__(self, request: OpenAIRequest):
        self.request = request
        self.created = int(time.time())
        self.id = ""
        self.text_offset = 0            # completions' logprobs.text_offset: characters before each token

    def whole(self, outputs: list[RequestOutput]) -> dict:
        last = outputs[-1]
        text = "".join(out.text for out in outputs)
        tokens = [t for out in outputs for t in out.tokens]
        choice = {"index": 0, "finish_reason": FINISH_REASONS.get(last.stop_reason),
                  "logprobs": self._logprobs(tokens)}
        if self.request.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(last, chunk=False), "choices": [choice], "usage": usage(last)}

    def chunks(self, out: RequestOutput, first: bool) -> list[dict]:
        """The stream chunks for one output: the text it adds (with the finish reason on the last one) and,
        after the last, the token counts when the client asked for them."""
        head = self._head(out, chunk=True)
        extra = {"usage": None} if self.request.include_usage else {}
        finish = FINISH_REASONS.get(out.stop_reason) if out.finished else None
        choice = {"index": 0, "logprobs": self._logprobs(out.tokens), "finish_reason": finish}
        if self.request.chat:
            delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
            choice["delta"] = delta if out.text or first else {}
        else:
            choice["text"] = out.text
        chunks = [{**head, "choices": [choice], **extra}]
        if out.finished and self.request.include_usage:
            chunks.append({**head, "choices": [], "usage": usage(out)})
        return chunks

    def _head(self, out: RequestOutput, chunk: bool) -> dict:
        chat = self.request.chat
        self.id = self.id or ("chatcmpl-" if chat else "cmpl-") + out.request_id
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def _logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        if not self.request.generation.response.token_logprobs:
            return None
        if self.request.chat:
            return {"content": [{**_chat_token(t.text, t.logprob),
                                 "top_logprobs": [_chat_token(s, lp) for _, s, lp in t.top_tokens]} for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{s: lp for _, s, lp in t.top_tokens} for t in tokens]
                if self.request.generation.response.top_n_tokens else None,
                "text_offset": offsets}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.input_token_count, "completion_tokens": out.generated_token_count,
            "total_tokens": out.input_token_count + out.generated_token_count}


def models_list(base: str, adapters: list[str], created: int) -> dict:
    """GET /v1/models: the base model, then each adapter (its `parent` the base)."""
    def model(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "loraplex", "root": base,
                "parent": parent}
    return {"object": "list", "data": [model(base, None), *(model(a, base) for a in adapters if a != base)]}
