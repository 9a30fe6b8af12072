"""Adapters saved in bfloat16 or float16 stay in that dtype in host memory and in the CPU slots, and are
widened only inside the LoRA op (csrc/lora_cpu.cpp, csrc/lora_token_cpu.cpp). The oracles: the same factors widened to float32 first
(what PEFT does on load, `autocast_adapter_dtype`), which must give the same bits, and PEFT itself on the
whole server."""

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraplex.adapters import native, ops
from loraplex.adapters.canonical import Adapter, LoraModule
from loraplex.adapters.formats import read_adapter
from loraplex.adapters.segments import compute_segments
from loraplex.adapters.slots import SlotBuffers
from loraplex.server.model.config import ModelConfig
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

SHAPES = {"q_proj": (64, 64), "down_proj": (128, 64)}    # target -> (in, out)
MAX_RANK = 16
HALVES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]


@pytest.fixture(autouse=True)
def native_built():
    if not native.enabled():
        pytest.skip("native kernels turned off (LORAPLEX_NATIVE_KERNELS=0): 16-bit slots need them")
    assert native.available(), native.error()


def saved_16bit(rank: int, seed: int, dtype, scale: float) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {(layer, t): LoraModule(torch.randn(rank, i, generator=g).to(dtype),
                                      (torch.randn(o, rank, generator=g) / rank).to(dtype), b_scale=scale)
               for layer in range(2) for t, (i, o) in SHAPES.items()}
    return Adapter(adapter_id=f"h{seed}", modules=modules, alpha=scale * rank, source="test")


def widened(adapter: Adapter) -> Adapter:
    """The same adapter as the float32 reader would hold it: widened, scaling folded into b."""
    modules = {key: LoraModule(*m.factors()) for key, m in adapter.modules.items()}
    return Adapter(adapter_id=adapter.adapter_id, modules=modules, alpha=adapter.alpha, source="test")


def run_ops(buffers: SlotBuffers, layer: int, target: str, x, base, segments, impl=None):
    """out = base + each token's delta through the facade (or one implementation, on float32 stacks)."""
    y, out = torch.zeros(x.shape[0], MAX_RANK), base.clone()
    a, b, ranks = buffers.a[target][layer], buffers.b[target][layer], buffers.ranks[target][layer]
    if impl == "loop":
        ops.shrink_loop(x, a, segments, ranks.tolist(), y)
        ops.expand_loop(y, b, segments, ranks.tolist(), out)
        return out
    stored, b_scale = buffers.stored[target][layer], buffers.b_scale[target][layer]
    ops.lora_shrink(x, a, segments, ranks, y, stored)
    ops.lora_expand(y, b, segments, ranks, out, None, stored, b_scale)
    return out


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("lens", [[1] * 7, [3, 1, 5, 2, 1, 4, 2]], ids=["decode", "prefill"])
def test_16bit_slots_give_the_bits_of_the_widened_float32_slots(dtype, lens):
    adapters = [saved_16bit(8, 1, dtype, 2.0), saved_16bit(3, 2, dtype, 0.375), saved_16bit(16, 3, dtype, 1.0)]
    kept, wide = (SlotBuffers(4, MAX_RANK, 2, SHAPES, torch.float32, torch.device("cpu")) for _ in range(2))
    assert kept.keeps_16bit
    kept.write(0, widened(saved_16bit(16, 9, dtype, 5.0)))     # a float32 adapter first: its rows go stale
    for slot, adapter in enumerate(adapters):
        kept.write(slot, adapter)
        wide.write(slot, widened(adapter))
    assert kept.stored["q_proj"][:, :3].eq(1 if dtype == torch.bfloat16 else 2).all()
    assert kept.b_scale["down_proj"][0, :3].tolist() == [2.0, 0.375, 1.0]
    g = torch.Generator().manual_seed(0)
    segments = compute_segments([0, -1, 1, 2, 0, 3, 1], lens)     # slot 3 is empty, -1 is base-only
    for layer in range(2):
        for target, (i, o) in SHAPES.items():
            x, base = torch.randn(sum(lens), i, generator=g), torch.randn(sum(lens), o, generator=g)
            out = run_ops(kept, layer, target, x, base, segments)
            assert torch.equal(out, run_ops(wide, layer, target, x, base, segments))
            loop = run_ops(wide, layer, target, x, base, segments, impl="loop")   # torch's matmul
            rows = [t for s, e in zip(segments.starts, segments.ends) if e - s > 1 for t in range(s, e)]
            assert torch.equal(out[rows], loop[rows])      # multi-token segments make torch's BLAS call
            torch.testing.assert_close(out, loop, atol=1e-5, rtol=1e-5)   # one-token ones sum in their own order
            assert not torch.equal(out, base)


def test_a_float32_adapter_over_a_16bit_slot_is_read_as_float32():
    buffers = SlotBuffers(2, MAX_RANK, 2, SHAPES, torch.float32, torch.device("cpu"))
    buffers.write(1, saved_16bit(8, 4, torch.bfloat16, 2.0))
    float32 = widened(saved_16bit(4, 5, torch.bfloat16, 3.0))
    buffers.write(1, float32)
    assert buffers.stored["q_proj"][:, 1].tolist() == [0, 0] and buffers.b_scale["q_proj"][:, 1].tolist() == [1, 1]
    segments = compute_segments([1], [2])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    module = float32.modules[(0, "q_proj")]
    expected = (x @ module.a.T) @ module.b.T
    torch.testing.assert_close(run_ops(buffers, 0, "q_proj", x, torch.zeros(2, 64), segments), expected)


def test_bfloat16_stacks_widen_16bit_adapters_on_write():
    """Only float32 stacks on the CPU kernels keep 16-bit factors; other buffers hold the folded factors."""
    buffers = SlotBuffers(1, MAX_RANK, 2, SHAPES, torch.bfloat16, torch.device("cpu"))
    assert not buffers.keeps_16bit


def peft_adapter(base_dir, out, dtype, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(init_lora_weights=False, **config))
    for name, p in model.named_parameters():      # big enough deltas that the adapter changes the answer
        if p.requires_grad:
            p.data = (p.data * (1.3 if "magnitude" in name else 12)).to(dtype)
    model.save_pretrained(out)
    return out


KINDS = {"lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
         "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
         "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "gate_proj"])}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """Each kind saved in bfloat16 and float16, and the same factors widened to float32 (`<id>-f32`)."""
    root = tmp_path_factory.mktemp("adapters16")
    for seed, (kind, config) in enumerate(KINDS.items()):
        for name, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            peft_adapter(tiny_model_dir, root / f"{kind}-{name}", dtype, seed, **config)
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                              root / f"{kind}-{name}")      # widened to float32 on load
            assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
            model.save_pretrained(root / f"{kind}-{name}-f32")
    return root


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["bf16", "f16"])
def test_reader_keeps_16bit_factors_as_saved(root, tiny_model_dir, kind, name):
    config = ModelConfig.from_hf(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    kept = read_adapter(root / f"{kind}-{name}", "x", config, MAX_RANK, keep_16bit=True)
    wide = read_adapter(root / f"{kind}-{name}-f32", "x", config, MAX_RANK)
    assert kept.size_bytes * 2 == wide.size_bytes + sum(
        m.magnitude.nbytes for m in kept.modules.values() if m.magnitude is not None)
    for key, module in kept.modules.items():
        assert module.a.dtype == module.b.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}[name]
        a, b = module.factors()
        assert torch.equal(a, wide.modules[key].a) and torch.equal(b, wide.modules[key].b), key


def oracle_logprobs(tiny_model_dir, adapter_dir, ids):
    """PEFT on its own NF4 base, built fresh (see the numerics notes in the guide)."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_served_16bit_adapters_answer_as_their_float32_widening_and_as_peft(root, tiny_model_dir, stub_for):
    """One mixed batch of every adapter (16-bit and widened) and the base: each 16-bit adapter's tokens and
    logprobs are exactly its widened copy's, and each matches PEFT (greedy tokens equal, logprobs within
    2e-3, the rule of tests/test_adapters_engine.py); the host copy of a 16-bit adapter takes half the bytes."""
    ids = [f"{kind}-{name}{wide}" for kind in KINDS for name in ("bf16", "f16") for wide in ("", "-f32")] + [""]
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=16, adapter_roots=str(root),
                          adapter_slots=len(ids), max_lora_rank=MAX_RANK)
    results = {}
    try:
        stub = stub_for(server.target)
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=6, min_new_tokens=6),
                               response=pb.ResponseOptions(token_logprobs=True))

        def run(adapter_id):
            results[adapter_id] = stub.Generate(pb.GenerateRequest(text="The weather today is", adapter_id=adapter_id,
                                                                   params=params), timeout=120)

        threads = [threading.Thread(target=run, args=(i,)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sizes = {s.adapter_id: s.size_bytes for s in server.engine.adapters.catalog()}
    finally:
        server.close()
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)("The weather today is").input_ids
    answers = {i: [(t.token_id, t.logprob) for t in results[i].tokens] for i in ids}
    for adapter_id in ids[:-1:2]:
        assert answers[adapter_id] == answers[f"{adapter_id}-f32"], adapter_id      # bit for bit
        assert answers[adapter_id] != answers[""], adapter_id
        assert sizes[adapter_id] < 0.6 * sizes[f"{adapter_id}-f32"], (adapter_id, sizes)
        tokens = [token for token, _ in answers[adapter_id]]
        logprobs = oracle_logprobs(tiny_model_dir, root / adapter_id, prompt + tokens)
        for step, (token, logprob) in enumerate(answers[adapter_id]):
            row = logprobs[len(prompt) - 1 + step]
            assert token == int(row.argmax()), (adapter_id, step)
            assert abs(logprob - float(row[token])) < 2e-3, (adapter_id, step)
