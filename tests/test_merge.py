"""Merged adapter weights (adapters/merge.py) against PEFT and HF transformers + bitsandbytes (the oracles),
on a tiny random Llama with an NF4 base (block 64, no double quant), float32 compute dtype, on the CPU.

- requantize: the merged modules' 4-bit codes and block scales are, byte for byte, those of PEFT's
  `merge_and_unload` on HF's bitsandbytes base (LoRA and DoRA), and their dense weight is bitsandbytes'
  dequantization of PEFT's merged weight;
- dense: a step on the merged weight set (no LoRA work) gives the logits of PEFT's unmerged adapter on the
  NF4 base, and of our own unmerged LoRA path;
- retained: the report's <deq(Q(W + delta)) - deq(Q(W)), delta> / ||delta||^2 (overall and per layer) is
  the one PEFT's merged bytes give; a small delta is mostly rounded away (while the norm ratio stays ~0.4,
  see that test), a big one mostly kept; a dense merge keeps all of it;
- install / uninstall never touch the base modules.

Three modes of our NF4 backend: "plain", bitsandbytes' Linear4bit itself (what CUDA runs), "native", our
NF4 kernel for CPUs without AVX512-BF16 (nf4_native.NativeNF4Linear, the same dequantized weight as plain),
and "fused", the fused AVX512-BF16 CPU kernel (nf4_cpu.FusedNF4Linear), whose block
scales are bfloat16. In fused mode our base multiplies by NF4 code x bf16(absmax), while PEFT's merge on a
freshly loaded HF model dequantizes with the float32 absmax, so the two merges start from bases that differ
by that rounding (measured here: ~0.1% of the merged codes and a few block scales then differ by one step).
The fused comparison therefore gives PEFT the base the fused kernel multiplies by (its absmax rounded to
bf16, checked equal to our base first) and compares with bitsandbytes' own CPU repacking of PEFT's result.
"""

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import adapter_kinds
from loraplex.adapters import merge
from loraplex.adapters.formats import bind, read_adapter
from loraplex.adapters.lora_layer import LoraLinear, LoraStep, attach_lora, base_weights
from loraplex.adapters.segments import compute_segments
from loraplex.adapters.slots import SlotBuffers
from loraplex.adapters import native
from loraplex.server.model import layout, nf4_cpu, nf4_native
from loraplex.server.model.context import StepContext
from loraplex.server.model.lm_head import OutputHead
from loraplex.server.model.loader import StackedLinear, dense_weight, load_model
from loraplex.server.model.nf4 import NF4Backend
from loraplex.server.model.row_padding import RowPadded

CPU = torch.device("cpu")
BLOCK = 64
RANK = 8
# q|k|v and gate|up: every part of both stacked modules; o_proj and down_proj stay the base's.
TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
MERGED_PATHS = ("self_attn.qkv_proj", "mlp.gate_up_proj")
KEY = ("a", 1)
# Logits (max |logit| ~0.8, the adapters move them by ~1.2) of our merged weight set against PEFT's unmerged
# adapter on the NF4 base and against our own unmerged LoRA path. plain: every side multiplies float32
# activations by the same dequantized weights (merged: one (W + delta) x; unmerged: W x + B (A x)), so only
# float32 rounding and summation order differ: measured max |diff| 5e-7 (LoRA), 8e-7 (DoRA); 1e-5 leaves
# a margin of ~12x. fused: the unmerged base (PEFT's and ours) runs bitsandbytes' fused kernel on bf16-rounded
# activations, the merged modules multiply float32 ones: measured 4e-3 (LoRA), 6e-3 (DoRA); 2e-2 allowed.
LOGIT_ATOL = {"plain": 1e-5, "native": 1e-5, "fused": 2e-2}


def set_mode(mode: str, monkeypatch) -> str:
    if mode in ("plain", "native"):
        # As on a CPU without AVX512-BF16: our backend makes Linear4bit itself (plain) or our kernel's
        # module (native), and no Linear4bit (ours or HF's) repacks itself for the fused kernel at its first
        # forward.
        monkeypatch.setattr(nf4_cpu, "available", lambda layer: False)
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
        if mode == "plain":
            monkeypatch.setattr(nf4_native, "available", lambda layer: False)
        elif not native.available():
            pytest.skip("native kernels unavailable")
    elif not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: no fused kernel")
    return mode


@pytest.fixture(params=["plain", "native", "fused"])
def mode(request, monkeypatch):
    return set_mode(request.param, monkeypatch)


def _peft_adapter(base_dir, out, use_dora: bool, seed: int, delta_ratio: float | None = None):
    """A PEFT LoRA (or DoRA) adapter with random nonzero factors on TARGETS. delta_ratio: lora_B scaled
    per module so that std(B A * scaling) = delta_ratio * std(W)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora,
                                      init_lora_weights=False))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                if delta_ratio is not None:
                    wanted = delta_ratio * module.base_layer.weight.std()
                    module.lora_B["default"].weight *= wanted / module.get_delta_weight("default").std()
                if use_dora:   # move m away from ||W + BA||, so the DoRA scale is not ~1
                    m = module.lora_magnitude_vector["default"].weight
                    m *= 1 + 0.3 * torch.randn_like(m)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        "lora": _peft_adapter(tiny_model_dir, root / "lora", False, seed=11),
        "dora": _peft_adapter(tiny_model_dir, root / "dora", True, seed=12),
        "small": _peft_adapter(tiny_model_dir, root / "small", False, seed=13, delta_ratio=0.01),
        "big": _peft_adapter(tiny_model_dir, root / "big", False, seed=14, delta_ratio=0.2),
    }


class Ours:
    """Our model as the server builds it with adapters (server/build.py `_adapters`)."""

    def __init__(self, base_dir, backend=None):
        self.backend = NF4Backend(blocksize=BLOCK) if backend is None else backend
        self.model = load_model(base_dir, CPU, torch.float32, self.backend)
        cfg = self.model.config
        shapes = {t: layout.in_out_features(cfg, t) for t in layout.TARGETS}
        self.step = LoraStep(SlotBuffers(2, RANK, cfg.num_layers, shapes, torch.float32, CPU))
        attach_lora(self.model, self.step)
        for layer in self.model.model.layers:
            layer.self_attn.k_cache = torch.zeros(64, cfg.num_kv_heads, cfg.head_dim)
            layer.self_attn.v_cache = torch.zeros(64, cfg.num_kv_heads, cfg.head_dim)

    def read(self, adapter_dir, adapter_id: str):
        return bind(read_adapter(adapter_dir, adapter_id, self.model.config, max_rank=RANK),
                    base_weights(self.model, self.backend))

    def merge(self, adapter, method: str, key=KEY):
        return merge.merge_into_copy(self.model, adapter, key, method, self.backend, torch.float32)

    def loras(self):
        return [(i, path, layer.get_submodule(path)) for i, layer in enumerate(self.model.model.layers)
                for path in layout.PACKED]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(ids)
        ctx = StepContext(True, torch.arange(n), torch.arange(n), cu_seqlens=[0, n], logits_index=torch.arange(n))
        with torch.inference_mode():
            return OutputHead(self.model.lm_head.weight).logits(self.model(ids, ctx))


def hf_nf4(base_dir, mode: str):
    """A fresh HF transformers model on bitsandbytes NF4 (never reused: on an AVX512-BF16 CPU a
    Linear4bit repacks its bytes at its first forward)."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            assert (state.blocksize, state.quant_type, state.nested) == (BLOCK, "nf4", False)
            assert module.support_avx512bf16_for_cpu == (mode == "fused")
    return model


def hf_linear(model, layer: int, path: str, target: str):
    return model.model.layers[layer].get_submodule(f"{path.rpartition('.')[0]}.{target}")


def bf16_scales(state):
    """A copy of a quant state with the block scales the fused CPU kernel multiplies by."""
    state = copy.copy(state)
    state.absmax = state.absmax.to(torch.bfloat16).float()
    return state


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_requantize_is_peft_merge_and_unload_byte_for_byte(kind, mode, tiny_model_dir, adapters):
    ours = Ours(tiny_model_dir)
    merged = ours.merge(ours.read(adapters[kind], kind), "requantize")
    layers = ours.model.config.num_layers
    assert set(merged.modules) == {(i, p) for i in range(layers) for p in MERGED_PATHS}

    hf = hf_nf4(tiny_model_dir, mode)
    if mode == "fused":   # PEFT merges into the base the fused kernel multiplies by
        for i, path, lora in ours.loras():
            ours_base = dense_weight(lora.base, ours.backend)
            for target, offset, size in lora.targets:
                w = hf_linear(hf, i, path, target).weight
                w.quant_state = bf16_scales(w.quant_state)
                assert torch.equal(ours_base[offset:offset + size],
                                   bnb.functional.dequantize_4bit(w.data, w.quant_state))
    peft = PeftModel.from_pretrained(hf, adapters[kind]).merge_and_unload()

    changed = 0
    for (i, path), module in merged.modules.items():
        ours_dense = dense_weight(module, ours.backend)
        inner = module.inner
        base_dense = dense_weight(ours.model.model.layers[i].get_submodule(path).base, ours.backend)
        for target, offset, size in layout.slices(ours.model.config, path):
            theirs = hf_linear(peft, i, path, target)
            assert type(theirs) is bnb.nn.Linear4bit, f"PEFT left {type(theirs).__name__} at {i} {target}"
            w, state = theirs.weight, theirs.weight.quant_state
            in_features = state.shape[1]
            rows = slice(offset * in_features // 2, (offset + size) * in_features // 2)   # 2 codes a byte
            if mode == "plain":
                # Linear4bit: codes [out * in / 2, 1] uint8 row-major, absmax [out * in / 64] float32
                assert type(inner) is bnb.nn.Linear4bit
                assert torch.equal(inner.weight.data.view(-1)[rows], w.data.view(-1)), f"codes {i} {target}"
                blocks = slice(offset * in_features // BLOCK, (offset + size) * in_features // BLOCK)
                assert torch.equal(inner.weight.quant_state.absmax[blocks], state.absmax), f"absmax {i} {target}"
                want = bnb.functional.dequantize_4bit(w.data, state)
            elif mode == "native":       # its codes and scales are checked through its dense weight below
                assert type(inner) is nf4_native.NativeNF4Linear
                want = bnb.functional.dequantize_4bit(w.data, state)
            else:
                # bitsandbytes' own CPU repacking of PEFT's merged weight: codes [out, in / 2] in 32-row
                # blocks (each target's rows are whole blocks), absmax [in / 64, out] bfloat16
                assert type(inner) is nf4_cpu.FusedNF4Linear
                packed, repacked = bnb.functional._convert_weight_packed_for_cpu(w.data.clone(), copy.copy(state))
                assert torch.equal(inner.packed.view(-1)[rows], packed.view(-1)), f"codes {i} {target}"
                assert torch.equal(inner.absmax[:, offset:offset + size], repacked.absmax), f"absmax {i} {target}"
                want = bnb.functional.dequantize_4bit(w.data, bf16_scales(state))
            assert torch.equal(ours_dense[offset:offset + size], want), f"dense {i} {target}"
            changed += int((ours_dense[offset:offset + size] != base_dense[offset:offset + size]).sum())
    assert changed > 0.5 * sum(m.inner.out_features * m.inner.in_features for m in merged.modules.values())


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dense_merge_equals_peft_unmerged_and_our_lora_path(kind, mode, tiny_model_dir, adapters):
    ours = Ours(tiny_model_dir)
    adapter = ours.read(adapters[kind], kind)
    merged = ours.merge(adapter, "dense")
    assert all(type(m) is RowPadded and type(m.inner) is torch.nn.Linear for m in merged.modules.values())
    merge.install(ours.model, merged)
    ids = torch.randint(3, 49152, (23,), generator=torch.Generator().manual_seed(7))

    base = ours.logits(ids)                                        # no adapter, base weights
    ours.step.buffers.write(0, adapter)
    ours.step.set(compute_segments([0], [len(ids)]))               # our unmerged LoRA path
    unmerged = ours.logits(ids)
    ours.step.set(None)
    ours.step.weight_set = KEY                                     # the merged weights, no LoRA work
    got = ours.logits(ids)

    hf = hf_nf4(tiny_model_dir, mode)
    with adapter_kinds.dora_weights_before_packing(hf), torch.inference_mode():
        want = PeftModel.from_pretrained(hf, adapters[kind]).eval()(ids[None]).logits[0].float()

    assert (want - base).abs().max() > 0.5                         # the adapter visibly changes the logits
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL[mode], rtol=0)
    torch.testing.assert_close(got, unmerged, atol=LOGIT_ATOL[mode], rtol=0)


def _peft_retained(base_dir, adapter_dir):
    """From PEFT's merge on HF's NF4 base, over the target linears, with q = deq(merged) - deq(base) and d
    PEFT's delta: (<q, d> / ||d||^2 overall: the part of the delta the merged weight moves along, the same
    per layer, ||q|| / ||d|| overall)."""
    hf = hf_nf4(base_dir, "plain")
    peft = PeftModel.from_pretrained(hf, adapter_dir)
    before = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            w = module.base_layer.weight
            layer = int(name.split(".layers.")[1].split(".")[0])
            before[name] = (layer, bnb.functional.dequantize_4bit(w.data, w.quant_state).clone(),
                            module.get_delta_weight("default").detach().clone())
    peft.merge_adapter()
    kept, delta, along = {}, {}, {}
    for name, module in peft.named_modules():
        if name in before:
            layer, w0, d = before[name]
            w = module.base_layer.weight
            q = bnb.functional.dequantize_4bit(w.data, w.quant_state) - w0
            kept[layer] = kept.get(layer, 0.0) + float(q.square().sum())
            delta[layer] = delta.get(layer, 0.0) + float(d.square().sum())
            along[layer] = along.get(layer, 0.0) + float((q * d).sum())
    total = sum(delta.values())
    return (sum(along.values()) / total, [along[i] / delta[i] for i in sorted(along)],
            (sum(kept.values()) / total) ** 0.5)


def test_retained_share(tiny_model_dir, adapters, monkeypatch):
    """`retained` is <deq(Q(W + delta)) - deq(Q(W)), delta> / ||delta||^2, the share of the delta kept along
    it; the norm ratio ||deq(Q(W + delta)) - deq(Q(W))|| / ||delta|| would mislead. With a small delta (1% of
    the weights' std) the new codes are the old ones (the base's values sit on code points, half a step from any
    boundary); what moves is each block's absmax, by the delta at the block's largest weight, which rescales
    the whole block along W, not along the delta. So the norm ratio stays near 0.4 however small the delta
    (measured 0.42-0.44 for deltas of 0.1% to 3%), while the share of the delta kept along it is ~1.5%.
    With a big delta (20%) the codes follow it: ~99% kept along it, norm ratio ~1.09 (rounding noise adds)."""
    set_mode("plain", monkeypatch)     # where our requantized bytes are PEFT's (see the first test)
    ours = Ours(tiny_model_dir)
    shares = {}
    for size in ("small", "big"):
        adapter = ours.read(adapters[size], size)
        requantized, dense = ours.merge(adapter, "requantize"), ours.merge(adapter, "dense")
        want, want_by_layer, norm_ratio = _peft_retained(tiny_model_dir, adapters[size])
        assert len(want_by_layer) == ours.model.config.num_layers
        assert requantized.retained == pytest.approx(want, rel=1e-4)
        assert requantized.retained_by_layer == pytest.approx(want_by_layer, rel=1e-4)
        assert dense.retained == pytest.approx(1, abs=1e-3)
        assert dense.retained_by_layer == pytest.approx([1.0] * len(want_by_layer), abs=1e-3)
        shares[size] = requantized.retained, norm_ratio
        # memory: the merged Linear4bit's codes and float32 scales; the dense copy float32 [out, in]
        weights = [m.inner.weight for m in requantized.modules.values()]
        assert requantized.nbytes == sum(w.data.nbytes + w.quant_state.absmax.nbytes for w in weights)
        assert dense.nbytes == sum(m.inner.weight.nbytes for m in dense.modules.values())
    (small, small_norm), (big, big_norm) = shares["small"], shares["big"]
    assert small < 0.05 and small_norm < 0.6, shares     # measured 0.015 and 0.44
    assert big > 0.9 and 0.9 < big_norm < 1.2, shares    # measured 0.99 and 1.09
    assert big > 10 * small, shares


def _raw(module) -> list[torch.Tensor]:
    """Copies of every tensor a base module holds: parameters, buffers and bitsandbytes' quant state."""
    out = []
    for m in module.modules():
        out += [t.detach().clone() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            out += [state.absmax.clone(), state.code.clone()]
    return out


def test_install_then_uninstall_leaves_the_base_as_it_was(mode, tiny_model_dir, adapters):
    ours = Ours(tiny_model_dir)
    bases = {(i, path): lora.base for i, path, lora in ours.loras()}
    assert all(type(b) is RowPadded and type(b.inner) is not StackedLinear for b in bases.values())
    dense_before = {k: dense_weight(b, ours.backend).clone() for k, b in bases.items()}
    raw_before = {k: _raw(b) for k, b in bases.items()}
    ids = torch.randint(3, 49152, (9,), generator=torch.Generator().manual_seed(3))
    logits_before = ours.logits(ids)

    keys = {"requantize": ("lora", 1), "dense": ("dora", 2)}
    merged = {method: ours.merge(ours.read(adapters[kind], kind), method, keys[method])
              for method, kind in (("requantize", "lora"), ("dense", "dora"))}
    for m in merged.values():
        merge.install(ours.model, m)
    for i, path, lora in ours.loras():
        want = {key: merged[method].modules[(i, path)] for method, key in keys.items() if path in MERGED_PATHS}
        assert lora.alternates.keys() == want.keys() and all(lora.alternates[k] is v for k, v in want.items())
    for key in keys.values():
        ours.step.weight_set = key
        assert not torch.equal(ours.logits(ids), logits_before)
    ours.step.weight_set = None
    for key in keys.values():
        merge.uninstall(ours.model, key)

    for i, path, lora in ours.loras():
        assert isinstance(lora, LoraLinear) and lora.alternates == {}
        assert lora.base is bases[(i, path)]
        assert torch.equal(dense_weight(lora.base, ours.backend), dense_before[(i, path)])
        raw = _raw(lora.base)
        assert len(raw) == len(raw_before[(i, path)])
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(raw, raw_before[(i, path)]))
    assert torch.equal(ours.logits(ids), logits_before)
