"""Hostile input on the wire: malformed request bytes and fuzzed requests get a status a client can act on
(never UNKNOWN or INTERNAL), CPU-heavy calls leave the event loop free, and the server keeps serving."""

import collections
import threading
import time

import grpc
import pytest

import fuzz_requests
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

INVALID = grpc.StatusCode.INVALID_ARGUMENT

# Request bytes no message type can parse (DecodeError), each for a reason of its own.
MALFORMED = {
    "truncated varint": b"\x08\xff",
    "length past the end": b"\x1a\xff\xff\xff\xff\x0f",
    "wire type 6 (none such)": b"\x0e",
    "fixed64 cut short": b"\x09\x01\x02",
    "group never ended": b"\x0b" * 5,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = fuzz_requests.fuzz_server(tiny_model_dir, tmp_path_factory.mktemp("adapters"))
    yield server
    server.close()


def healthy(target: str) -> None:
    """The server still answers a plain request in full."""
    with grpc.insecure_channel(target) as channel:
        request = pb.GenerateRequest(text="Hello", params=pb.Parameters(
            stopping=pb.StoppingCriteria(max_new_tokens=3, min_new_tokens=3)))
        code, response = fuzz_requests.call(channel, fuzz_requests.GENERATION + "Generate", request)
    assert code is grpc.StatusCode.OK and response.generated_token_count == 3


@pytest.mark.parametrize("method", fuzz_requests.METHODS)
@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_bytes_are_invalid_argument(server, method, name):
    with grpc.insecure_channel(server.target) as channel:
        code, details = fuzz_requests.call(channel, method, MALFORMED[name])
    assert code is INVALID, (code, details)
    assert details.startswith("malformed request:") and "Error parsing message" in details
    healthy(server.target)


WITH_STRING_FIELD_1 = [m for m in fuzz_requests.METHODS if not m.endswith(("/ModelInfo", "/ListAdapters"))]


@pytest.mark.parametrize("method", WITH_STRING_FIELD_1)
def test_string_field_not_utf8_names_the_reason(server, method):
    with grpc.insecure_channel(server.target) as channel:
        # field 1, a string in each of these requests, holding the bytes ff fe
        code, details = fuzz_requests.call(channel, method, b"\x0a\x02\xff\xfe")
    assert code is INVALID and "Request" in details and "UTF-8" in details, (code, details)
    healthy(server.target)


def test_fuzzed_requests_never_get_unknown_or_internal(server):
    assert fuzz_requests.run(server.target, n=100, seed=20240601) == []
    healthy(server.target)


def test_stream_goes_on_while_a_big_tokenize_runs(tiny_server_thread, stub_for):
    stub = stub_for(tiny_server_thread.target)
    stream = stub.GenerateStream(pb.GenerateRequest(text="Hi", params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=480, min_new_tokens=480))), timeout=120)
    arrivals = []
    reader = threading.Thread(target=_arrival_times, args=(stream, arrivals), daemon=True)
    reader.start()
    while len(arrivals) < 3:                       # the stream is decoding
        time.sleep(0.01)
    started = time.monotonic()
    reply = stub.Tokenize(pb.TokenizeRequest(text="hello world, this is a test. " * 50_000), timeout=120)
    ended = time.monotonic()
    stream.cancel()
    reader.join(10)
    assert reply.token_count > 100_000
    during = [started] + [t for t in arrivals if started < t < ended] + [ended]
    longest_gap = max(b - a for a, b in zip(during, during[1:]))
    # a Tokenize on the event loop stops every stream for its whole duration (one gap of about `ended -
    # started`); off the loop the stream's chunks keep coming, a step apart
    assert len(during) > 4 and longest_gap < 0.5 * (ended - started), (len(during), longest_gap, ended - started)


def _arrival_times(stream, arrivals: list) -> None:
    try:
        for _ in stream:
            arrivals.append(time.monotonic())
    except grpc.RpcError:
        pass   # cancelled by the test


def test_deadline_while_the_prompt_is_tokenized_frees_the_request(tiny_server_thread, stub_for):
    # the deadline passes while Engine.add_request still tokenizes a 1 MB prompt on its executor thread;
    # the request it then adds has no one to stream to and must be aborted, not decoded to the end
    engine, stub = tiny_server_thread.engine, stub_for(tiny_server_thread.target)
    before = engine.stats().steps
    request = pb.GenerateRequest(text="word " * 200_000, truncate_input_tokens=16, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=480, min_new_tokens=480)))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=0.2)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(3.0)                                # tokenized and added by now (about 1.5 s per MB)
    stats = engine.stats()
    assert stats.running + stats.waiting == 0 and stats.steps - before < 50, stats


# --- a queue flood ------------------------------------------------------------------------------------

class StepGate:
    """Wraps ModelRunner.step: once closed, the engine loop parks inside the first decode step of at least
    `size` sequences, so nothing more is admitted and every request that arrives meanwhile stays in the
    queue (a step that takes long, made certain)."""

    def __init__(self, step, size: int):
        self.step, self.size = step, size
        self.closed = False
        self.parked = threading.Event()
        self.opened = threading.Event()

    def __call__(self, batch, eos_ids):
        if self.closed and not batch.prefill and len(batch.seqs) >= self.size:
            self.parked.set()
            self.opened.wait(300)
        return self.step(batch, eos_ids)


def greedy(text: str, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
        response=pb.ResponseOptions(token_logprobs=True)))


def answer(response) -> tuple:
    return response.text, [(t.token_id, t.logprob) for t in response.tokens]


def stream_answer(chunks) -> tuple:
    return "".join(c.text for c in chunks), [(t.token_id, t.logprob) for c in chunks for t in c.tokens]


def outcome(call):
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_queue_flood_beside_healthy_streams(tiny_model_dir, stub_for, monkeypatch):
    # 3 healthy streams run (batch room for 4); the loop is held in their step while 24 calls arrive at
    # once: the queue takes 4 of them, the other 20 get RESOURCE_EXHAUSTED at once; then every admitted
    # request finishes with its solo answer, the counters say queue_full 20 times, the gauges are back to 0
    from concurrent.futures import ThreadPoolExecutor

    from soak import scrape

    queue, flood, prompts = 4, 24, ["Hello", "The cat sat", "Once upon a time"]
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=4,
                          max_queue_size=queue)
    gate = StepGate(server.engine.runner.step, size=len(prompts))
    try:
        stub = stub_for(server.target)
        solo = {p: answer(stub.Generate(greedy(p, 120), timeout=300)) for p in prompts}
        before = scrape(server.running.metrics_port)
        monkeypatch.setattr(server.engine.runner, "step", gate)
        gate.closed = True
        healthy_streams = [stub.GenerateStream(greedy(p, 120), timeout=300) for p in prompts]
        assert gate.parked.wait(300), "the three streams never decoded together"
        assert server.engine.stats().running == len(prompts)
        calls = [(lambda p=p: answer(stub.Generate(greedy(p, 8), timeout=300))) if i % 2 else
                 (lambda p=p: stream_answer(list(stub.GenerateStream(greedy(p, 8), timeout=300))))
                 for i, p in enumerate(prompts[i % 3] for i in range(flood))]
        with ThreadPoolExecutor(flood) as pool:
            futures = [pool.submit(outcome, call) for call in calls]
            deadline = time.monotonic() + 120
            while sum(f.done() for f in futures) < flood - queue or server.engine.stats().waiting < queue:
                assert time.monotonic() < deadline, [f.result() for f in futures if f.done()]
                time.sleep(0.01)
            gate.opened.set()
            results = [f.result() for f in futures]
        healthy_answers = [stream_answer(list(stream)) for stream in healthy_streams]

        codes = collections.Counter(code for code, _ in results)
        assert codes == {grpc.StatusCode.OK: queue, grpc.StatusCode.RESOURCE_EXHAUSTED: flood - queue}, codes
        for code, details in results:
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert f"the queue is full ({queue} requests waiting)" in details, details
        assert healthy_answers == [solo[p] for p in prompts]          # undisturbed, bit for bit
        short = {p: answer(stub.Generate(greedy(p, 8), timeout=300)) for p in prompts}
        served = [(p, got) for p, (code, got) in zip((prompts[i % 3] for i in range(flood)), results)
                  if code is grpc.StatusCode.OK]
        assert all(got == short[p] for p, got in served)

        stats = server.engine.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats
        after = scrape(server.running.metrics_port)
        full = "loraplex_request_failure_total{queue_full}"
        assert after[full] - before[full] == flood - queue
        assert after["loraplex_request_failure_total{internal}"] == 0
        for gauge in ("loraplex_requests_running", "loraplex_requests_waiting", "loraplex_kv_cache_usage_ratio"):
            assert after[gauge] == 0, (gauge, after[gauge])
        healthy(server.target)
    finally:
        gate.opened.set()
        server.close()
