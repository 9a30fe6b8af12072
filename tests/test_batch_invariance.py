"""Answers never depend on the load: a request's greedy (and seeded) tokens are the same alone, beside other
adapters, beside 4 and 8 copies of itself, and after its sequence was preempted, for the base model and every
adapter kind. The oracle is the request's own answer alone, which the PEFT tests tie to PEFT; the rule is
exact equality of tokens and of their float32 logprobs: every product a row goes through has the same
shape alone and in a batch, so its bits must not change (a last-bit difference that would flip a greedy
token only some steps later is caught at once)."""

import pytest

import adapter_kinds
from engine_calls import exact_request, run_together, tokens_and_logprobs
from servers import ServerThread
from test_adapter_formats import make_qalora

KINDS = ["", *adapter_kinds.KINDS, "qalora"]
PROMPT = "The weather today is"
NEW = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory, embedded_dir):
    # the embedded model: on a tiny one, matrix products are too small for BLAS to block them by row count
    root = tmp_path_factory.mktemp("kinds")
    adapter_kinds.make_all(embedded_dir, root, factor=0.5)
    make_qalora(embedded_dir, root / "qalora")
    return root


@pytest.fixture(scope="module")
def server(root):
    server = ServerThread(kv_cache_mb=64, max_batch_size=16, adapter_roots=str(root), adapter_slots=len(KINDS),
                          max_lora_rank=64, max_prefill_tokens=4096)
    yield server
    server.close()


def answers(engine, requests) -> list[list[int]]:
    outputs = run_together(engine, requests)
    return [tokens_and_logprobs(outputs[r.request_id]) for r in requests]


@pytest.fixture(scope="module")
def alone(server):
    return {kind: answers(server.engine, [exact_request(PROMPT, NEW, kind)])[0] for kind in KINDS}


@pytest.mark.parametrize("copies", [4, 8])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k or "base")
def test_copies_of_one_request_answer_as_it_does_alone(server, alone, kind, copies):
    got = answers(server.engine, [exact_request(PROMPT, NEW, kind) for _ in range(copies)])
    assert got == [alone[kind]] * copies


def test_every_kind_beside_every_other(server, alone):
    kinds = KINDS + KINDS    # two of each, side by side, in one batch
    got = answers(server.engine, [exact_request(PROMPT, NEW, kind) for kind in kinds])
    assert got == [alone[kind] for kind in kinds]
    assert len({tuple(alone[kind]) for kind in KINDS}) == len(KINDS)   # each kind really changes the answer


@pytest.mark.parametrize("kind", ["", "lora", "dora"], ids=lambda k: k or "base")
def test_seeded_sampling_is_the_same_in_any_batch(server, kind):
    def seeded():
        return exact_request(PROMPT, NEW, kind, temperature=0.9, top_p=0.95, seed=1234)
    solo = answers(server.engine, [seeded()])[0]
    others = [exact_request(PROMPT, NEW, k) for k in KINDS]
    assert answers(server.engine, [seeded() for _ in range(4)] + others)[:4] == [solo] * 4


def test_preempted_sequences_answer_as_they_do_alone(root, alone):
    # a KV cache of about 80 rows for 16 sequences of 17: most of them are preempted, some several times
    small = ServerThread(kv_cache_mb=4, kv_block_size=8, max_batch_size=16, adapter_roots=str(root),
                         adapter_slots=len(KINDS), max_lora_rank=64)
    try:
        kinds = KINDS + KINDS
        got = answers(small.engine, [exact_request(PROMPT, NEW, kind) for kind in kinds])
        assert small.engine.scheduler.preemptions > 0
    finally:
        small.close()
    assert got == [alone[kind] for kind in kinds]
