"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) -> GenerationRequest. No engine logic.

Every parameter is honoured or refused: a parameter we do not know, or one we cannot honour set to anything
but its default (n > 1, say), is INVALID_ARGUMENT naming it, never ignored. Defaults follow OpenAI's
(temperature 1), except max_tokens, which defaults to the server's --default-max-new-tokens. Beside
OpenAI's parameters we take the sampling and stopping extras other OpenAI-compatible servers spell the
same way (top_k, repetition_penalty, min_tokens, include_stop_str_in_output, truncate_prompt_tokens).
"""

from dataclasses import dataclass

from ..engine.request import GenerationRequest, ResponseOptions, SamplingParams, StoppingParams
from ..errors import InvalidArgumentError

# Both endpoints' parameters (besides the prompt and the logprobs options, which differ).
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
          "top_k", "repetition_penalty", "min_tokens", "include_stop_str_in_output", "truncate_prompt_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# Parameters accepted only at a value that asks for nothing we would have to ignore.
ONLY_AT = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"), "prediction": (None,), "audio": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,),
}
# Chat roles a chat template knows; OpenAI's newer "developer" role is the system prompt.
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_COMPLETION_LOGPROBS = 5          # OpenAI's limit for /v1/completions
# The engine's logical fields (engine/request.py) by their names in an OpenAI body.
PARAMS = {"adapter_id": "model", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
          "stop_sequences": "stop", "include_stop_sequence": "include_stop_str_in_output",
          "truncate_input_tokens": "truncate_prompt_tokens"}


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated body: the engine's request and what the answer's shape depends on."""
    generation: GenerationRequest
    model: str                      # as the client named it; echoed in the answer
    chat: bool
    stream: bool
    include_usage: bool             # stream_options.include_usage: a last chunk with the token counts


def parse(body: object, chat: bool, base_model: str, default_max_tokens: int, request_id: str = "") -> OpenAIRequest:
    """Raises InvalidArgumentError whose field is the body's parameter at fault."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("body", "must be a JSON object")
    _refuse_unhonoured(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = _get(body, "model", str)
    if not model:
        raise InvalidArgumentError("model", "is required: the base model's id or an adapter's (GET /v1/models)")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise InvalidArgumentError("stream_options", "is only allowed with stream: true")
    if set(options) - {"include_usage"}:
        raise InvalidArgumentError("stream_options", f"only include_usage is supported, got {sorted(options)}")
    prompt = _messages(body) if chat else _prompt(body)
    response = _chat_logprobs(body) if chat else _completion_logprobs(body)
    try:
        generation = GenerationRequest(
            prompt=prompt, adapter_id="" if model == base_model else model, sampling=_sampling(body),
            stopping=_stopping(body, chat, default_max_tokens), response=response,
            truncate_input_tokens=_get(body, "truncate_prompt_tokens", int, 0),
            **({"request_id": request_id} if request_id else {}))
    except InvalidArgumentError as exc:
        raise wire_name(exc, chat, body) from None
    return OpenAIRequest(generation, model, chat, stream, bool(options.get("include_usage", False)))


def wire_name(exc: InvalidArgumentError, chat: bool, body: dict) -> InvalidArgumentError:
    """exc, its field named as in the OpenAI body."""
    if exc.field == "prompt":
        return exc.renamed("messages" if chat else "prompt")
    if exc.field == "max_new_tokens" and chat and "max_completion_tokens" in body:
        return exc.renamed("max_completion_tokens")
    if exc.field == "top_n_tokens":
        return exc.renamed("top_logprobs" if chat else "logprobs")
    return exc.renamed(PARAMS.get(exc.field, exc.field))


def _refuse_unhonoured(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name not in ONLY_AT:
            raise InvalidArgumentError(name, "is not a parameter of this endpoint")
        if value is not None and not any(_same(value, allowed) for allowed in ONLY_AT[name]):
            accepted = " or ".join(repr(v) for v in ONLY_AT[name] if v is not None) or "null"
            raise InvalidArgumentError(name, f"is not supported here: only {accepted} is accepted, got {value!r}"[:300])


def _same(value, allowed) -> bool:
    """JSON equality: true is not 1, but 0 is 0.0."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return type(value) is type(allowed) and value == allowed
    return value == allowed


def _get(body: dict, name: str, kind: type, default=None):
    """body[name] of JSON type `kind` (int for integers, float for any number), or default when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
                 list: "an array"}
        raise InvalidArgumentError(name, f"must be {names[kind]}, got {value!r}"[:200])
    return value


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(temperature=_get(body, "temperature", float, 1.0), top_k=_get(body, "top_k", int, 0),
                          top_p=_get(body, "top_p", float, 1.0), seed=_get(body, "seed", int),
                          repetition_penalty=_get(body, "repetition_penalty", float, 1.0))


def _stopping(body: dict, chat: bool, default_max_tokens: int) -> StoppingParams:
    max_tokens = _get(body, "max_tokens", int)
    if chat and "max_completion_tokens" in body:
        if max_tokens is not None:
            raise InvalidArgumentError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_tokens = _get(body, "max_completion_tokens", int)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidArgumentError("stop", "must be a string or an array of strings")
    return StoppingParams(max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
                          min_new_tokens=_get(body, "min_tokens", int, 0), stop_sequences=tuple(stop or ()),
                          include_stop_sequence=_get(body, "include_stop_str_in_output", bool, False))


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise InvalidArgumentError("prompt", "is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise InvalidArgumentError("prompt", f"one prompt per request is served, got {len(prompt)}")
    raise InvalidArgumentError("prompt", "must be a string (token ids are not accepted)")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages", "must be a non-empty array of messages")
    return tuple(_message(i, m) for i, m in enumerate(messages))


def _message(i: int, message: object) -> dict:
    at = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidArgumentError(at, "must be an object with role and content")
    extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v not in (None, [], ""))
    if extra:
        raise InvalidArgumentError(f"{at}.{extra[0]}", "is not supported (no tools or named participants)")
    role = message.get("role")
    if role not in ROLE_NAMES:
        raise InvalidArgumentError(f"{at}.role", f"must be one of {', '.join(ROLE_NAMES)}, got {role!r}")
    return {"role": ROLE_NAMES[role], "content": _content(at, message.get("content"))}


def _content(at: str, content: object) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise InvalidArgumentError(f"{at}.content", f"only text parts are supported, got {sorted(map(str, kinds))}")
    raise InvalidArgumentError(f"{at}.content", "must be a string or an array of text parts")


def _completion_logprobs(body: dict) -> ResponseOptions:
    top = _get(body, "logprobs", int)
    if top is None:
        return ResponseOptions()
    if not 0 <= top <= MAX_COMPLETION_LOGPROBS:
        raise InvalidArgumentError("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], got {top}")
    return ResponseOptions(token_logprobs=True, top_n_tokens=top)


def _chat_logprobs(body: dict) -> ResponseOptions:
    wanted, top = _get(body, "logprobs", bool, False), _get(body, "top_logprobs", int, 0)
    if top and not wanted:
        raise InvalidArgumentError("top_logprobs", "needs logprobs: true")
    try:
        return ResponseOptions(token_logprobs=wanted, top_n_tokens=top)
    except InvalidArgumentError as exc:
        raise exc.renamed("top_logprobs") from None
