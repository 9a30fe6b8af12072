"""Bad requests get the right status and a message naming the field; the server keeps serving."""

import threading
import time

import grpc
import pytest

from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def gen(text="Hello", **stopping_and_sampling):
    sampling = {k: v for k, v in stopping_and_sampling.items() if k in pb.SamplingParameters.DESCRIPTOR.fields_by_name}
    stopping = {k: v for k, v in stopping_and_sampling.items() if k in pb.StoppingCriteria.DESCRIPTOR.fields_by_name}
    return pb.GenerateRequest(text=text, params=pb.Parameters(sampling=pb.SamplingParameters(**sampling),
                                                              stopping=pb.StoppingCriteria(**stopping)))


def long_request(n=400):
    return gen("Tell me a long story", max_new_tokens=n, min_new_tokens=n)


@pytest.mark.parametrize("request_, code, words", [
    (gen(""), INVALID, "text"),
    (pb.GenerateRequest(), INVALID, "text"),
    (pb.GenerateRequest(messages=pb.ChatMessages()), INVALID, "messages"),
    (pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="hi")])),
     INVALID, "messages[0].role"),
    (gen("word " * 600), INVALID, "context window"),
    (gen(max_new_tokens=0), INVALID, "max_new_tokens"),
    (gen(max_new_tokens=10_000), INVALID, "max_new_tokens"),
    (gen(max_new_tokens=4, min_new_tokens=8), INVALID, "min_new_tokens"),
    (gen(temperature=-0.5), INVALID, "temperature"),
    (gen(top_p=1.5), INVALID, "top_p"),
    (gen(top_p=-0.1), INVALID, "top_p"),
    (gen(stop_sequences=[""]), INVALID, "stop_sequences"),
    (pb.GenerateRequest(text="hi", adapter_id="no-such-adapter"), grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
    (gen(temperature=float("nan")), INVALID, "temperature"),
    (gen(top_p=float("nan")), INVALID, "top_p"),
    (gen(repetition_penalty=float("inf")), INVALID, "repetition_penalty"),
    (pb.GenerateRequest(text="hi", request_id="a\x00b"), INVALID, "request_id"),
    (pb.GenerateRequest(text="hi", request_id="r" * 257), INVALID, "request_id"),
])
def test_bad_request_gets_status_naming_the_field(tiny_server, stub_for, request_, code, words):
    stub = stub_for(tiny_server)
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request_, timeout=30)
        assert info.value.code() == code
        assert words in info.value.details()
    ok = stub.Generate(gen(max_new_tokens=3, min_new_tokens=3), timeout=30)   # and the server still serves
    assert ok.generated_token_count == 3


def test_top_k_negative_is_refused_by_the_wire_type(tiny_server, stub_for):
    # top_k is unsigned on the wire, so a negative value cannot even be encoded by a client.
    with pytest.raises(ValueError):
        pb.SamplingParameters(top_k=-1)


def test_prompt_longer_than_window_is_kept_when_truncation_is_asked(tiny_server, stub_for):
    request = gen("word " * 600, max_new_tokens=2)
    request.truncate_input_tokens = 100
    response = stub_for(tiny_server).Generate(request, timeout=30)
    assert response.input_token_count == 100


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_client_cancel_mid_stream_frees_kv_at_once(tiny_server_thread, stub_for):
    engine, stub = tiny_server_thread.engine, stub_for(tiny_server_thread.target)
    stream = stub.GenerateStream(long_request(), timeout=60)
    next(stream)
    next(stream)
    assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total   # it holds KV now
    stream.cancel()
    assert wait_for(lambda: engine.stats().kv_blocks_free == engine.stats().kv_blocks_total, timeout=1.0)
    assert engine.stats().running == 0


def test_deadline_mid_stream_frees_kv(tiny_server_thread, stub_for):
    engine, stub = tiny_server_thread.engine, stub_for(tiny_server_thread.target)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.GenerateStream(long_request(5000 // 10), timeout=0.3):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: engine.stats().kv_blocks_free == engine.stats().kv_blocks_total, timeout=1.0)


def drain(stream):
    try:
        for _ in stream:
            pass
    except grpc.RpcError:
        pass   # cancelled by the test


def test_queue_full_is_resource_exhausted(tiny_model_dir, stub_for):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=1, max_queue_size=1)
    try:
        stub = stub_for(server.target)
        running = stub.GenerateStream(long_request(), timeout=60)
        next(running)                                          # occupies the only batch place
        queued = stub.GenerateStream(long_request(), timeout=60)
        threading.Thread(target=drain, args=(queued,), daemon=True).start()
        assert wait_for(lambda: server.engine.stats().waiting == 1)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(gen(max_new_tokens=2), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details()
        running.cancel()
        queued.cancel()
        assert wait_for(lambda: server.engine.stats().running + server.engine.stats().waiting == 0)
        failures = server.running.metrics.registry.get_sample_value
        assert failures("loraplex_request_failure_total", {"reason": "queue_full"}) == 1
        assert wait_for(lambda: failures("loraplex_request_failure_total", {"reason": "cancelled"}) == 2)
        assert stub.Generate(gen(max_new_tokens=2, min_new_tokens=2), timeout=30).generated_token_count == 2
    finally:
        server.close()
