"""The INT4 backend against its oracle, a plain float model whose weights are the backend's dequantized ones.

Two modes of the kernel (server/model/int4.py): "float32", torch's int4 kernel on float32 activations
(what a CPU without AVX512-BF16 runs; forced here by patching `kernel_dtype`), and "bf16", the kernel on
bfloat16 activations and scales with the zeros' part in float32 (what a float32 model runs on a CPU with
AVX512-BF16; on one without, it is float32 again). Per layer: the module against dequantize + float32
matmul, float32 within 1e-5 (accumulation order), bf16 within 1e-2 of the output's norm (measured 2.5e-3:
bfloat16 rounding of activations and of the kernel's output). Per model: logits against HF transformers'
float model carrying our dequantized weights within LOGIT_ATOL[mode], and the engine's per-step logprobs
within LOGPROB_ATOL[mode] of HF's, its greedy tokens equal to HF's or, in bf16 mode, differing at a first
step where HF's top two are within NEAR_TIE nats.
"""

import pytest
import torch
from transformers import LlamaConfig

from loraplex.server.build import build_engine
from loraplex.server.config import ServerConfig
from loraplex.server.model import layout
from loraplex.server.model.config import ModelConfig
from loraplex.adapters import merge
from loraplex.server.model import int4
from loraplex.server.model.int4 import Int4Backend, Int4Linear, dequantize, quantize_groups
from loraplex.server.model.loader import dense_weight, load_model
from loraplex.server.model.quant import make_backend
from dequantized import float_model_of
from servers import make_tiny_model
from test_model_equivalence import VARIANTS, prefill_logits, run_engine

CPU = torch.device("cpu")
LOGIT_ATOL = {"float32": 2e-4, "bf16": 2e-2}      # bf16 measured: 3e-3 on the tiny models
LOGPROB_ATOL = {"float32": 1e-3, "bf16": 2e-2}
NEAR_TIE = 0.1


def set_mode(mode: str, monkeypatch) -> str:
    if mode == "float32":
        monkeypatch.setattr(int4, "kernel_dtype", lambda dtype: dtype)
    return mode


@pytest.fixture(params=["float32", "bf16"])
def mode(request, monkeypatch):
    return set_mode(request.param, monkeypatch)


def random_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [40, 96])          # 40: not a multiple of the packing op's 16 rows
def test_kernel_computes_the_dequantized_weight(group_size, rows, mode):
    weight, bias = random_weight(rows, 512, group_size), torch.randn(rows) * 0.1
    module = Int4Backend(group_size).quantize(weight, bias, CPU, torch.float32)
    dense = module.dense_weight()
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(3))
    want = x @ dense.t() + bias
    if mode == "float32":
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)
    else:
        assert float((module(x) - want).norm() / want.norm()) < 1e-2


def test_the_convention_is_q_minus_8_times_scale_plus_zero():
    """A negative control: the kernel's output is far from the two other readings of scale and zero."""
    weight = random_weight(32, 128, 5)
    module = Int4Backend(64).quantize(weight, None, CPU, torch.float32)
    codes, scales, zeros = module.codes().float(), module.scales, module.zeros
    x = torch.randn(4, 128)
    got = module(x)
    for reading in (lambda q, s, z: (q - z) * s, lambda q, s, z: q * s + z):
        other = reading(codes.reshape(32, 2, 64), scales[..., None], zeros[..., None]).reshape(32, 128)
        assert (got - x @ other.t()).abs().max() > 1.0


def test_quantization_is_min_max_per_row_and_group():
    weight = random_weight(48, 256, 7)
    codes, scales, zeros = quantize_groups(weight, 64)
    dense = dequantize(codes, scales, zeros, 64)
    groups, dense_groups = weight.reshape(48, 4, 64), dense.reshape(48, 4, 64)
    torch.testing.assert_close(dense_groups.amin(-1), groups.amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(dense_groups.amax(-1), groups.amax(-1), rtol=0, atol=1e-6)
    assert ((dense_groups - groups).abs() <= scales[..., None] / 2 + 1e-6).all()
    assert int(codes.min()) == 0 and int(codes.max()) == 15


def test_codes_read_back_from_the_packed_buffer():
    weight = random_weight(40, 192, 11)
    module = Int4Backend(64).quantize(weight, None, CPU, torch.float32)
    assert torch.equal(module.codes(), quantize_groups(weight, 64, int4.kernel_dtype(torch.float32))[0])
    flat = Int4Backend(64).quantize(torch.zeros(16, 64), None, CPU, torch.float32)   # a flat group
    assert torch.equal(flat.dense_weight(), torch.zeros(16, 64)) and not flat(torch.ones(2, 64)).any()


def test_settings_that_cannot_fit_are_refused():
    model = ModelConfig.from_hf(LlamaConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=1, vocab_size=128))
    Int4Backend(64).validate(model, CPU)
    with pytest.raises(ValueError, match="quant_group_size 128 does not divide the layer width 64"):
        Int4Backend(128).validate(model, CPU)
    with pytest.raises(ValueError, match="quant_group_size must be one of 32, 64, 128, 256, got 48"):
        Int4Backend(48).validate(model, CPU)
    with pytest.raises(ValueError, match="int4 runs on the CPU only so far"):
        Int4Backend(64).validate(model, torch.device("cuda"))
    with pytest.raises(ValueError, match="quant_group_size must be 32, 64, 128 or 256"):
        ServerConfig(quant="int4", quant_group_size=100)
    with pytest.raises(ValueError, match="quant must be nf4 or int4"):
        ServerConfig(quant="int8")
    assert make_backend("int4", group_size=32).describe() == "int4 group 32"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    spec = dict(VARIANTS[request.param])
    return make_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), seed=1, **spec)


@pytest.mark.parametrize("group_size", [32, 64])
def test_prefill_logits_match_the_float_model_of_the_dequantized_weights(variant, group_size, mode):
    backend = Int4Backend(group_size)
    ours = load_model(variant, CPU, torch.float32, backend)
    assert any(isinstance(m, Int4Linear) for m in ours.modules())
    hf = float_model_of(variant, backend, ours)
    got, want = prefill_logits(ours, hf)
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL[mode], rtol=0)


def test_engine_decodes_as_the_float_model_of_the_dequantized_weights(variant, mode):
    engine, info = build_engine(ServerConfig(model=str(variant), quant="int4", quant_group_size=32,
                                             kv_cache_mb=8, kv_block_size=4))
    assert info.quantization == "int4"
    engine.start()
    prompts = ["Hello there", "A much longer prompt that spans several blocks of the cache, surely", "x"]
    try:
        outputs = run_engine(engine, prompts, [6, 9, 4])
    finally:
        engine.stop()
    hf = float_model_of(variant, Int4Backend(32))
    for prompt, tokens in zip(prompts, outputs):
        prompt_ids = engine.tokenizer.encode(prompt)
        full = torch.tensor(prompt_ids + [t.token_id for t in tokens])
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf(full[None]).logits[0].float(), -1)
        for step, token in enumerate(tokens):
            row = logprobs[len(prompt_ids) - 1 + step]
            top = row.topk(2).values
            if token.token_id != int(row.argmax()):
                assert mode == "bf16" and float(top[0] - top[1]) < NEAR_TIE, f"step {step} of {prompt!r}"
                break                      # a near-tie resolved the other way: later steps see other tokens
            assert abs(token.logprob - float(row[token.token_id])) < LOGPROB_ATOL[mode]


# ---- adapters merged into an int4 base ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def merge_adapters(tiny_model_dir, tmp_path_factory):
    from test_merge import _peft_adapter

    root = tmp_path_factory.mktemp("int4-merge")
    return {kind: _peft_adapter(tiny_model_dir, root / kind, kind == "dora", seed=21 + i)
            for i, kind in enumerate(("lora", "dora"))}


def peft_delta_weights(base_dir, backend, adapter_dir) -> dict:
    """(layer, target) -> PEFT's merged weight minus the base, on the float model of our dequantized base
    (DoRA's included: m (W + BA) / ||W + BA|| - W)."""
    from peft import PeftModel

    hf = float_model_of(base_dir, backend)
    base = {name: m.weight.detach().clone() for name, m in hf.named_modules() if name.endswith("_proj")}
    merged = PeftModel.from_pretrained(hf, adapter_dir).merge_and_unload()
    out = {}
    for name, module in merged.named_modules():
        if name in base and not torch.equal(module.weight, base[name]):
            out[(int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1])] = module.weight - base[name]
    return out


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_requantize_on_int4_is_min_max_of_peft_merged_weight(tiny_model_dir, merge_adapters, kind):
    kernel = int4.kernel_dtype(torch.float32)          # the scales are rounded to it
    """The merged codes, scales and zeros are those of quantizing (min-max per group) the dequantized base
    plus PEFT's merged delta (bit for bit for LoRA; DoRA: codes equal, scales and zeros to float32
    rounding); the base modules stay as they were, bit for bit."""
    from test_merge import MERGED_PATHS, Ours

    backend = Int4Backend(32)
    ours = Ours(tiny_model_dir, backend)
    before = {name: t.clone() for name, t in ours.model.state_dict().items()}
    merged = ours.merge(ours.read(merge_adapters[kind], kind), "requantize")
    deltas = peft_delta_weights(tiny_model_dir, backend, merge_adapters[kind])
    assert {(i, p) for i, p in merged.modules} == {(i, p) for i in range(2) for p in MERGED_PATHS}
    for (index, path), module in merged.modules.items():
        base = dense_weight(ours.model.model.layers[index].get_submodule(path).base, backend)
        inner = module.inner
        assert isinstance(inner, Int4Linear)          # int4 rows quantize alone: the parts share one module
        codes, scales, zeros = inner.codes(), inner.scales, inner.zeros
        for target, offset, size in layout.slices(ours.model.config, path):
            rows = slice(offset, offset + size)
            want = quantize_groups(base[rows] + deltas[(index, target)], 32, kernel)
            assert torch.equal(codes[rows], want[0]), (index, target)
            if kind == "lora":
                assert torch.equal(scales[rows], want[1]) and torch.equal(zeros[rows], want[2]), (index, target)
            else:      # DoRA's m (W + BA) / ||W + BA|| is computed in another order than PEFT's: last bits
                torch.testing.assert_close(scales[rows], want[1], rtol=1e-5, atol=1e-8)
                torch.testing.assert_close(zeros[rows], want[2], rtol=1e-5, atol=1e-7)
    merge.install(ours.model, merged)
    merge.uninstall(ours.model, merged.key)
    after = ours.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dense_merge_on_int4_equals_peft_unmerged(tiny_model_dir, merge_adapters, kind, monkeypatch):
    set_mode("float32", monkeypatch)     # the layers the adapter does not target stay int4: no bf16 rounding
    from peft import PeftModel
    from test_merge import KEY, Ours

    backend = Int4Backend(32)
    ours = Ours(tiny_model_dir, backend)
    merged = ours.merge(ours.read(merge_adapters[kind], kind), "dense")
    merge.install(ours.model, merged)
    ids = torch.randint(3, 49152, (23,), generator=torch.Generator().manual_seed(7))
    base = ours.logits(ids)
    ours.step.weight_set = KEY
    got = ours.logits(ids)
    with torch.inference_mode():
        want = PeftModel.from_pretrained(float_model_of(tiny_model_dir, backend),
                                         merge_adapters[kind]).eval()(ids[None]).logits[0].float()
    assert (want - base).abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---- the embedded model on int4 ---------------------------------------------------------------------------

def float_answer(model, ids, new: int):
    """Greedy tokens of an HF model and, per step, the gap between its top two log-probabilities."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gaps = [float(d[0] - d[1]) for d in (torch.log_softmax(s[0].float(), -1).topk(2).values for s in out.scores)]
    return out.sequences[0, len(ids):].tolist(), gaps


def test_embedded_model_on_int4_answers_as_its_float_oracle(embedded_dir, tmp_path):
    """Greedy, 16 tokens, base and a LoRA adapter (unmerged and merged dense): equal to HF (+ PEFT) on the
    float model of our dequantized weights, or equal up to a first differing step where the oracle's top two
    are within NEAR_TIE nats (both sides multiply float32 activations by the same weights, in another order)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapter_kinds
    from loraplex.clients.admin import AdapterAdmin
    from loraplex.clients.client import Client
    from servers import ServerThread
    from test_merge_embedded import MESSAGES, NEAR_TIE, NEW

    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32),
                   LoraConfig(r=16, lora_alpha=32, target_modules=adapter_kinds.ATTN + adapter_kinds.MLP,
                              init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
    oracle = float_model_of(embedded_dir, Int4Backend(64))
    want_base = float_answer(oracle, ids, NEW)
    want_lora = float_answer(PeftModel.from_pretrained(oracle, tmp_path / "lora").eval(), ids, NEW)
    server = ServerThread(quant="int4", quant_group_size=64, max_batch_size=4, kv_cache_mb=64,
                          adapter_roots=str(tmp_path), adapter_slots=2, warmup=False)
    try:
        client, admin = Client(server.target), AdapterAdmin(server.target)

        def answer(adapter):
            out = client.generate(messages=MESSAGES, adapter_id=adapter, max_new_tokens=NEW, min_new_tokens=NEW,
                                  token_logprobs=True)
            assert len(out.tokens) == NEW
            return [t.token_id for t in out.tokens]

        assert client.model_info().quantization == "int4"
        base, unmerged = answer(""), answer("lora")
        admin.merge("lora", "dense")
        dense = answer("lora")
        admin.unmerge()
    finally:
        server.close()
    for got, (tokens, gaps) in ((base, want_base), (unmerged, want_lora), (dense, want_lora)):
        first = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), None)
        assert first is None or gaps[first] < NEAR_TIE, (got, tokens, gaps)
    assert want_base[0] != want_lora[0]            # the adapter changes the answer
