"""Each server limit, exceeded through the real gRPC stack, gets its own status code and a message that
names it; the server keeps serving afterwards."""

import asyncio
import collections

import grpc
import pytest

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from servers import ServerThread


@pytest.fixture(scope="module")
def limited(tiny_model_dir):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_message_bytes=64 * 1024,
                          max_prompt_tokens=8, max_new_tokens=32, default_max_new_tokens=16)
    yield server
    server.close()


def request(text="Hello there", n=4, **kw):
    return pb.GenerateRequest(text=text, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n), **kw))


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_message_size(limited, stub_for):
    stub = stub_for(limited.target)
    code, details = code_of(lambda: stub.Generate(request("word " * 20_000), timeout=30))   # ~100 KB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message" in details.lower()
    assert stub.Generate(request(), timeout=30).generated_token_count == 4


def test_prompt_tokens(limited, stub_for):
    stub = stub_for(limited.target)
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    code, details = code_of(lambda: stub.Generate(request(long_prompt), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in details
    truncated = pb.GenerateRequest(text=long_prompt, truncate_input_tokens=8,
                                   params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)))
    assert stub.Generate(truncated, timeout=30).input_token_count == 8


def test_new_tokens(limited, stub_for):
    code, details = code_of(lambda: stub_for(limited.target).Generate(request(n=33), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in details


def test_concurrent_rpcs(tiny_model_dir, stub_for):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_concurrent_rpcs=2)
    try:
        stub = stub_for(server.target)
        slow = pb.GenerateRequest(text="Hi", params=pb.Parameters(
            stopping=pb.StoppingCriteria(max_new_tokens=480, min_new_tokens=480)))
        holders = [stub.GenerateStream(slow, timeout=60) for _ in range(2)]
        for holder in holders:
            next(holder)                                   # both running: the server is at its limit
        code, _ = code_of(lambda: stub.Generate(request(), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for holder in holders:
            assert list(holder)[-1].generated_token_count == 480
        assert stub.Generate(request(), timeout=30).generated_token_count == 4
    finally:
        server.close()


def test_streams_beyond_the_connection_limit_wait(tiny_model_dir):
    # 200 calls at once on one connection to a server allowing 8 streams per connection: all succeed, and
    # the engine never holds more than 8 of them (the rest waited in the client for a free stream)
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=16,
                          max_concurrent_streams=8)
    try:
        codes, most_at_once = asyncio.run(_burst(server, calls=200))
        assert codes == {grpc.StatusCode.OK: 200}
        assert 2 <= most_at_once <= 8
    finally:
        server.close()


async def _burst(server, calls: int) -> tuple[dict, int]:
    """Status counts of `calls` concurrent short streams on one channel, and the most requests the engine
    held at once meanwhile."""
    seen = [0]

    async def watch():
        while True:
            stats = server.engine.stats()
            seen[0] = max(seen[0], stats.running + stats.waiting)
            await asyncio.sleep(0.002)

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        watcher = asyncio.create_task(watch())
        codes = await asyncio.gather(*(_stream_code(stub) for _ in range(calls)))
        watcher.cancel()
    return dict(collections.Counter(codes)), seen[0]


async def _stream_code(stub) -> grpc.StatusCode:
    try:
        async for _ in stub.GenerateStream(request(n=2), timeout=120):
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


# --- the KV cache budget ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_kv(tmp_path_factory):
    """A server whose whole KV cache (1 MiB) holds fewer tokens than its context window: K and V of 4 layers
    of 2 heads of 64 dims in float32 are 4 KiB per token, so 256 tokens, against a window of 512."""
    from servers import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("kv-heavy"), hidden_size=128, num_attention_heads=2,
                            num_key_value_heads=2, num_hidden_layers=4)
    server = ServerThread(model=str(model), kv_cache_mb=1, max_batch_size=8)
    yield server
    server.close()


def greedy(text: str, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
        response=pb.ResponseOptions(token_logprobs=True)))


def answer(response) -> tuple:
    return response.generated_token_count, response.text, [(t.token_id, t.logprob) for t in response.tokens]


def test_a_request_over_the_whole_kv_cache_is_refused_and_others_go_on(small_kv, stub_for):
    stub = stub_for(small_kv.target)
    capacity = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).kv_cache_tokens
    assert capacity == 256 and small_kv.engine.limits.max_sequence_length == 512
    text = "word " * 100
    prompt = stub.Generate(greedy(text, 1), timeout=60).input_token_count
    for n in (capacity - prompt + 1, 400):                   # one token over the cache, far over it
        code, details = code_of(lambda: stub.Generate(greedy(text, n), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"whole KV cache ({capacity} tokens)" in details
    code, details = code_of(lambda: stub.Generate(greedy("word " * 300, 1), timeout=60))   # the prompt alone
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache" in details, details
    exact = stub.Generate(greedy(text, capacity - prompt), timeout=300)       # fills the cache to the last row
    assert exact.stop_reason == pb.MAX_TOKENS and exact.generated_token_count == capacity - prompt
    stats = small_kv.engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats


def test_requests_that_fit_alone_but_not_together_all_finish_as_alone(small_kv, stub_for):
    # 5 requests of about 80 tokens each in a 256-token cache: decoding together they run out of rows,
    # the newest are preempted (their rows kept in host memory) and resumed; each answer equals its solo one
    stub = stub_for(small_kv.target)
    prompts = [f"Story number {i}: once upon a time" for i in range(5)]
    solo = [answer(stub.Generate(greedy(p, 70), timeout=300)) for p in prompts]
    before = small_kv.engine.stats().preemptions
    calls = [stub.Generate.future(greedy(p, 70), timeout=600) for p in prompts]
    together = [answer(call.result()) for call in calls]
    stats = small_kv.engine.stats()
    assert stats.preemptions > before, "the cache never ran short: the test proves nothing"
    assert together == solo
    assert (stats.running, stats.waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total), stats
