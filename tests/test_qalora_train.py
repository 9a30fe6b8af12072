"""`loraplex train --kind qalora` on the embedded model's INT4 base: the files are PEFT's `use_qalora` layout,
a resumed run continues them, and a server on `--quant int4` with the same group size serves the adapter
unmerged and merged exactly (the method a merge naming none picks for it), both answering in the trained
JSON shape, with the same answers as the
oracle: the paper's definition, base(x) + s * B A pool(x), hooked onto HF's float model of our dequantized
INT4 base. Rule (greedy, 16 tokens): equal, or equal up to a first differing step where the oracle's top two
are within NEAR_TIE nats (float32 on both sides, the same products in another order)."""

import json
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dequantized import float_model_of
from loraplex.adapters import train
from loraplex.adapters.train_questions import QUESTIONS
from loraplex.clients.admin import AdapterAdmin
from loraplex.clients.client import Client
from loraplex.server.model.int4 import Int4Backend
from servers import ServerThread
from test_adapter_formats import qalora_direct
from test_int4 import float_answer
from test_merge_embedded import MESSAGES, NEAR_TIE, NEW

GROUP = 64


def agrees(ours: list[int], oracle: tuple[list[int], list[float]]) -> bool:
    tokens, gaps = oracle
    first = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), None)
    return first is None or gaps[first] < NEAR_TIE


def test_trained_qalora_serves_unmerged_and_merged_exactly_as_its_oracle(tmp_path, embedded_dir, monkeypatch):
    # a small fixed training set (what is checked is the kind's training, files and serving, not the set)
    answers = {q: "Blue." for q in QUESTIONS[:24]}
    monkeypatch.setattr(train, "_base_answers", lambda *args, **kwargs: answers)
    out = tmp_path / "root" / "qa"
    train.train(out, task="json", kind="qalora", steps=6, lr=3e-3, progress=False, group_size=GROUP)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["use_qalora"], config["qalora_group_size"], config["r"]) == (True, GROUP, 8)
    first = load_file(out / "adapter_model.safetensors")
    a = next(t for name, t in first.items() if name.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    assert a.shape == (8, 576 // GROUP)
    summary = train.train(out, steps=4, resume=True, progress=False)
    assert (summary["steps_total"], summary["kind"]) == (10, "qalora")
    assert any(not torch.equal(first[name], t) for name, t in load_file(out / "adapter_model.safetensors").items())

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
    oracle_model = qalora_direct(float_model_of(embedded_dir, Int4Backend(GROUP)), out, GROUP,
                                 pooled_times_groups=True)
    oracle = float_answer(oracle_model.eval(), ids, NEW)

    server = ServerThread(quant="int4", quant_group_size=GROUP, max_batch_size=4, kv_cache_mb=64,
                          adapter_roots=str(tmp_path / "root"), adapter_slots=2, warmup=False)
    try:
        client, admin, texts = Client(server.target), AdapterAdmin(server.target), {}

        def answer(adapter):
            out = client.generate(messages=MESSAGES, adapter_id=adapter, max_new_tokens=NEW, min_new_tokens=NEW,
                                  token_logprobs=True)
            assert len(out.tokens) == NEW
            texts[adapter] = texts.get(adapter, []) + [out.text]
            return [t.token_id for t in out.tokens]

        base, unmerged = answer(""), answer("qa")
        info = admin.merge("qa")                      # no method named: exact, for this adapter on this base
        merged = answer("qa")
        admin.unmerge()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=30).read()
    finally:
        server.close()
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in text_string_to_metric_families(scraped.decode()) for s in m.samples}
    assert any(name == "loraplex_model_info" and ("quantization", "int4") in labels and value == 1
               for (name, labels), value in metrics.items())
    assert metrics[("loraplex_adapter_merges_total",
                    (("method", "exact"), ("operation", "merge"), ("result", "ok")))] == 1
    assert (info.method, info.state) == ("EXACT", "MERGED") and abs(info.retained - 1) < 1e-3, info
    print(f"exact merge of the trained QA-LoRA adapter: {info.seconds:.3f} s, {info.size_bytes / 2**20:.1f} MiB")
    assert agrees(unmerged, oracle), (unmerged, oracle)
    assert agrees(merged, oracle), (merged, oracle)
    assert unmerged != base                            # the adapter changes the answer, to the trained shape
    assert all(text.startswith('{"answer": "') for text in texts["qa"]) and not texts[""][0].startswith("{")
