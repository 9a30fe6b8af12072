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
