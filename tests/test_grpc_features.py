"""Sampling, stopping, tokenize, model info, health and reflection, through the wire."""

import subprocess
import sys
import pathlib

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplex.v1 import generation_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]


def gen(text="Once upon a time", sampling=None, **stopping):
    return pb.GenerateRequest(text=text, params=pb.Parameters(
        sampling=pb.SamplingParameters(**(sampling or {})), stopping=pb.StoppingCriteria(**stopping),
        response=pb.ResponseOptions(token_logprobs=True)))


def ids(response):
    return [t.token_id for t in response.tokens]


def test_same_seed_same_output_and_different_seed_differs(tiny_server, stub_for):
    stub = stub_for(tiny_server)
    sampling = dict(temperature=1.5, top_k=100, top_p=0.95, seed=1234)
    first = stub.Generate(gen(sampling=sampling, max_new_tokens=16, min_new_tokens=16), timeout=30)
    again = stub.Generate(gen(sampling=sampling, max_new_tokens=16, min_new_tokens=16), timeout=30)
    other = stub.Generate(gen(sampling={**sampling, "seed": 99}, max_new_tokens=16, min_new_tokens=16), timeout=30)
    assert ids(first) == ids(again) and first.seed == 1234
    assert ids(first) != ids(other)


def test_top_k_one_is_greedy(tiny_server, stub_for):
    stub = stub_for(tiny_server)
    greedy = stub.Generate(gen(max_new_tokens=12, min_new_tokens=12), timeout=30)
    top1 = stub.Generate(gen(sampling=dict(temperature=2.0, top_k=1, seed=5), max_new_tokens=12,
                             min_new_tokens=12), timeout=30)
    assert ids(greedy) == ids(top1)


def test_repetition_penalty_changes_greedy_choice(tiny_server, stub_for):
    stub = stub_for(tiny_server)
    plain = stub.Generate(gen(max_new_tokens=24, min_new_tokens=24), timeout=30)
    penalized = stub.Generate(gen(sampling=dict(repetition_penalty=5.0), max_new_tokens=24,
                                  min_new_tokens=24), timeout=30)
    # a strong penalty forbids repeats that plain greedy (on a random model) makes
    assert len(set(ids(plain))) < len(ids(plain))
    assert len(set(ids(penalized))) > len(set(ids(plain)))


def test_stop_sequence_cuts_text(tiny_server, stub_for):
    stub = stub_for(tiny_server)
    full = stub.Generate(gen(max_new_tokens=20, min_new_tokens=20), timeout=30)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    cut = stub.Generate(gen(max_new_tokens=20, stop_sequences=[stop]), timeout=30)
    assert cut.stop_reason == pb.STOP_SEQUENCE and cut.stop_sequence == stop
    assert cut.text == full.text[:full.text.index(stop)]
    kept = stub.Generate(gen(max_new_tokens=20, stop_sequences=[stop], include_stop_sequence=True), timeout=30)
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stream_chunks_add_up_to_unary_text(tiny_server, stub_for):
    stub = stub_for(tiny_server)
    unary = stub.Generate(gen(max_new_tokens=15, min_new_tokens=15), timeout=30)
    chunks = list(stub.GenerateStream(gen(max_new_tokens=15, min_new_tokens=15), timeout=30))
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].stop_reason == pb.MAX_TOKENS and all(c.stop_reason == 0 for c in chunks[:-1])
    assert chunks[-1].generated_token_count == 15


def test_time_limit_stops_generation(tiny_server, stub_for):
    response = stub_for(tiny_server).Generate(gen(max_new_tokens=1000, min_new_tokens=1000, time_limit_millis=50),
                                              timeout=30)
    assert response.stop_reason == pb.TIME_LIMIT and response.generated_token_count < 1000


def test_tokenize_and_model_info(tiny_server, stub_for, tiny_model_dir):
    from transformers import AutoTokenizer

    stub = stub_for(tiny_server)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    response = stub.Tokenize(pb.TokenizeRequest(text="Hello world", return_tokens=True), timeout=30)
    assert list(response.token_ids) == tokenizer("Hello world").input_ids
    assert list(response.tokens) == tokenizer.convert_ids_to_tokens(response.token_ids)
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.architecture == "llama" and info.quantization == "nf4" and info.max_sequence_length == 512


def test_health_serving_and_reflection_lists_services(tiny_server):
    with grpc.insecure_channel(tiny_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraplex.v1.GenerationService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"loraplex.v1.GenerationService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        method = pool.FindServiceByName("loraplex.v1.GenerationService").FindMethodByName("GenerateStream")
        assert method.server_streaming and method.input_type.full_name == "loraplex.v1.GenerateRequest"


def test_generated_stubs_match_protos():
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operations_doc_lists_every_setting():
    """docs/operations.md documents every server setting (its flag and its environment variable)."""
    import dataclasses
    import pathlib

    from loraplex.server.config import ENV_PREFIX, ServerConfig

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    missing = [f.name for f in dataclasses.fields(ServerConfig)
               if f"`--{f.name.replace('_', '-')}`" not in doc or f"`{ENV_PREFIX}{f.name.upper()}`" not in doc]
    assert not missing, f"docs/operations.md lacks {missing}"
