"""Python clients for a loraplex server: `Client` (blocking) and `AsyncClient` (grpc.aio), same methods.

    with Client("127.0.0.1:50051") as client:
        client.wait_until_ready(60)
        print(client.generate("The capital of France is", max_new_tokens=8).text)
        for chunk in client.generate_stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(chunk.text, end="", flush=True)

Requests are built by one function, `build_generate_request`, shared by both clients; failed calls raise the
typed errors of `loraplex.clients.errors`.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, fields

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

from .errors import DeadlineExceeded, Unavailable, from_rpc_error

DEFAULT_TARGET = "127.0.0.1:50051"
_POLL_SECONDS = 0.25      # health polling interval in wait_until_ready
_MAX_CHECK_SECONDS = 2.0  # one health check may take this long before we count it as "not yet"


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str
    logprob: float
    top_tokens: tuple["Token", ...] = ()   # the n most likely alternatives, when top_n_tokens > 0


@dataclass(frozen=True)
class Generation:
    """A whole answer (generate) or, as GenerationChunk, one streamed piece of one."""

    text: str
    input_token_count: int
    generated_token_count: int
    stop_reason: str        # a StopReason name: "NOT_FINISHED", "MAX_TOKENS", "EOS_TOKEN", ...
    stop_sequence: str
    seed: int
    tokens: tuple[Token, ...]
    request_id: str

    @property
    def finished(self) -> bool:
        return self.stop_reason != "NOT_FINISHED"


@dataclass(frozen=True)
class GenerationChunk(Generation):
    """`text` and `tokens` are what was produced since the previous chunk; the last chunk has a stop_reason."""


@dataclass(frozen=True)
class Tokenization:
    token_count: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...] = field(default=())   # filled only with return_tokens=True


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    architecture: str
    max_sequence_length: int
    max_new_tokens: int
    quantization: str
    compute_dtype: str
    device: str
    vocab_size: int
    kv_cache_tokens: int
    max_batch_size: int


def build_generate_request(prompt: str | None = None, *, messages: Sequence | None = None, adapter_id: str = "",
                           max_new_tokens: int | None = None, min_new_tokens: int = 0, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                           repetition_penalty: float = 1.0, stop_sequences: Sequence[str] = (),
                           include_stop_sequence: bool = False, time_limit_millis: int = 0,
                           token_logprobs: bool = False, top_n_tokens: int = 0, truncate_input_tokens: int = 0,
                           request_id: str = "") -> pb.GenerateRequest:
    """The GenerateRequest for one call. Give exactly one of `prompt` (plain text) or `messages` (chat).

    messages: dicts {"role", "content"}, (role, content) pairs or pb.ChatMessage.
    max_new_tokens None = the server's default; seed None = a random seed the server reports back;
    temperature 0 = greedy. Range checks are the server's job (it names the field at fault).
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    sampling = pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty, seed=seed)
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                   stop_sequences=list(stop_sequences), include_stop_sequence=include_stop_sequence,
                                   time_limit_millis=time_limit_millis)
    response = pb.ResponseOptions(token_logprobs=token_logprobs, top_n_tokens=top_n_tokens)
    request = pb.GenerateRequest(request_id=request_id, adapter_id=adapter_id,
                                 params=pb.Parameters(sampling=sampling, stopping=stopping, response=response),
                                 truncate_input_tokens=truncate_input_tokens)
    if messages is not None:
        request.messages.messages.extend(_chat_message(m) for m in messages)
    else:
        request.text = prompt
    return request


def _chat_message(message) -> pb.ChatMessage:
    if isinstance(message, pb.ChatMessage):
        return message
    if isinstance(message, dict):
        return pb.ChatMessage(role=message["role"], content=message["content"])
    role, content = message
    return pb.ChatMessage(role=role, content=content)


def _generation(response: pb.GenerateResponse, cls=Generation) -> Generation:
    return cls(text=response.text, input_token_count=response.input_token_count,
               generated_token_count=response.generated_token_count,
               stop_reason=pb.StopReason.Name(response.stop_reason), stop_sequence=response.stop_sequence,
               seed=response.seed, tokens=tuple(_token(t) for t in response.tokens), request_id=response.request_id)


def _token(info: pb.TokenInfo) -> Token:
    top = tuple(Token(t.token_id, t.text, t.logprob) for t in info.top_tokens)
    return Token(info.token_id, info.text, info.logprob, top)


def _tokenization(response: pb.TokenizeResponse) -> Tokenization:
    return Tokenization(response.token_count, tuple(response.token_ids), tuple(response.tokens))


def _model_info(response: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(response, f.name) for f in fields(ModelInfo)})


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@contextlib.contextmanager
def _typed_errors():
    """Re-raises grpc (and grpc.aio) failures as loraplex errors; usable around awaits too."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


class _ClientBase:
    """What both clients share: the channel, the stubs, and the per-call deadline and metadata."""

    def __init__(self, channels, target: str, timeout: float | None, credentials, token: str | None):
        # channels: the grpc or grpc.aio module; both have insecure_channel/secure_channel with one signature.
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if credentials is None:
            self._channel = channels.insecure_channel(target)
        else:
            self._channel = channels.secure_channel(target, credentials)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, timeout: float | None = None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_ClientBase):
    """Blocking client. generate/generate_stream take the keyword arguments of build_generate_request."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        super().__init__(grpc, target, timeout, credentials, token)

    def generate(self, prompt: str | None = None, **params) -> Generation:
        request = build_generate_request(prompt, **params)
        with _typed_errors():
            return _generation(self._stub.Generate(request, **self._call()))

    def generate_stream(self, prompt: str | None = None, **params) -> Iterator[GenerationChunk]:
        request = build_generate_request(prompt, **params)   # outside the generator: bad arguments fail now
        return self._stream(request)

    def _stream(self, request: pb.GenerateRequest) -> Iterator[GenerationChunk]:
        call = self._stub.GenerateStream(request, **self._call())
        try:
            with _typed_errors():
                for response in call:
                    yield _generation(response, GenerationChunk)
        finally:
            call.cancel()   # a consumer that stops early frees the server's sequence; no-op once finished

    def tokenize(self, text: str, return_tokens: bool = False) -> Tokenization:
        with _typed_errors():
            return _tokenization(self._stub.Tokenize(pb.TokenizeRequest(text=text, return_tokens=return_tokens),
                                                     **self._call()))

    def model_info(self) -> ModelInfo:
        with _typed_errors():
            return _model_info(self._stub.ModelInfo(pb.ModelInfoRequest(), **self._call()))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... for the whole server ("") or one service by full name."""
        with _typed_errors():
            return _status_name(self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                   **self._call(timeout)))

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Polls health until SERVING; raises DeadlineExceeded after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while True:
            remaining = deadline - time.monotonic()
            with contextlib.suppress(Unavailable, DeadlineExceeded):   # not listening yet, or slow to answer
                last = self.health(service, timeout=max(min(remaining, _MAX_CHECK_SECONDS), 0.01))
                if last == "SERVING":
                    return
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{self.target} not SERVING after {timeout:g}s (last: {last})")
            time.sleep(_POLL_SECONDS)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """grpc.aio client; create it inside the event loop that will use it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        super().__init__(grpc.aio, target, timeout, credentials, token)

    async def generate(self, prompt: str | None = None, **params) -> Generation:
        request = build_generate_request(prompt, **params)
        with _typed_errors():
            return _generation(await self._stub.Generate(request, **self._call()))

    def generate_stream(self, prompt: str | None = None, **params) -> AsyncIterator[GenerationChunk]:
        request = build_generate_request(prompt, **params)
        return self._stream(request)

    async def _stream(self, request: pb.GenerateRequest) -> AsyncIterator[GenerationChunk]:
        call = self._stub.GenerateStream(request, **self._call())
        try:
            with _typed_errors():
                async for response in call:
                    yield _generation(response, GenerationChunk)
        finally:
            call.cancel()

    async def tokenize(self, text: str, return_tokens: bool = False) -> Tokenization:
        with _typed_errors():
            return _tokenization(await self._stub.Tokenize(
                pb.TokenizeRequest(text=text, return_tokens=return_tokens), **self._call()))

    async def model_info(self) -> ModelInfo:
        with _typed_errors():
            return _model_info(await self._stub.ModelInfo(pb.ModelInfoRequest(), **self._call()))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        with _typed_errors():
            return _status_name(await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                                         **self._call(timeout)))

    async def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while True:
            remaining = deadline - time.monotonic()
            with contextlib.suppress(Unavailable, DeadlineExceeded):
                last = await self.health(service, timeout=max(min(remaining, _MAX_CHECK_SECONDS), 0.01))
                if last == "SERVING":
                    return
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{self.target} not SERVING after {timeout:g}s (last: {last})")
            await asyncio.sleep(_POLL_SECONDS)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
