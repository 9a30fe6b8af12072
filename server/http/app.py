"""The OpenAI-compatible HTTP API as an ASGI app (Starlette): it translates bodies to and from the request
session (session.py), as the gRPC servicer does, so both transports run the same engine (or the same
cluster replicas) with the same validation, request log and metrics.

    POST /v1/completions         text in, text out; "stream": true for server-sent events
    POST /v1/chat/completions    chat messages through the model's chat template; streams too
    GET  /v1/models              the base model and every adapter (`model` names one of them)
    GET  /v1/models/{id}
    GET  /health                 200 while SERVING, 503 otherwise (no token needed)

A client that goes away (closes the connection, mid-stream or while waiting for a whole answer) ends its
request at once: the engine aborts it and frees its KV memory.
"""

import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidArgumentError, LoraplexError, NotFoundError
from ..metrics import NO_METRICS
from ..outcome import Arrival
from .errors import HttpError, error_response
from .openai_request import parse, wire_name
from .openai_response import Answer, models_list
from .streaming import ClientGone, EventStream, until_gone

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/health")


class OpenAIEndpoint:
    """session: a RequestSession; facts: EngineFacts or ClusterFacts (describe, adapter_ids); serving():
    whether the server reports SERVING."""

    def __init__(self, session, facts, serving, auth_token: str = "", default_max_tokens: int = 64,
                 max_body_bytes: int = 4 * 2**20, metrics=NO_METRICS):
        self.session = session
        self.facts = facts
        self.serving = serving
        self.auth_token = auth_token
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.started = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        app = Starlette(routes=routes, exception_handlers={404: _not_a_route, 405: _wrong_method,
                                                           Exception: _internal})
        app.add_middleware(_Counted, metrics=self.metrics)
        return app

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            base, adapters = await self._names()
        except Exception as exc:   # noqa: BLE001 - each kind has its status, the unexpected is a 500
            return error_response(exc)
        return JSONResponse(models_list(base, adapters, self.started))

    async def model(self, request: Request) -> Response:
        try:
            self._authenticate(request)
            base, adapters = await self._names()
            wanted = request.path_params["model_id"]
            if wanted != base and wanted not in adapters:
                raise HttpError(404, f"model {wanted!r} is neither the base model ({base}) nor an adapter",
                                "model_not_found")
        except Exception as exc:   # noqa: BLE001
            return error_response(exc)
        return JSONResponse(next(m for m in models_list(base, adapters, self.started)["data"] if m["id"] == wanted))

    async def health(self, request: Request) -> Response:
        serving = self.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    async def _names(self) -> tuple[str, list[str]]:
        return (await self.facts.describe())["model_name"], await self.facts.adapter_ids()

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            self._authenticate(request)
            body = await self._body(request)
            base = (await self.facts.describe())["model_name"]
        except Exception as exc:   # noqa: BLE001
            return error_response(exc)
        request_id = request.headers.get("x-request-id", "")
        parsed = []

        def build():
            parsed.append(parse(body, chat, base, self.default_max_tokens, request_id))
            return parsed[0].generation

        outputs = self.session.run(_arrival(body, base, request_id), build, incremental=body.get("stream") is True)
        try:
            first = await until_gone(request.receive, anext(outputs))
        except ClientGone:
            await outputs.aclose()
            return Response(status_code=499)
        except Exception as exc:   # noqa: BLE001
            await outputs.aclose()
            return error_response(_on_the_wire(exc, chat, body))
        answer = Answer(parsed[0])
        headers = {"x-request-id": first.request_id}
        if parsed[0].stream:
            return EventStream(_events(answer, first, outputs, chat, body), headers)
        return await _whole(request, answer, first, outputs, body, headers)

    def _authenticate(self, request: Request) -> None:
        if not self.auth_token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.auth_token}".encode()):
            self.metrics.unauthenticated("http")
            raise HttpError(401, "a valid bearer token is required (header 'Authorization: Bearer <token>')"
                            if not given else "the bearer token is not valid for this server", "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError("body", f"is not valid JSON: {exc}"[:200]) from None
        if not isinstance(body, dict):
            raise InvalidArgumentError("body", "must be a JSON object")
        return body


async def _whole(request: Request, answer: Answer, first, outputs, body: dict, headers: dict) -> Response:
    """The whole answer in one body, once the last output is in (or the error, or nothing if the client
    left meanwhile)."""
    async def rest() -> list:
        collected = [first]
        async for out in outputs:
            collected.append(out)
        return collected
    try:
        return JSONResponse(answer.whole(await until_gone(request.receive, rest())), headers=headers)
    except ClientGone:
        return Response(status_code=499)
    except Exception as exc:   # noqa: BLE001
        return error_response(_on_the_wire(exc, answer.request.chat, body), headers)
    finally:
        await outputs.aclose()


async def _events(answer: Answer, first, outputs, chat: bool, body: dict):
    """The stream's server-sent events: each output's chunks, then `[DONE]`; an error after the first
    output (the status line is sent by then) arrives as an event of its own with OpenAI's error body."""
    try:
        out, is_first = first, True
        while True:
            for chunk in answer.chunks(out, is_first):
                yield _event(chunk)
            if out.finished:
                break
            out, is_first = await anext(outputs), False
    except LoraplexError as exc:
        yield _event(error_response(_on_the_wire(exc, chat, body)).body, raw=True)
    finally:
        await outputs.aclose()
    yield b"data: [DONE]\n\n"


def _event(data, raw: bool = False) -> bytes:
    return b"data: " + (data if raw else json.dumps(data, ensure_ascii=False).encode()) + b"\n\n"


def _on_the_wire(exc: BaseException, chat: bool, body: dict) -> BaseException:
    if isinstance(exc, InvalidArgumentError):
        return wire_name(exc, chat, body)
    if isinstance(exc, NotFoundError):
        return HttpError(404, f"model {body.get('model')!r}: {exc}", "model_not_found")
    return exc


def _arrival(body: dict, base: str, request_id: str) -> Arrival:
    """What the request log knows of a body before it is validated."""
    model = body.get("model")
    adapter = model if isinstance(model, str) and model != base else ""
    return Arrival(request_id, adapter, body.get("messages", body.get("prompt")))


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than the server's limit of {limit} bytes "
                          "(--max-message-bytes)", "request_too_large")


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("the HTTP API failed on %s", request.url.path, exc_info=exc)
    return error_response(exc)


async def _not_a_route(request: Request, exc) -> Response:
    return error_response(HttpError(404, f"no such endpoint: {request.url.path}", "unknown_url"))


async def _wrong_method(request: Request, exc) -> Response:
    return error_response(HttpError(405, f"{request.method} is not allowed on {request.url.path}",
                                    "method_not_allowed"))


class _Counted:
    """ASGI middleware counting each response by route and HTTP status (loraplex_http_responses_total)."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_response(_route_of(scope["path"]), status[0] or 499)


def _route_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    return path if path in ROUTES else "other"
