"""One request never fails another: sampling values outside the safe range are refused up front, and a
sequence whose sampling still fails ends alone while the rest of its step goes on.

Oracle: each healthy request's own answer when it runs alone (greedy and seeded sampling are exact)."""

import threading

import grpc
import pytest

from loraplex.server.engine.request import GenerationRequest, SamplingParams, StoppingParams
from loraplex.server.engine.sequence import StopReason
from loraplex.v1 import generation_pb2 as pb
from engine_calls import run_together

NEW = 8
BAD_SAMPLING = [   # each passed the old checks and then broke the sampler for the whole step
    dict(temperature=1e-39), dict(temperature=1e-45), dict(temperature=float("inf"), min_new_tokens=2),
    dict(temperature=float("nan")), dict(temperature=0.7, repetition_penalty=1e-45),
    dict(temperature=0.7, repetition_penalty=float("inf")), dict(repetition_penalty=float("nan")),
]
HEALTHY = [dict(), dict(temperature=0.8, seed=3), dict(temperature=1.3, top_k=20, top_p=0.9, seed=11),
           dict(repetition_penalty=1.3)]


def proto(text="The weather today is", min_new_tokens=0, **sampling):
    return pb.GenerateRequest(text=text, params=pb.Parameters(
        sampling=pb.SamplingParameters(**sampling),
        stopping=pb.StoppingCriteria(max_new_tokens=NEW, min_new_tokens=min_new_tokens or NEW)))


def tokens(response) -> list[int]:
    return [t.token_id for t in response.tokens] or [response.text]


def with_tokens(request):
    request.params.response.token_logprobs = True
    return request


@pytest.mark.parametrize("bad", BAD_SAMPLING, ids=str)
def test_bad_sampling_value_is_refused_and_its_batch_is_unharmed(tiny_server, stub_for, bad):
    stub = stub_for(tiny_server)
    alone = [tokens(stub.Generate(with_tokens(proto(**h)), timeout=60)) for h in HEALTHY]
    results, errors = {}, {}

    def call(i, request):
        try:
            results[i] = tokens(stub.Generate(with_tokens(request), timeout=60))
        except grpc.RpcError as exc:
            errors[i] = exc

    requests = [proto(**h) for h in HEALTHY] + [proto(**bad)]
    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad_error = errors.pop(len(HEALTHY))
    assert bad_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.sampling." in bad_error.details()
    assert not errors
    assert [results[i] for i in range(len(HEALTHY))] == alone


def domain(**sampling) -> GenerationRequest:
    return GenerationRequest("The weather today is", sampling=SamplingParams(**sampling),
                             stopping=StoppingParams(max_new_tokens=NEW, min_new_tokens=NEW))


def test_a_sequence_whose_sampling_fails_ends_alone(tiny_server_thread):
    engine = tiny_server_thread.engine
    healthy = [domain(**h) for h in HEALTHY]
    alone = {r.request_id: run_together(engine, [r])[r.request_id] for r in healthy}
    poisoned = []
    for values in (dict(temperature=1e-45), dict(temperature=float("inf")), dict(repetition_penalty=1e-45)):
        request = domain(temperature=0.7)   # valid when made; then changed behind validation's back
        for field, value in values.items():
            object.__setattr__(request.sampling, field, value)
        poisoned.append(request)
    again = [domain(**h) for h in HEALTHY]
    together = run_together(engine, again + poisoned)
    for request in poisoned:
        last = together[request.request_id][-1]
        assert last.stop_reason is StopReason.ERROR and "sampling failed" in str(last.error)
    for before, request in zip(healthy, again):
        got = [(o.text, o.stop_reason) for o in together[request.request_id]]
        assert got == [(o.text, o.stop_reason) for o in alone[before.request_id]]
        assert together[request.request_id][-1].generated_token_count == NEW
