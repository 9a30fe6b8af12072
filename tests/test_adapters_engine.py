"""Adapters through the whole server: a mixed batch of several LoRA adapters and base-only requests,
each checked against PEFT with that adapter alone on the same NF4 base (the oracle), plus the faults."""

import threading

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread, save_foreign_adapter

ADAPTERS = {  # id -> (rank, alpha, targets)
    "small": (4, 8, ["q_proj", "v_proj"]),
    "all": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "team/big": (64, 128, ["k_proj", "up_proj", "down_proj"]),
}
NEW = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(base, config)
        for p in model.parameters():      # big enough deltas that a wrong adapter changes the answer
            if p.requires_grad:
                p.data *= 20
        model.save_pretrained(root / name)
    save_foreign_adapter(root / "foreign", tmp_path_factory.mktemp("other-base"))
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, root):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=4, max_lora_rank=64)
    yield server
    server.close()


def request(adapter_id, prompt="The weather today is"):
    return pb.GenerateRequest(text=prompt, adapter_id=adapter_id, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=NEW, min_new_tokens=NEW),
        response=pb.ResponseOptions(token_logprobs=True, top_n_tokens=3)))


def oracle_logprobs(tiny_model_dir, root, adapter_id, ids):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32)
    if adapter_id:
        model = PeftModel.from_pretrained(model, root / adapter_id)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_mixed_batch_equals_peft_with_each_adapter_alone(server, stub_for, tiny_model_dir, root):
    stub = stub_for(server.target)
    ids = ["small", "", "all", "team/big", "small", ""]
    results = {}

    def run(i):
        results[i] = stub.Generate(request(ids[i]), timeout=120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("The weather today is").input_ids
    answers = {}
    for i, adapter_id in enumerate(ids):
        tokens = [t.token_id for t in results[i].tokens]
        answers.setdefault(adapter_id, tokens)
        assert answers[adapter_id] == tokens                     # same adapter, same greedy answer
        logprobs = oracle_logprobs(tiny_model_dir, root, adapter_id, prompt + tokens)
        for step, token in enumerate(results[i].tokens):
            row = logprobs[len(prompt) - 1 + step]
            assert token.token_id == int(row.argmax()), (adapter_id, step)
            assert abs(token.logprob - float(row[token.token_id])) < 2e-3
    assert len({tuple(v) for v in answers.values()}) == len(answers)   # every adapter answers differently


@pytest.mark.parametrize("adapter_id, code, words", [
    ("no-such-adapter", grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
    ("../etc", grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ("/abs/path", grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ("%2e%2e/x", grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ("foreign", grpc.StatusCode.FAILED_PRECONDITION, "foreign"),
])
def test_bad_adapters_are_refused_and_others_keep_working(server, stub_for, adapter_id, code, words):
    stub = stub_for(server.target)
    adapters = server.engine.adapters
    stub.Generate(request("small"), timeout=60)
    before = (adapters.catalog(), adapters.registry.slots.keys())
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request(adapter_id), timeout=60)
    assert info.value.code() == code and words in info.value.details()
    assert (adapters.catalog(), adapters.registry.slots.keys()) == before   # the registry is unchanged
    assert stub.Generate(request("small"), timeout=60).generated_token_count == NEW


def test_naming_a_replica_on_a_single_server_is_refused_and_changes_nothing(server, stub_for):
    from loraplex.v1 import adapters_pb2 as apb
    from loraplex.v1 import adapters_pb2_grpc as apb_grpc

    admin = apb_grpc.AdapterServiceStub(grpc.insecure_channel(server.target))
    before = server.engine.adapters.catalog()
    calls = [(admin.LoadAdapter, apb.LoadAdapterRequest(adapter_id="small", replica="r1")),
             (admin.UnloadAdapter, apb.UnloadAdapterRequest(adapter_id="small", replica="r1")),
             (admin.MergeAdapter, apb.MergeAdapterRequest(adapter_id="small", replica="r1")),
             (admin.UnmergeAdapter, apb.UnmergeAdapterRequest(replica="r1"))]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as info:
            method(req, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "runs no replicas" in info.value.details()
    assert server.engine.adapters.catalog() == before and server.engine.weights.status() is None
    assert stub_for(server.target).Generate(request("small"), timeout=60).generated_token_count == NEW


def test_concurrent_first_requests_read_the_adapter_once(tiny_model_dir, root, stub_for):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=2)
    try:
        stub = stub_for(server.target)
        outputs = []
        threads = [threading.Thread(target=lambda: outputs.append(stub.Generate(request("all"), timeout=120)))
                   for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(outputs) == 50 and len({tuple(t.token_id for t in o.tokens) for o in outputs}) == 1
        assert server.engine.adapters.registry.loads == 1
        assert server.engine.adapters.registry.slots.refs(("all", 1)) == 0   # every request gave its slot back
    finally:
        server.close()


@pytest.fixture()
def admin(server):
    from loraplex.v1 import adapters_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        yield adapters_pb2_grpc.AdapterServiceStub(channel)


def test_admin_lists_loads_pins_and_unloads(server, admin, stub_for):
    from loraplex.v1 import adapters_pb2 as apb

    listed = {a.adapter_id: a for a in admin.ListAdapters(apb.ListAdaptersRequest(), timeout=30).adapters}
    assert {"small", "all", "team/big", "foreign"} <= set(listed)
    loaded = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="team/big", pin=True), timeout=60)
    assert loaded.state == apb.LOADED and loaded.tier == apb.DEVICE and loaded.pinned
    assert loaded.rank == 64 and dict(loaded.ranks) == {"k_proj": 64, "up_proj": 64, "down_proj": 64}
    assert loaded.target_modules == ["down_proj", "k_proj", "up_proj"] and loaded.size_bytes > 0
    before = [t.token_id for t in stub_for(server.target).Generate(request("small"), timeout=60).tokens]
    gone = admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="small"), timeout=30)
    assert gone.state == apb.UNLOADED
    assert admin.GetAdapter(apb.GetAdapterRequest(adapter_id="small"), timeout=30).state == apb.ON_DISK
    after = [t.token_id for t in stub_for(server.target).Generate(request("small"), timeout=60).tokens]
    assert after == before          # read again on its next request, same answer


def long_request(adapter_id, n=300):
    return pb.GenerateRequest(text="Hi", adapter_id=adapter_id, params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
        response=pb.ResponseOptions(token_logprobs=True)))


def stream_tokens(stream):
    return [t.token_id for chunk in stream for t in chunk.tokens]


def test_unload_mid_stream_lets_the_request_finish_correctly(server, admin, stub_for):
    from loraplex.v1 import adapters_pb2 as apb

    stub = stub_for(server.target)
    want = [t.token_id for t in stub.Generate(long_request("all"), timeout=120).tokens]
    stream = stub.GenerateStream(long_request("all"), timeout=120)
    first = next(stream)
    assert admin.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id="all"), timeout=30).state == apb.UNLOADED
    assert server.engine.stats().running == 1                                  # still mid-stream
    assert [t.token_id for t in first.tokens] + stream_tokens(stream) == want
    assert [t.token_id for t in stub.Generate(long_request("all"), timeout=120).tokens] == want   # read again


def test_reload_with_changed_files_publishes_a_new_version_mid_stream(server, admin, stub_for, root):
    import shutil

    from loraplex.v1 import adapters_pb2 as apb

    stub = stub_for(server.target)
    shutil.copytree(root / "small", root / "swap")
    try:
        old = [t.token_id for t in stub.Generate(long_request("small"), timeout=120).tokens]
        new = [t.token_id for t in stub.Generate(long_request("all"), timeout=120).tokens]
        assert old != new
        v1 = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="swap"), timeout=60).version
        stream = stub.GenerateStream(long_request("swap"), timeout=120)
        first = next(stream)
        for name in ("adapter_config.json", "adapter_model.safetensors"):   # continued training lands
            shutil.copy(root / "all" / name, root / "swap" / name)
        reloaded = admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="swap"), timeout=60)
        assert reloaded.version == v1 + 1 and reloaded.running_requests == 1   # the stream is still running
        after = [t.token_id for t in stub.Generate(long_request("swap"), timeout=120).tokens]
        running = [t.token_id for t in first.tokens] + stream_tokens(stream)
        assert running == old and after == new     # the running request kept its version; new ones get the new
        assert admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id="swap"), timeout=60).version == v1 + 1
    finally:
        shutil.rmtree(root / "swap")


@pytest.mark.parametrize("adapter_id, code", [("", grpc.StatusCode.INVALID_ARGUMENT),
                                              ("../x", grpc.StatusCode.INVALID_ARGUMENT),
                                              ("missing", grpc.StatusCode.NOT_FOUND)])
def test_admin_bad_ids(admin, adapter_id, code):
    from loraplex.v1 import adapters_pb2 as apb

    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter_id), timeout=30)
    assert info.value.code() == code


def test_admin_service_can_be_turned_off(tiny_model_dir, root):
    from loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc

    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_service=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                adapters_pb2_grpc.AdapterServiceStub(channel).ListAdapters(apb.ListAdaptersRequest(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.close()


def test_cli_adapter_verbs_and_generate_with_adapter(server, capsys):
    import json

    from loraplex.clients.cli import main

    target = ["--target", server.target]
    assert main(["adapters", "list", *target]) == 0
    assert "team/big" in capsys.readouterr().out
    assert main(["adapters", "load", "r-none", *target]) == 1          # unknown: NOT_FOUND, exit 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["adapters", "load", "small", "--pin", *target]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tier"] == "DEVICE" and shown["pinned"] and shown["rank"] == 4
    assert main(["generate", "The weather today is", "--adapter", "small", "--max-new-tokens", "3", *target]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["adapters", "show", "small", *target]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "LOADED"


def test_requests_wait_for_a_busy_slot_while_others_go_on(tiny_model_dir, root, stub_for):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=1)
    try:
        stub = stub_for(server.target)
        want_big = [t.token_id for t in stub.Generate(request("team/big"), timeout=60).tokens]
        holder = stub.GenerateStream(long_request("small"), timeout=120)   # holds the only slot
        next(holder)
        results = {}
        waiter = threading.Thread(target=lambda: results.setdefault("big", stub.Generate(request("team/big"),
                                                                                         timeout=120)))
        waiter.start()
        base = stub.Generate(request(""), timeout=60)                      # base requests are not held up
        assert base.generated_token_count == NEW and "big" not in results
        assert server.engine.stats().waiting == 1
        rest = stream_tokens(holder)                                       # the holder finishes, frees the slot
        waiter.join(120)
        assert len(rest) > 0 and [t.token_id for t in results["big"].tokens] == want_big
    finally:
        server.close()


def test_all_slots_pinned_is_resource_exhausted(tiny_model_dir, root, stub_for):
    from loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc

    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_slots=1)
    try:
        with grpc.insecure_channel(server.target) as channel:
            adapters_pb2_grpc.AdapterServiceStub(channel).LoadAdapter(
                apb.LoadAdapterRequest(adapter_id="small", pin=True), timeout=60)
        stub = stub_for(server.target)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request("all"), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in info.value.details()
        assert stub.Generate(request("small"), timeout=60).generated_token_count == NEW
    finally:
        server.close()


def test_waiting_request_whose_adapter_is_deleted_fails_cleanly(tiny_model_dir, root, stub_for):
    import shutil

    from loraplex.v1 import adapters_pb2 as apb, adapters_pb2_grpc

    shutil.copytree(root / "small", root / "doomed")
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_slots=1)
    try:
        stub = stub_for(server.target)
        holder = stub.GenerateStream(long_request("all"), timeout=120)
        next(holder)
        waiter = stub.Generate.future(request("doomed"), timeout=120)
        assert _wait(lambda: server.engine.stats().waiting == 1)
        assert _wait(lambda: server.engine.adapters.registry.resident("doomed") is not None)   # read; no slot
        shutil.rmtree(root / "doomed")                          # files first: the waiter may re-read any time
        with grpc.insecure_channel(server.target) as channel:
            adapters_pb2_grpc.AdapterServiceStub(channel).UnloadAdapter(
                apb.UnloadAdapterRequest(adapter_id="doomed"), timeout=30)
        stream_tokens(holder)                                   # the slot frees; the waiter re-reads: gone
        with pytest.raises(grpc.RpcError) as info:
            waiter.result()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Generate(request("small"), timeout=60).generated_token_count == NEW
    finally:
        shutil.rmtree(root / "doomed", ignore_errors=True)
        server.close()


def _wait(predicate, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)
    return predicate()

