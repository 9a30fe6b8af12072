"""Merging an adapter into the weights on a running server (a tiny Llama), over the AdapterService.

Oracles: PEFT on the NF4 base. A `requantize` merge answers as PEFT's merge_and_unload model, a `dense`
merge as PEFT's unmerged adapter, both exactly (greedy, a fixed number of tokens). On a CPU with
AVX512-BF16 PEFT merges into the base weights the fused kernel multiplies by (bf16 block scales:
adapter_kinds.as_the_fused_kernel_scales), so its merged codes are ours; a dense merge differs from the
unmerged adapter by float rounding only, asserted on the logprobs too (< 1e-3 nats).
A stream of requests across merges and unmerges never fails, and each answer is the oracle of the weights
it ran on; bad merge requests get their status and disturb nothing."""

import threading
import time

import grpc
import pytest
import torch

import adapter_kinds
from loraplex.clients.admin import AdapterAdmin
from loraplex.clients.client import Client
from loraplex.clients.errors import FailedPrecondition, InvalidArgument, NotFound
from loraplex.server.model import layout
from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc
from servers import ServerThread, save_foreign_adapter

PROMPT, NEW = "The weather today is", 10


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-root")
    adapter_kinds.lora(tiny_model_dir, root / "a", factor=3.0)
    adapter_kinds.lora(tiny_model_dir, root / "b", factor=3.0, seed=9)
    adapter_kinds.dora(tiny_model_dir, root / "d", factor=3.0)
    save_foreign_adapter(root / "foreign", tmp_path_factory.mktemp("foreign-base"))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, root):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=8, adapter_roots=str(root),
                          adapter_slots=4)
    yield server
    server.close()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, root, server):
    """(adapter, merged) -> PEFT's greedy tokens for PROMPT; adapter "" is the base."""
    ids = list(Client(server.target).tokenize(PROMPT).token_ids)
    cases = [("", False), ("a", False), ("a", True), ("b", False), ("b", True), ("d", False), ("d", True)]
    return {(a, m): adapter_kinds.peft_greedy(tiny_model_dir, root / a if a else None, ids, NEW, merged=m)
            for a, m in cases}


def greedy(client: Client, adapter: str):
    """(token ids, the Generation with each token's logprob)."""
    out = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=NEW, min_new_tokens=NEW, token_logprobs=True)
    return [t.token_id for t in out.tokens], out


@pytest.mark.parametrize("adapter", ["a", "d"])
def test_merged_answers_equal_peft_merged_for_requantize_and_peft_unmerged_for_dense(server, oracle, adapter):
    client, admin = Client(server.target), AdapterAdmin(server.target)
    unmerged, plain = greedy(client, adapter)
    assert unmerged == oracle[(adapter, False)]
    for method, want in (("requantize", oracle[(adapter, True)]), ("dense", oracle[(adapter, False)])):
        info = admin.merge(adapter, method)
        assert (info.state, info.method, info.adapter_id) == ("MERGED", method.upper(), adapter)
        assert admin.get(adapter).merge.method == method.upper()
        tokens, merged = greedy(client, adapter)
        assert tokens == want, method
        if method == "dense":       # the same weights up to float rounding: logprobs agree closely
            assert max(abs(x.logprob - y.logprob) for x, y in zip(plain.tokens, merged.tokens)) < 1e-3
        assert greedy(client, "b")[0] == oracle[("b", False)]      # others are served meanwhile, unchanged
        assert greedy(client, "")[0] == oracle[("", False)]
        assert admin.unmerge().state == "UNMERGED"
    assert greedy(client, adapter)[0] == oracle[(adapter, False)]
    assert server.engine.weights.memory() == 0


def test_unmerge_leaves_every_base_weight_bit_for_bit(server):
    model, admin, client = server.engine.runner.model, AdapterAdmin(server.target), Client(server.target)

    def snapshot():
        return {(i, path, name): t.detach().clone() for i, layer in enumerate(model.model.layers)
                for path in layout.PACKED
                for name, t in [*layer.get_submodule(path).base.named_parameters(),
                                *layer.get_submodule(path).base.named_buffers()]}

    before = snapshot()
    for method in ("requantize", "dense"):
        admin.merge("a", method)
        greedy(client, "a")
        admin.unmerge()
    after = snapshot()
    assert before.keys() == after.keys() and len(before) >= len(model.model.layers) * len(layout.PACKED)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.get_submodule(path).alternates for layer in model.model.layers for path in layout.PACKED)


def test_a_stream_across_merges_and_unmerges_never_fails_and_each_answer_is_its_weights(server, oracle):
    admin, stop, lock = AdapterAdmin(server.target), threading.Event(), threading.Lock()
    seen, failures, windows = [], [], []

    def ask(adapter):
        client = Client(server.target)
        while not stop.is_set():
            started = time.monotonic()
            try:
                tokens, _ = greedy(client, adapter)
            except Exception as exc:   # noqa: BLE001 - every failure is a finding
                failures.append(repr(exc))
                continue
            with lock:
                seen.append((adapter, started, time.monotonic(), tokens))

    threads = [threading.Thread(target=ask, args=(a,)) for a in ("a", "a", "b", "")]
    for t in threads:
        t.start()
    try:
        for method in ("requantize", "dense", "requantize"):
            time.sleep(0.5)
            admin.merge("a", method)
            merged_at = time.monotonic()
            time.sleep(1.0)
            unmerging_at = time.monotonic()
            admin.unmerge()
            windows.append((method, merged_at, unmerging_at))
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert {a for a, *_ in seen} == {"a", "b", ""}
    for adapter, start, end, tokens in seen:
        if adapter != "a":
            assert tokens == oracle[(adapter, False)], adapter
            continue
        assert tokens in (oracle[("a", False)], oracle[("a", True)])
        inside = [m for m, t0, t1 in windows if t0 <= start and end <= t1]
        if inside:       # started after a merge was in place, ended before its unmerge: ran merged
            assert tokens == oracle[("a", inside[0] == "requantize")], inside
    merged_answers = sum(1 for a, s, e, _ in seen if a == "a" and any(t0 <= s and e <= t1 for _, t0, t1 in windows))
    assert merged_answers >= 3
    assert server.engine.weights.memory() == 0


def test_bad_merge_requests_get_their_status_and_disturb_nothing(server, oracle):
    admin, client = AdapterAdmin(server.target), Client(server.target)
    stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(NotFound):
        admin.merge("missing")
    with pytest.raises(InvalidArgument):
        admin.merge("../a")
    with pytest.raises(FailedPrecondition, match="cannot be served"):
        admin.merge("broken")
    with pytest.raises(FailedPrecondition, match="cannot be served"):
        admin.merge("foreign")
    with pytest.raises(FailedPrecondition, match="no adapter is merged"):
        admin.unmerge()
    with pytest.raises(FailedPrecondition, match="an exact merge needs a base with zero points per group; the base "
                                                 "is nf4 block 64"):
        admin.merge("a", "exact")
    for request, code in ((pb.MergeAdapterRequest(adapter_id="a", method=7), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.MergeAdapterRequest(adapter_id=""), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            stub.MergeAdapter(request, timeout=30)
        assert err.value.code() == code
    admin.merge("a", "dense")
    try:
        with pytest.raises(FailedPrecondition, match="'a' is merged; unmerge it first"):
            admin.merge("b")
        assert greedy(client, "b")[0] == oracle[("b", False)]
        assert greedy(client, "a")[0] == oracle[("a", False)]
        assert admin.get("a").merge.state == "MERGED" and admin.get("b").merge is None
    finally:
        admin.unmerge()
    assert greedy(client, "")[0] == oracle[("", False)]


def test_unloading_a_merged_adapter_unmerges_it_first(server, oracle):
    admin, client = AdapterAdmin(server.target), Client(server.target)
    admin.merge("b", "requantize")
    assert greedy(client, "b")[0] == oracle[("b", True)]
    assert admin.unload("b").state == "UNLOADED"
    assert server.engine.weights.status() is None and server.engine.weights.memory() == 0
    assert greedy(client, "b")[0] == oracle[("b", False)]      # read again, served through the LoRA path


def test_merge_at_start_before_serving(tiny_model_dir, root, oracle):
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, adapter_roots=str(root), adapter_slots=2,
                          merge_adapter="d", merge_method="requantize", warmup=False)
    try:
        info = AdapterAdmin(server.target).get("d")
        assert info.merge is not None and (info.merge.state, info.merge.method) == ("MERGED", "REQUANTIZE")
        assert 0 < info.merge.retained <= 1.01 and info.merge.size_bytes > 0
        assert greedy(Client(server.target), "d")[0] == oracle[("d", True)]
    finally:
        server.close()


def test_a_new_version_of_the_merged_adapter_is_merged_again(server, tiny_model_dir, root, tmp_path):
    """Its first request runs through the LoRA path and has it merged again; the old copy is dropped."""
    admin, client = AdapterAdmin(server.target), Client(server.target)
    ids = list(client.tokenize(PROMPT).token_ids)
    adapter_kinds.lora(tiny_model_dir, root / "v", factor=3.0, seed=5)
    adapter_kinds.lora(tiny_model_dir, tmp_path / "v2", factor=3.0, seed=6)
    assert admin.merge("v", "requantize").version == 1
    assert greedy(client, "v")[0] == adapter_kinds.peft_greedy(tiny_model_dir, root / "v", ids, NEW, merged=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (root / "v" / name).write_bytes((tmp_path / "v2" / name).read_bytes())
    try:
        assert admin.load("v").version == 2
        assert greedy(client, "v")[0] == adapter_kinds.peft_greedy(tiny_model_dir, root / "v", ids, NEW)
        deadline = time.monotonic() + 60
        while (admin.get("v").merge.version, admin.get("v").merge.state) != (2, "MERGED"):
            assert time.monotonic() < deadline, admin.get("v")
            time.sleep(0.05)
        assert admin.get("v").merge.method == "REQUANTIZE"
        merged_v2 = adapter_kinds.peft_greedy(tiny_model_dir, root / "v", ids, NEW, merged=True)
        assert greedy(client, "v")[0] == merged_v2
        greedy(client, "")                                 # a step after which the loop drops the old copy
        assert server.engine.weights.memory() == admin.get("v").merge.size_bytes
    finally:
        admin.unmerge()
