"""The Python clients and the `loraplex` command.

Three layers: pure request building / error mapping / flag parsing; the clients against a scripted in-process
gRPC server (metadata, status codes, health transitions); and end to end against a real server on a tiny
random Llama (`tiny_server`), including `loraplex demo` running `loraplex serve` as a subprocess.
"""

import asyncio
import sys
import types
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraplex.clients import (AsyncClient, Client, DeadlineExceeded, InvalidArgument, LoraplexError, NotFound,
                              Unauthenticated, Unavailable, build_generate_request, errors, from_rpc_error)
from loraplex.clients import cli, demo
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc


# --- request building -------------------------------------------------------------------------------------------

def test_request_fields_land_in_their_proto_fields():
    r = build_generate_request("hi", adapter_id="a1", max_new_tokens=7, min_new_tokens=2, temperature=0.5, top_k=4,
                               top_p=0.9, seed=0, repetition_penalty=1.2, stop_sequences=["\n", "END"],
                               include_stop_sequence=True, time_limit_millis=250, token_logprobs=True,
                               top_n_tokens=3, truncate_input_tokens=100, request_id="r1")
    s, st, o = r.params.sampling, r.params.stopping, r.params.response
    assert (r.WhichOneof("prompt"), r.text, r.adapter_id, r.request_id) == ("text", "hi", "a1", "r1")
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.5, 4, pytest.approx(0.9), pytest.approx(1.2))
    assert s.HasField("seed") and s.seed == 0   # seed 0 is a real seed, not "unset"
    assert (st.max_new_tokens, st.min_new_tokens, list(st.stop_sequences)) == (7, 2, ["\n", "END"])
    assert (st.include_stop_sequence, st.time_limit_millis) == (True, 250)
    assert (o.token_logprobs, o.top_n_tokens, r.truncate_input_tokens) == (True, 3, 100)


def test_request_defaults_leave_optional_fields_unset():
    r = build_generate_request("hi")
    assert not r.params.sampling.HasField("seed")
    assert r.params.stopping.max_new_tokens == 0        # 0 = the server's default
    assert r.params.sampling.temperature == 0.0         # greedy


@pytest.mark.parametrize("message", [{"role": "user", "content": "Hi"}, ("user", "Hi"),
                                     pb.ChatMessage(role="user", content="Hi")])
def test_chat_messages_in_every_accepted_shape(message):
    r = build_generate_request(messages=[{"role": "system", "content": "Be brief."}, message])
    assert r.WhichOneof("prompt") == "messages"
    assert [(m.role, m.content) for m in r.messages.messages] == [("system", "Be brief."), ("user", "Hi")]


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "messages": [("user", "b")]}])
def test_exactly_one_prompt_kind(kwargs):
    with pytest.raises(ValueError):
        build_generate_request(**kwargs)


# --- error mapping ----------------------------------------------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument), (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted), (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied), (grpc.StatusCode.CANCELLED, errors.Cancelled),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded), (grpc.StatusCode.INTERNAL, errors.Internal),
])
def test_each_status_code_has_its_class(code, cls):
    exc = from_rpc_error(FakeRpcError(code, "why"))
    assert type(exc) is cls and exc.code == code and exc.details == "why"
    assert str(exc) == f"{code.name}: why"


def test_unmapped_codes_and_bare_errors_keep_their_code():
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "no"))
    assert type(exc) is LoraplexError and exc.code == grpc.StatusCode.UNIMPLEMENTED
    assert from_rpc_error(grpc.RpcError()).code == grpc.StatusCode.UNKNOWN


def test_aio_errors_map_too():
    aio = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gone")
    exc = from_rpc_error(aio)
    assert isinstance(exc, NotFound) and exc.details == "gone"


# --- flag parsing -----------------------------------------------------------------------------------------------

def test_connection_flags_fall_back_to_environment():
    env = {"LORAPLEX_TARGET": "h:1", "LORAPLEX_TIMEOUT": "2.5", "LORAPLEX_TOKEN": "t"}
    args = cli.build_parser(env).parse_args(["info"])
    assert (args.target, args.timeout, args.token) == ("h:1", 2.5, "t")
    args = cli.build_parser(env).parse_args(["info", "--target", "x:2", "--timeout", "1"])
    assert (args.target, args.timeout) == ("x:2", 1.0)
    args = cli.build_parser({}).parse_args(["health"])
    assert (args.target, args.timeout, args.token) == ("127.0.0.1:50051", None, None)


def test_generate_flags_become_client_arguments():
    args = cli.build_parser({}).parse_args(
        ["generate", "Hello", "--adapter", "a", "--max-new-tokens", "9", "--temperature", "0.7", "--top-k", "5",
         "--top-p", "0.8", "--seed", "3", "--repetition-penalty", "1.1", "--stop", "x", "--stop", "y", "--logprobs"])
    kw = cli.generate_kwargs(args)
    assert kw["prompt"] == "Hello" and "messages" not in kw
    assert (kw["adapter_id"], kw["max_new_tokens"], kw["temperature"], kw["top_k"]) == ("a", 9, 0.7, 5)
    assert (kw["top_p"], kw["seed"], kw["repetition_penalty"]) == (0.8, 3, 1.1)
    assert (kw["stop_sequences"], kw["token_logprobs"]) == (("x", "y"), True)
    build_generate_request(**kw)   # every key is one the request builder knows


@pytest.mark.parametrize("flags, messages", [
    (["--chat"], [{"role": "user", "content": "Q"}]),
    (["--system", "S"], [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]),
])
def test_chat_flags_send_messages(flags, messages):
    kw = cli.generate_kwargs(cli.build_parser({}).parse_args(["generate", "Q", *flags]))
    assert kw["messages"] == messages and "prompt" not in kw


def test_unknown_flags_are_refused_except_by_demo():
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
    args, extra = cli.build_parser({}).parse_known_args(["demo", "--port", "5", "--model", "/m", "--no-warmup"])
    assert (args.port, extra) == (5, ["--model", "/m", "--no-warmup"])
    assert demo.server_command(5, extra, 6)[-7:] == ["--port", "5", "--metrics-port", "6", "--model", "/m", "--no-warmup"]


@pytest.mark.parametrize("argv, module, attr", [(["serve", "--port", "1", "--help"], "loraplex.server.main", "main"),
                                                (["bench", "--x"], "loraplex.bench", "main")])
def test_serve_and_bench_get_the_rest_of_the_line(monkeypatch, argv, module, attr):
    seen = []
    fake = types.ModuleType(module)
    setattr(fake, attr, lambda rest: seen.append(rest) or 0)
    monkeypatch.setitem(sys.modules, module, fake)
    if module == "loraplex.bench":
        monkeypatch.setattr(sys.modules["loraplex"], "bench", fake, raising=False)
    assert cli.main(argv) == 0 and seen == [argv[1:]]


# --- against a scripted server ----------------------------------------------------------------------------------

class Scripted(pb_grpc.GenerationServiceServicer):
    """Echoes the prompt; a prompt "fail:CODE" aborts with that status. Records each call's metadata."""

    def __init__(self):
        self.metadata = []

    def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if request.text.startswith("fail:"):
            context.abort(grpc.StatusCode[request.text[5:]], "scripted failure")
        return pb.GenerateResponse(text=request.text, stop_reason=pb.EOS_TOKEN, generated_token_count=1)

    def GenerateStream(self, request, context):
        for i, word in enumerate(request.text.split()):
            yield pb.GenerateResponse(text=word, generated_token_count=i + 1)
        yield pb.GenerateResponse(stop_reason=pb.MAX_TOKENS, generated_token_count=i + 1)


@pytest.fixture
def scripted():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer, status = Scripted(), health.HealthServicer()
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield types.SimpleNamespace(target=f"127.0.0.1:{port}", servicer=servicer, health=status)
    server.stop(0)


def test_token_goes_out_as_bearer_metadata(scripted):
    with Client(scripted.target, token="s3cret") as client:
        client.generate("hi")
    with Client(scripted.target) as client:
        client.generate("hi")
    assert scripted.servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert "authorization" not in scripted.servicer.metadata[1]


@pytest.mark.parametrize("code, cls", [("NOT_FOUND", NotFound), ("UNAUTHENTICATED", Unauthenticated),
                                       ("INVALID_ARGUMENT", InvalidArgument)])
def test_server_status_raises_typed_error(scripted, code, cls):
    with Client(scripted.target) as client, pytest.raises(cls, match="scripted failure"):
        client.generate(f"fail:{code}")


def test_stream_chunks_and_final_stop_reason(scripted):
    with Client(scripted.target) as client:
        chunks = list(client.generate_stream("a b c"))
    assert [c.text for c in chunks] == ["a", "b", "c", ""]
    assert [c.finished for c in chunks] == [False, False, False, True] and chunks[-1].stop_reason == "MAX_TOKENS"


def test_health_and_wait_until_ready(scripted, capsys):
    scripted.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with Client(scripted.target) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(DeadlineExceeded, match="NOT_SERVING"):
            client.wait_until_ready(0.5)
        scripted.health.set("", health_pb2.HealthCheckResponse.SERVING)
        client.wait_until_ready(5)
    assert cli.main(["health", "--target", scripted.target]) == 0
    scripted.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert cli.main(["health", "--target", scripted.target]) == 1
    assert capsys.readouterr().out.split() == ["SERVING", "NOT_SERVING"]


def test_unreachable_server_is_unavailable(capsys):
    with Client(f"127.0.0.1:{demo.free_port()}", timeout=5) as client, pytest.raises(Unavailable):
        client.model_info()
    assert cli.main(["info", "--target", f"127.0.0.1:{demo.free_port()}", "--timeout", "5"]) == 1
    assert "error: UNAVAILABLE" in capsys.readouterr().err


# --- end to end: a real server on a tiny random model ----------------------------------------------------------

def test_generate_matches_stream_greedy(tiny_server):
    with Client(tiny_server, timeout=120) as client:
        whole = client.generate("Hello there", max_new_tokens=12, min_new_tokens=12, token_logprobs=True)
        chunks = list(client.generate_stream("Hello there", max_new_tokens=12, min_new_tokens=12))
    assert whole.stop_reason == "MAX_TOKENS" and whole.generated_token_count == 12 and len(whole.tokens) == 12
    assert whole.text == "".join(c.text for c in chunks) and chunks[-1].stop_reason == "MAX_TOKENS"
    assert all(t.logprob <= 0 for t in whole.tokens)


def test_model_info_tokenize_and_errors(tiny_server):
    with Client(tiny_server, timeout=60) as client:
        client.wait_until_ready(30)
        assert client.model_info().max_sequence_length > 0
        tokens = client.tokenize("Hello world", return_tokens=True)
        assert tokens.token_count == len(tokens.token_ids) == len(tokens.tokens) > 0
        with pytest.raises(InvalidArgument, match="temperature"):
            client.generate("hi", temperature=-1.0)
        with pytest.raises(NotFound):
            client.generate("hi", adapter_id="no-such-adapter")


def test_async_client(tiny_server):
    async def run():
        async with AsyncClient(tiny_server, timeout=120) as client:
            await client.wait_until_ready(30)
            whole = await client.generate(messages=[("user", "Hi")], max_new_tokens=6, min_new_tokens=6)
            chunks = [c async for c in client.generate_stream(messages=[("user", "Hi")], max_new_tokens=6,
                                                               min_new_tokens=6)]
            with pytest.raises(InvalidArgument):
                await client.generate("hi", top_p=1.5)
            return whole, chunks, await client.health()
    whole, chunks, status = asyncio.run(run())
    assert whole.text == "".join(c.text for c in chunks) and status == "SERVING"


def test_cli_verbs(tiny_server, capsys):
    assert cli.main(["generate", "Hello", "--target", tiny_server, "--max-new-tokens", "4", "--stream"]) == 0
    streamed = capsys.readouterr()
    assert cli.main(["generate", "Hello", "--target", tiny_server, "--max-new-tokens", "4", "--logprobs"]) == 0
    whole = capsys.readouterr()
    assert streamed.out == whole.out and "generated_tokens=4" in whole.err
    assert cli.main(["info", "--target", tiny_server]) == 0
    assert "max_sequence_length" in capsys.readouterr().out
    assert cli.main(["tokenize", "Hello world", "--target", tiny_server]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("tokens")


def test_demo_runs_a_server_and_stops_it(tiny_model_dir, capsys):
    code = cli.main(["demo", "--model", str(tiny_model_dir), "--kv-cache-mb", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert demo.DEMO_QUESTION in out and "server stopped." in out
    assert f"models: {tiny_model_dir.name})" in out and demo.DEMO_OPENAI_QUESTION in out
    assert "requests finished 3, failed 0;" in out     # read from the server's /metrics after the 3 answers


def test_demo_reports_a_dead_server(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 1
    assert "exited with code" in capsys.readouterr().err
