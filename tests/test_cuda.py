"""The CUDA path on a real GPU: the Triton LoRA kernels against plain torch arithmetic (float64, written
here), and the engine on device=cuda against PEFT on the same bitsandbytes NF4 base on the same GPU.

Skipped without a CUDA device, and under Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 by
default; run with TRITON_INTERPRET=0 on a GPU machine):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py
"""

import math
import os
import threading

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET=0)")

CUDA = "cuda"


# ---- kernels -----------------------------------------------------------------------------------------------
def stacks(ranks: list[int], max_rank: int, n_in: int, n_out: int, dtype, gen):
    """Slot buffers whose entries past each slot's rank are NaN: a kernel that reads them poisons its result."""
    a = torch.full((len(ranks), max_rank, n_in), float("nan"))
    b = torch.full((len(ranks), n_out, max_rank), float("nan"))
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, n_in, generator=gen) / math.sqrt(n_in)
        b[s, :, :r] = torch.randn(n_out, r, generator=gen) / math.sqrt(max(r, 1))
    return a.to(dtype).to(CUDA), b.to(dtype).to(CUDA)


def plain_shrink(x, a, token_slots, ranks):
    """float64 [tokens, max_rank]: row t = A[s, :r] @ x[t] for its slot s, NaN where nothing is written."""
    y = torch.full((x.shape[0], a.shape[1]), float("nan"), dtype=torch.float64)
    for t, s in enumerate(token_slots):
        if s >= 0:
            r = ranks[s]
            y[t, :r] = a[s, :r].double().cpu() @ x[t].double().cpu()
    return y


def plain_expand(y, b, token_slots, ranks, base):
    """float64 base + B[s, :, :r] @ y[t, :r] per token."""
    out = base.double().cpu().clone()
    for t, s in enumerate(token_slots):
        if s >= 0:
            r = ranks[s]
            out[t] += b[s, :, :r].double().cpu() @ y[t, :r].double().cpu()
    return out


LAYOUTS = {  # name -> (slot per sequence, tokens per sequence); -1 = base only
    "decode-distinct": ([0, 1, 2, 3, -1, 4, 5, 6, 7, -1, 0, 3], [1] * 12),
    "decode-one-slot": ([3] * 16, [1] * 16),
    "decode-base-only": ([-1] * 5, [1] * 5),
    "prefill-mixed": ([2, -1, 0, 0, 7, 5, -1, 1], [5, 17, 1, 64, 33, 2, 9, 130]),
    "prefill-long": ([1, 6], [700, 300]),
}
RANK_SETS = {  # name -> (rank per slot, max_rank of the buffers)
    "mixed-64": ([4, 8, 16, 64, 1, 0, 32, 16], 64),
    "all-16": ([16] * 8, 16),
    "odd-max-24": ([24, 3, 24, 7, 0, 24, 12, 1], 24),
}
SHAPES = [(576, 960), (1536, 576), (100, 200)]   # (in, out): SmolLM2's qkv and down, and ragged edges
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (3e-3, 2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}x{o}" for i, o in SHAPES])
@pytest.mark.parametrize("rank_set", RANK_SETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_kernels_against_plain_torch(layout, rank_set, shape, dtype):
    from loraplex.adapters import triton_ops
    from loraplex.adapters.segments import compute_segments

    seq_slots, lens = LAYOUTS[layout]
    ranks, max_rank = RANK_SETS[rank_set]
    n_in, n_out = shape
    gen = torch.Generator().manual_seed(hash((layout, rank_set, shape)) % 2**31)
    a, b = stacks(ranks, max_rank, n_in, n_out, dtype, gen)
    segments = compute_segments(seq_slots, lens, CUDA)
    tokens = segments.num_tokens
    token_slots = segments.token_slots.tolist()
    x = torch.randn(tokens, n_in, generator=gen).to(dtype).to(CUDA)
    base = torch.randn(tokens, n_out, generator=gen).to(dtype).to(CUDA)
    ranks_dev = torch.tensor(ranks, device=CUDA)
    atol, rtol = TOL[dtype]

    y = torch.full((tokens, max_rank), float("nan"), dtype=dtype, device=CUDA)
    triton_ops.shrink(x, a, segments.token_slots, ranks_dev, y)
    torch.testing.assert_close(y.cpu().double(), plain_shrink(x, a, token_slots, ranks), atol=atol, rtol=rtol,
                               equal_nan=True)   # NaN exactly where nothing may be written

    out = base.clone()
    triton_ops.expand(y, b, segments.token_slots, ranks_dev, out)
    torch.testing.assert_close(out.cpu().double(), plain_expand(y, b, token_slots, ranks, base), atol=atol,
                               rtol=rtol)
    for t, s in enumerate(token_slots):
        if s < 0 or ranks[s] == 0:
            assert torch.equal(out[t], base[t])          # base-only and rank-0 rows untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_facade_on_cuda_adds_into_a_packed_column_slice(dtype):
    """ops.lora_shrink/lora_expand pick the kernels on CUDA and add into columns o:o+n of a packed output."""
    from loraplex.adapters import ops
    from loraplex.adapters.segments import compute_segments

    gen = torch.Generator().manual_seed(5)
    ranks, max_rank = RANK_SETS["mixed-64"]
    a, b = stacks(ranks, max_rank, 576, 192, dtype, gen)
    segments = compute_segments([0, -1, 3, 3, 6, 1], [3, 2, 1, 1, 4, 2], CUDA)
    x = torch.randn(segments.num_tokens, 576, generator=gen).to(dtype).to(CUDA)
    packed = torch.randn(segments.num_tokens, 960, generator=gen).to(dtype).to(CUDA)
    y = torch.zeros(segments.num_tokens, max_rank, dtype=dtype, device=CUDA)
    out = packed.clone()
    ranks_dev = torch.tensor(ranks, device=CUDA)
    assert ops._pick(segments, ranks_dev, x, 576) == "triton"
    ops.lora_shrink(x, a, segments, ranks_dev, y)
    ops.lora_expand(y, b, segments, ranks_dev, out, out_slice=(576, 192))
    token_slots = segments.token_slots.tolist()
    want = plain_expand(y, b, token_slots, ranks, packed[:, 576:768])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out[:, 576:768].cpu().double(), want, atol=atol, rtol=rtol)
    assert torch.equal(out[:, :576], packed[:, :576]) and torch.equal(out[:, 768:], packed[:, 768:])


MODULES = {"qkv": (576, [576, 192, 192]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}  # SmolLM2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("layout", ["decode-distinct", "decode-one-slot", "prefill-mixed"])
def test_fused_kernel_equals_two_kernels_and_plain_torch(layout, module, dtype):
    """One launch for all targets of a packed module: the same bits as shrink + expand per target, and
    plain float64 arithmetic on the same (rounded) shrink within the dtype's tolerance."""
    from loraplex.adapters import ops, triton_ops
    from loraplex.adapters.segments import compute_segments

    n_in, outs = MODULES[module]
    ranks, max_rank = RANK_SETS["mixed-64"]
    gen = torch.Generator().manual_seed(len(layout) * 7 + len(module))
    targets, offset = [], 0
    for n in outs:
        a, b = stacks(ranks, max_rank, n_in, n, dtype, gen)
        targets.append((a, b, torch.tensor(ranks, device=CUDA), offset, n))
        offset += n
    segments = compute_segments(*LAYOUTS[layout], CUDA)
    token_slots = segments.token_slots.tolist()
    x = torch.randn(segments.num_tokens, n_in, generator=gen).to(dtype).to(CUDA)
    base = torch.randn(segments.num_tokens, offset, generator=gen).to(dtype).to(CUDA)
    args = triton_ops.fused_args(targets)
    assert args is not None
    fused = ops.lora_apply(x, targets, segments, base.clone(), args)
    two = ops.lora_apply(x, targets, segments, base.clone())          # no fused args: two kernels per target
    assert torch.equal(fused, two)
    atol, rtol = TOL[dtype]
    for a, b, r, o, n in targets:
        y = plain_shrink(x, a, token_slots, ranks).to(dtype).double()   # the shrink rounded to the dtype
        want = plain_expand(torch.nan_to_num(y), b, token_slots, ranks, base[:, o:o + n])
        torch.testing.assert_close(fused[:, o:o + n].cpu().double(), want, atol=atol, rtol=rtol)


def test_slot_buffers_on_cuda_hold_each_adapter_and_mirror_ranks():
    from loraplex.adapters.canonical import Adapter, LoraModule
    from loraplex.adapters.slots import SlotBuffers

    gen = torch.Generator().manual_seed(3)

    def adapter(rank, targets):
        modules = {(layer, t): LoraModule(torch.randn(rank, 8, generator=gen), torch.randn(16, rank, generator=gen))
                   for layer in range(2) for t in targets}
        return Adapter(adapter_id=f"r{rank}", modules=modules, alpha=float(rank), source="test")

    buffers = SlotBuffers(2, 8, 2, {"q_proj": (8, 16), "down_proj": (8, 16)}, torch.float32, torch.device(CUDA))
    big, small = adapter(8, ("q_proj", "down_proj")), adapter(2, ("q_proj",))
    buffers.write(1, big)
    buffers.write(1, small)
    torch.cuda.synchronize()
    for target in ("q_proj", "down_proj"):
        assert buffers.device_ranks[target].is_cuda
        assert torch.equal(buffers.device_ranks[target].cpu(), buffers.ranks[target])
    assert buffers.ranks["q_proj"][:, 1].tolist() == [2, 2] and buffers.ranks["down_proj"][:, 1].tolist() == [0, 0]
    for (layer, t), m in small.modules.items():
        torch.testing.assert_close(buffers.a[t][layer, 1, :2].cpu(), m.a)
        torch.testing.assert_close(buffers.b[t][layer, 1, :, :2].cpu(), m.b)
    buffers.clear(1)
    torch.cuda.synchronize()
    assert int(buffers.device_ranks["q_proj"].sum()) == 0


# ---- the engine on CUDA against PEFT -----------------------------------------------------------------------
ADAPTERS = {  # id -> (rank, alpha, targets)
    "small": (4, 8, ["q_proj", "v_proj"]),
    "all": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "team/big": (64, 128, ["k_proj", "up_proj", "down_proj"]),
    "mlp": (8, 16, ["gate_proj", "down_proj"]),
}
MIXED = ["small", "", "all", "team/big", "small", "", "mlp", "all"]
NEW = 8
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cuda-adapters")
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        for p in model.parameters():      # big enough deltas that a wrong adapter changes the answer
            if p.requires_grad:
                p.data *= 20
        model.save_pretrained(root / name)
    return root


def peft_on_cuda(model_dir, root, adapter_id, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0})
    if adapter_id:
        model = PeftModel.from_pretrained(model, root / adapter_id)
    return model.eval()


def ours_mixed_batch(model_dir, root, dtype_name, fused, mixed=MIXED, slots=4):
    """Every request of `mixed` submitted at once to one engine on CUDA; the greedy token ids of each."""
    from loraplex.server.build import launch_engine
    from loraplex.server.config import ServerConfig
    from loraplex.server.engine.request import GenerationRequest, StoppingParams

    engine, desc = launch_engine(ServerConfig(model=str(model_dir), device=CUDA, dtype=dtype_name,
                                              kv_cache_mb=16, max_batch_size=16, adapter_roots=str(root),
                                              adapter_slots=slots, max_lora_rank=64, lora_fused=fused))
    assert desc.device.startswith(CUDA) and desc.dtype == dtype_name
    assert engine.runner.lora_step.buffers.a["q_proj"].device.type == CUDA
    from loraplex.adapters.fused_layer import FusedLoraLinear
    layers = [m for m in engine.runner.model.modules() if type(m).__name__.endswith("LoraLinear")]
    assert layers and all(isinstance(m, FusedLoraLinear) == fused for m in layers)
    try:
        errors, left, done = [], [len(mixed)], threading.Event()

        def sink(out):
            if out.error is not None:
                errors.append(out.error)
            if out.finished:
                left[0] -= 1
                if not left[0]:
                    done.set()

        # greedy without logprobs: the engine's screened exact argmax (lm_head.py), as a client gets it
        seqs = [engine.add_request(GenerationRequest(prompt=PROMPT, adapter_id=adapter_id, stopping=StoppingParams(
            max_new_tokens=NEW, min_new_tokens=NEW)), sink) for adapter_id in mixed]
        assert done.wait(300) and not errors, errors
        return [list(seq.output_ids) for seq in seqs]
    finally:
        engine.stop()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-kernels"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_engine_on_cuda_mixed_batch_equals_peft(tiny_model_dir, root, dtype_name, fused):
    """A mixed batch (base + 4 adapters, two of them twice) on the engine on CUDA: each request's greedy
    tokens equal PEFT's `generate` with that adapter alone on the HF NF4 base on the same GPU, and the
    teacher-forced PEFT forward over prompt + our tokens picks each of our tokens as its argmax.

    float32 compute on both sides is asserted token for token. bfloat16 rounds differently in the two
    implementations (packed q|k|v matmuls, fused LoRA kernels), so there only the first token must match
    and every token must be within 0.05 (log-probability) of PEFT's best choice. Both LoRA paths on CUDA:
    one fused launch per packed module (the default) and two kernels per target (lora_fused=False)."""
    from transformers import AutoTokenizer

    dtype = getattr(torch, dtype_name)
    ours = ours_mixed_batch(tiny_model_dir, root, dtype_name, fused)
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    ids = torch.tensor([prompt], device=CUDA)
    answers = {}
    for adapter_id in dict.fromkeys(MIXED):
        model = peft_on_cuda(tiny_model_dir, root, adapter_id, dtype)
        with torch.inference_mode():
            peft_tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                         min_new_tokens=NEW, do_sample=False, temperature=None, top_p=None,
                                         top_k=None, pad_token_id=0)[0, len(prompt):].tolist()
        mine = [ours[i] for i, a in enumerate(MIXED) if a == adapter_id]
        assert all(m == mine[0] for m in mine), (adapter_id, mine)      # same adapter, same answer
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + mine[0]], device=CUDA)).logits[0].float(), -1)
        rows = logprobs[len(prompt) - 1:len(prompt) - 1 + NEW]
        gaps = [float(row.max() - row[t]) for row, t in zip(rows, mine[0])]
        if dtype == torch.float32:
            assert mine[0] == peft_tokens, (adapter_id, mine[0], peft_tokens)
            assert max(gaps) == 0.0, (adapter_id, gaps)
        else:
            assert mine[0][0] == peft_tokens[0], (adapter_id, mine[0], peft_tokens)
            assert max(gaps) < 0.05, (adapter_id, gaps)
        answers[adapter_id] = tuple(mine[0])
        del model
        torch.cuda.empty_cache()
    assert len(set(answers.values())) == len(answers)     # every adapter (and the base) answers differently


@pytest.fixture(scope="module")
def kinds_root(tmp_path_factory, tiny_model_dir):
    import adapter_kinds

    root = tmp_path_factory.mktemp("cuda-kinds")
    adapter_kinds.make_all(tiny_model_dir, root, factor=20.0)
    return root


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-kernels"])
def test_every_adapter_kind_on_cuda_equals_peft(tiny_model_dir, kinds_root, fused):
    """LoRA, QLoRA, rsLoRA, rank/alpha patterns, DoRA and AdaLoRA adapters and the base in one float32 batch
    on CUDA: each request's greedy tokens equal PEFT's `generate` with that adapter alone on the same NF4
    base on the same GPU (DoRA's output scales run on the device, after either LoRA path)."""
    import adapter_kinds
    from transformers import AutoTokenizer

    mixed = [*adapter_kinds.KINDS, "", "dora"]
    ours = ours_mixed_batch(tiny_model_dir, kinds_root, "float32", fused, mixed, slots=len(adapter_kinds.KINDS))
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT).input_ids
    ids = torch.tensor([prompt], device=CUDA)
    answers = {}
    for adapter_id in dict.fromkeys(mixed):
        model = peft_on_cuda(tiny_model_dir, kinds_root, adapter_id, torch.float32)
        with torch.inference_mode():
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        mine = [ours[i] for i, a in enumerate(mixed) if a == adapter_id]
        assert all(m == want for m in mine), (adapter_id or "base", mine, want)
        answers[adapter_id] = tuple(want)
        del model
        torch.cuda.empty_cache()
    assert len(set(answers.values())) == len(answers)
