"""Eight PEFT LoRA adapters of ranks 4-64, different alphas and target sets, and one adapter of every other
kind (QLoRA, rsLoRA, rank/alpha patterns, DoRA, AdaLoRA) on the embedded SmolLM2: one mixed batch (with
base-only requests) through the server gives each request the greedy tokens of PEFT with that adapter alone
on the same NF4 base, by the near-tie rule (adapter_kinds.agrees: equal, or a first difference where PEFT's
top two are within 0.1 nats; our decode attention sums in another order than HF's, and bitsandbytes rounds
activations to bfloat16, so a last-bit difference may flip such a step)."""

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import adapter_kinds
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # id -> (rank, alpha, targets)
    "r4-qv": (4, 8, ["q_proj", "v_proj"]),
    "r8-attn": (8, 16, ATTN),
    "r16-all": (16, 16, ATTN + MLP),
    "r16-mlp": (16, 32, MLP),
    "r32-all": (32, 16, ATTN + MLP),
    "r32-ko": (32, 64, ["k_proj", "o_proj"]),
    "r64-all": (64, 32, ATTN + MLP),
    "r64-down": (64, 128, ["down_proj", "up_proj"]),
}
KINDS = ["qlora", "rslora", "patterns", "dora", "adalora"]
PROMPT = [{"role": "user", "content": "Name three things that are blue."}]
NEW = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("embedded-adapters")
    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                init_lora_weights=False))
        model.save_pretrained(root / name)
        base = model.unload()          # the plain base back, for the next adapter
    for kind in KINDS:
        adapter_kinds.KINDS[kind](embedded_dir, root / kind, factor=0.5)
    return root


def test_all_kinds_in_one_batch_equal_peft(embedded_dir, root, stub_for):
    server = ServerThread(max_batch_size=16, kv_cache_mb=64, adapter_roots=str(root), adapter_slots=16)
    try:
        stub = stub_for(server.target)
        ids = list(ADAPTERS) + KINDS + ["", ""]
        results = {}

        def run(i):
            req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in PROMPT]),
                                     adapter_id=ids[i], params=pb.Parameters(
                                         stopping=pb.StoppingCriteria(max_new_tokens=NEW, min_new_tokens=NEW),
                                         response=pb.ResponseOptions(token_logprobs=True)))
            results[i] = [t.token_id for t in stub.Generate(req, timeout=300).tokens]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        server.close()
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompt = tokenizer(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    want = {a: adapter_kinds.peft_greedy_scored(embedded_dir, root / a if a else None, prompt, NEW)
            for a in set(ids)}
    for i, adapter_id in enumerate(ids):
        assert adapter_kinds.agrees(results[i], want[adapter_id]), (adapter_id or "base", results[i], want[adapter_id])
    base = results[len(ids) - 1]
    for i, adapter_id in enumerate(ids[:-2]):
        assert results[i] != base, f"{adapter_id} changes the answer"
