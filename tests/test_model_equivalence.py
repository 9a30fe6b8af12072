"""Our model and engine against HF transformers on the same NF4 weights (bitsandbytes), tiny random models."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from loraplex.server.build import build_engine
from loraplex.server.config import ServerConfig
from loraplex.server.engine.request import GenerationRequest, ResponseOptions, StoppingParams
from loraplex.server.model.context import StepContext
from loraplex.server.model.lm_head import OutputHead
from loraplex.server.model.loader import load_model
from servers import make_tiny_model

# Both sides run the same bitsandbytes kernels on the same packed weights; what differs is attention
# and accumulation order, so logits agree to float32 rounding.
LOGIT_ATOL = 2e-4

VARIANTS = {
    "llama-tied": dict(arch="llama"),
    "llama-untied": dict(arch="llama", tie_word_embeddings=False),
    "llama-attention-bias": dict(arch="llama", attention_bias=True, tie_word_embeddings=False),
    "qwen2-qkv-bias": dict(arch="qwen2"),
    "llama3-rope-scaling": dict(arch="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "mha-no-gqa": dict(arch="llama", num_key_value_heads=4),
}


def hf_nf4(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32).eval()


def attach_cache(model, rows=256):
    cfg = model.config
    for layer in model.model.layers:
        layer.self_attn.k_cache = torch.zeros(rows, cfg.num_kv_heads, cfg.head_dim)
        layer.self_attn.v_cache = torch.zeros(rows, cfg.num_kv_heads, cfg.head_dim)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    spec = dict(VARIANTS[request.param])
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), seed=1, **spec)
    return path


def prefill_logits(ours, hf):
    """(our logits, HF's) for one 37-token prompt prefilled at once."""
    attach_cache(ours)
    ids = torch.randint(3, 49152, (37,), generator=torch.Generator().manual_seed(0))
    n = len(ids)
    ctx = StepContext(True, torch.arange(n), torch.arange(n), cu_seqlens=[0, n], logits_index=torch.arange(n))
    with torch.inference_mode():
        return OutputHead(ours.lm_head.weight).logits(ours(ids, ctx)), hf(ids[None]).logits[0].float()


def test_prefill_logits_match_hf(variant):
    ours = load_model(variant, torch.device("cpu"), torch.float32)
    hf = hf_nf4(variant)
    got, want = prefill_logits(ours, hf)
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def run_engine(engine, prompts, max_new_tokens):
    """Submits all prompts at once; returns each request's token infos."""
    results = [[] for _ in prompts]
    finished = [threading.Event() for _ in prompts]

    def sink_for(i):
        def sink(out):
            results[i].extend(out.tokens)
            if out.finished:
                finished[i].set()
        return sink

    for i, prompt in enumerate(prompts):
        n = max_new_tokens[i]
        req = GenerationRequest(prompt=prompt, stopping=StoppingParams(max_new_tokens=n, min_new_tokens=n),
                                response=ResponseOptions(token_logprobs=True, top_n_tokens=3))
        engine.add_request(req, sink_for(i))
    assert all(event.wait(timeout=120) for event in finished)
    return results


def test_batched_decode_logprobs_match_hf(variant):
    """Every decode step of a mixed-length batch, checked against HF's log-softmax over the same tokens."""
    engine, _ = build_engine(ServerConfig(model=str(variant), kv_cache_mb=8, kv_block_size=4))
    engine.start()
    prompts = ["Hello there", "A much longer prompt that spans several blocks of the cache, surely", "x"]
    try:
        outputs = run_engine(engine, prompts, [6, 9, 4])
    finally:
        engine.stop()
    hf = hf_nf4(variant)
    for prompt, tokens in zip(prompts, outputs):
        prompt_ids = engine.tokenizer.encode(prompt)
        full = torch.tensor(prompt_ids + [t.token_id for t in tokens])
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf(full[None]).logits[0].float(), -1)
        for step, token in enumerate(tokens):
            row = logprobs[len(prompt_ids) - 1 + step]
            assert token.token_id == int(row.argmax()), f"step {step} of {prompt!r}"
            assert abs(token.logprob - float(row[token.token_id])) < 1e-3
            top_ids = [t[0] for t in token.top_tokens]
            assert top_ids == row.topk(3).indices.tolist()


def test_block_size_that_does_not_divide_the_width_is_refused_on_cpu(tiny_model_dir):
    from loraplex.server.model.nf4 import NF4Backend

    # the tiny model's hidden size is 64; bitsandbytes' CPU kernel needs whole blocks per row
    with pytest.raises(ValueError, match="quant_blocksize 128"):
        load_model(tiny_model_dir, torch.device("cpu"), torch.float32, NF4Backend(blocksize=128))
