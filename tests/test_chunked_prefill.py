"""Chunked prefill (--prefill-chunk-tokens): prompts longer than a chunk, fed in pieces beside running decodes,
answer as HF transformers and PEFT do on the same NF4 weights, and exactly as they do alone; no running
stream waits for a prefill; a step never feeds more prompt tokens than the budget; sequences preempted
in the middle of their prompt answer as they do alone.

Oracle rule for HF and PEFT: equal greedy tokens, or a first difference at a step where the oracle's top two
log-probabilities are within adapter_kinds.NEAR_TIE nats (a later piece attends to the cached start of its prompt, which
sums the same products in another order than one whole prefill). Against the request alone: exact tokens
and float32 logprobs."""

import queue
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from adapter_kinds import agrees
from engine_calls import exact_request, run_together, tokens_and_logprobs
from servers import ServerThread

CHUNK = 32
NEW = 16
STORY = ("The lighthouse keeper climbed the stairs every evening to light the lamp. Ships passed the rocky "
         "coast at night, and the sailors trusted the beam to guide them home. One winter the storms grew "
         "stronger than anyone remembered, and the waves reached the windows of the tower. ")
QUESTIONS = ["What did the keeper do every evening?", "Why did the sailors trust the beam?",
             "Summarize the story in one sentence:"]
LONG = [STORY * 2 + QUESTIONS[0], STORY * 3 + QUESTIONS[1], "Notes: " + STORY * 2 + QUESTIONS[2]]   # 110-170 tokens
MEDIUM = [STORY + q for q in QUESTIONS]                                                             # 60-65 tokens
SHORT = ["The capital of France is", "List three colors:", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("chunk-adapters")
    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(root / "r8")
    return root


@pytest.fixture(scope="module")
def server(root):
    server = ServerThread(kv_cache_mb=64, max_batch_size=16, adapter_roots=str(root), adapter_slots=2,
                          prefill_chunk_tokens=CHUNK, warmup=False)
    yield server
    server.close()


def oracle(embedded_dir, root, prompt: str, adapter: str) -> tuple[list[int], list[float]]:
    """HF's (PEFT's with an adapter) greedy tokens on a fresh NF4 base, and each step's top-two gap."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, quantization_config=quant, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, root / adapter)
    ids = tokenizer(prompt).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gaps = [float(s[0].float().log_softmax(-1).topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), gaps


def joining_running_decodes(engine, late: list, new_running: int = 48) -> dict:
    """The late requests added once the running ones have their first token; every request's outputs."""
    running = [exact_request(p, new_running) for p in SHORT]
    started, outputs = threading.Event(), {r.request_id: queue.Queue() for r in running}
    for r in running:
        engine.add_request(r, lambda out, q=outputs[r.request_id]: (q.put(out), out.tokens and started.set()))
    assert started.wait(120)
    late_outputs = run_together(engine, late)
    for r in running:
        while not outputs[r.request_id].get(timeout=120).finished:
            pass
    return late_outputs


def test_long_prompts_joining_running_decodes_answer_as_hf_peft_and_alone(server, embedded_dir, root):
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    assert all(len(tokenizer(p).input_ids) > 2 * CHUNK for p in LONG)
    cases = [(p, "") for p in LONG] + [(LONG[1], "r8")]
    late = [exact_request(p, NEW, adapter) for p, adapter in cases]
    busy = joining_running_decodes(server.engine, late)
    for (prompt, adapter), request in zip(cases, late):
        got = tokens_and_logprobs(busy[request.request_id])
        alone = tokens_and_logprobs(run_together(server.engine, [exact_request(prompt, NEW, adapter)]).popitem()[1])
        assert got == alone, (prompt[-40:], adapter)
        want = oracle(embedded_dir, root, prompt, adapter)
        assert agrees([t for t, _ in got], want), (prompt[-40:], adapter, got, want)


def steps_of_each_token(engine, late) -> tuple[dict, list]:
    """For the running requests and the late ones: the engine step of each token; and every step's batch
    (decodes, prompt tokens fed)."""
    steps, batches, step = {}, [], engine.runner.step

    def recording(batch, eos_ids):
        fed = sum(batch.feeds(i) for i in range(batch.num_decodes, len(batch.seqs)))
        batches.append((batch.num_decodes, fed))
        return step(batch, eos_ids)
    engine.runner.step = recording
    try:
        running = [exact_request(p, 40) for p in SHORT]
        outputs = {r.request_id: queue.Queue() for r in running + late}
        started = threading.Event()
        for r in running:
            engine.add_request(r, lambda out, q=outputs[r.request_id]: (q.put((engine.steps, out)),
                                                                        out.tokens and started.set()))
        assert started.wait(60)
        engine.between_steps(lambda: [engine.add_request(r, lambda out, q=outputs[r.request_id]: q.put(
            (engine.steps, out))) for r in late])
        for r in running + late:
            steps[r.request_id] = []
            while True:
                at, out = outputs[r.request_id].get(timeout=60)
                steps[r.request_id] += [at] * len(out.tokens)
                if out.finished:
                    break
    finally:
        engine.runner.step = step
    return {r.request_id: steps[r.request_id] for r in running}, batches


@pytest.mark.parametrize("chunk", [CHUNK, 0])
def test_no_running_stream_waits_for_a_prefill_and_the_budget_holds(tiny_model_dir, chunk):
    """With chunks, each running stream gets a token in every step while long prompts are fed; without
    (the negative control), the prompts' prefill steps leave gaps."""
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=16, prefill_chunk_tokens=chunk,
                          warmup=False)
    try:
        late = [exact_request(p * 3, 4) for p in LONG]
        running, batches = steps_of_each_token(server.engine, late)
    finally:
        server.close()
    gaps = [b - a for steps in running.values() for a, b in zip(steps, steps[1:]) if b - a > 1]
    if chunk:
        assert gaps == [] and all(fed <= chunk for _, fed in batches), (gaps, batches)
        assert sum(1 for decodes, fed in batches if decodes and fed) >= 3 * len(LONG)   # pieces beside decodes
    else:
        assert gaps and any(fed > CHUNK for _, fed in batches)


def test_sequences_preempted_in_their_prompt_answer_as_they_do_alone(root):
    # KV rows for two prompts and a few tokens more, and pieces of 4 tokens: while the second prompt is fed,
    # the first one's decoding needs its rows, and the second (the newest) is preempted mid-prompt, its
    # pieces fed again later (measured: 3 such preemptions)
    small = ServerThread(kv_cache_mb=11, kv_block_size=2, max_batch_size=8, adapter_roots=str(root),
                         adapter_slots=2, prefill_chunk_tokens=4, warmup=False)
    try:
        cases = [(LONG[0], ""), (LONG[2], "r8"), (LONG[0], "r8"), (LONG[2], "")]
        alone = [tokens_and_logprobs(run_together(small.engine, [exact_request(p, 40, a)]).popitem()[1])
                 for p, a in cases]
        preempted, preempt = [], small.engine.scheduler._preempt
        small.engine.scheduler._preempt = lambda seq: (preempted.append(seq.prefilling), preempt(seq))
        together = [exact_request(p, 40, a) for p, a in cases]
        outputs = run_together(small.engine, together)
    finally:
        small.close()
    assert any(preempted), preempted
    assert [tokens_and_logprobs(outputs[r.request_id]) for r in together] == alone


def test_max_step_tokens_holds_with_decodes_counted(tiny_model_dir):
    """--max-step-tokens: no step computes more than that many tokens, its decodes included, unless it feeds a
    single piece; running streams still get a token in every step."""
    chunk, total = 8, 20
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=16, prefill_chunk_tokens=chunk,
                          max_step_tokens=total, warmup=False)
    try:
        running, batches = steps_of_each_token(server.engine, [exact_request(p, 4) for p in LONG])
    finally:
        server.close()
    gaps = [b - a for steps in running.values() for a, b in zip(steps, steps[1:]) if b - a > 1]
    assert gaps == []
    over = [(decodes, fed) for decodes, fed in batches if decodes + fed > total and fed > chunk]
    assert over == [] and any(decodes and fed > chunk for decodes, fed in batches), batches   # several pieces too
