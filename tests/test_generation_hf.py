"""Greedy generation through the gRPC server equals HF transformers `generate` on the same NF4 weights,
token for token, on the embedded SmolLM2-135M-Instruct: one at a time and in one continuous batch."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraplex.v1 import generation_pb2 as pb

MAX_NEW = 24
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter who",
    "List three colors:",
    "Q: What is 12 plus 30?\nA:",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
    "foods from carbon dioxide and water. In simple terms, explain why leaves are green and what",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name a prime number larger than ten."}],
]


@pytest.fixture(scope="module")
def hf_reference(embedded_dir):
    """HF greedy continuations (token ids, EOS included) for every prompt, one request at a time."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, quantization_config=quant, dtype=torch.float32)
    inputs = [tokenizer(p).input_ids for p in PROMPTS]
    inputs += [tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False).input_ids for c in CHATS]
    reference = []
    for ids in inputs:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        reference.append(out[0, len(ids):].tolist())
    return reference


def request(i: int) -> pb.GenerateRequest:
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=MAX_NEW),
                           response=pb.ResponseOptions(token_logprobs=True))
    if i < len(PROMPTS):
        return pb.GenerateRequest(text=PROMPTS[i], params=params)
    messages = [pb.ChatMessage(**m) for m in CHATS[i - len(PROMPTS)]]
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=messages), params=params)


def stream_ids(stub, i: int, first_token: threading.Event | None = None) -> list[int]:
    ids = []
    for chunk in stub.GenerateStream(request(i), timeout=300):
        ids += [t.token_id for t in chunk.tokens]
        if first_token is not None and ids:
            first_token.set()
    return ids


def test_one_at_a_time_equals_hf(embedded_server_thread, stub_for, hf_reference):
    stub = stub_for(embedded_server_thread.target)
    for i, want in enumerate(hf_reference):
        response = stub.Generate(request(i), timeout=300)
        assert [t.token_id for t in response.tokens] == want, f"prompt {i}"
        assert response.generated_token_count == len(want)


def test_continuous_batch_with_late_joiners_equals_hf(embedded_server_thread, stub_for, hf_reference):
    """Half the requests start together; the rest join while the first ones are mid-decode."""
    stub = stub_for(embedded_server_thread.target)
    n = len(hf_reference)
    results: dict[int, list[int]] = {}
    started = threading.Event()

    def run(i, signal=None):
        results[i] = stream_ids(stub, i, signal)

    first = [threading.Thread(target=run, args=(i, started if i == 0 else None)) for i in range(n // 2)]
    for t in first:
        t.start()
    assert started.wait(120)
    late = [threading.Thread(target=run, args=(i,)) for i in range(n // 2, n)]
    for t in late:
        t.start()
    for t in first + late:
        t.join(300)
    steps_with_joins = embedded_server_thread.engine.steps
    assert steps_with_joins > 0
    for i, want in enumerate(hf_reference):
        assert results[i] == want, f"prompt {i}"
