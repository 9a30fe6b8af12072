"""The exact merge of a QA-LoRA adapter into an INT4 base: Z' = Z + c * (B A_g)^T per (row, group), codes
and scales untouched, c from the adapter's pooling convention (mean: s / g, the paper's code; sum: s, the
paper's Algorithm 1; PEFT's use_qalora: s * K / g^2). Checked against that formula computed from the raw
factors (with a negative control: a wrong c must miss), and the merged model against the unmerged LoRA
path and the paper's definition, base(x) + s * B A pool(x), hooked onto HF's float model of our dequantized
base. Both kernel modes of test_int4: merged against unmerged within 1e-4 in float32 mode, 2e-3 in bf16
mode (measured 2.7e-4: the two differ in float32 rounding, which bfloat16 activations downstream can turn
into one bf16 step); against the oracle within 1e-4 in float32 mode (the same
products in another order; measured ~1e-6) and LOGIT_ATOL["bf16"] in bf16 mode."""

import pytest
import torch

from loraplex.adapters import merge
from loraplex.adapters.canonical import Adapter, LoraModule
from loraplex.adapters.formats import qalora
from loraplex.adapters.segments import compute_segments
from loraplex.server.errors import FailedPreconditionError
from loraplex.server.model import layout
from loraplex.server.model.int4 import Int4Backend
from loraplex.server.model.loader import module_bytes
from loraplex.server.model.nf4 import NF4Backend
from dequantized import float_model_of
from test_adapter_formats import make_qalora, qalora_direct
from test_int4 import LOGIT_ATOL, mode  # noqa: F401 - the fixture
from test_merge import KEY, Ours

GROUP = 32
RANK, ALPHA = 4, 8          # make_qalora's
CONVENTIONS = {             # name -> c / s, with s = alpha / r
    "mean": lambda k: 1 / GROUP,
    "sum": lambda k: 1.0,
    "use_qalora": lambda k: k / GROUP**2,
}


def adapter_of(tensors: dict, cfg, convention: str, adapter_id: str = "q") -> Adapter:
    """The canonical adapter of make_qalora's raw factors read with `convention`'s pooling."""
    modules = {}
    for name, a in tensors.items():
        if not name.endswith("lora_A.weight"):
            continue
        layer, target = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-3]
        in_features = layout.in_out_features(cfg, target)[0]
        b = tensors[name.replace("lora_A", "lora_B")] * (ALPHA / RANK)
        modules[(layer, target)] = LoraModule(qalora.widen(a, GROUP, CONVENTIONS[convention](in_features)), b,
                                              group_size=GROUP)
    return Adapter(adapter_id, modules, ALPHA, "")


@pytest.fixture(scope="module")
def raw(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "q"
    return out, make_qalora(tiny_model_dir, out, group=GROUP)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_exact_merge_moves_only_the_zeros_by_the_formula(tiny_model_dir, raw, convention):
    ours = Ours(tiny_model_dir, Int4Backend(GROUP))
    cfg = ours.model.config
    _, tensors = raw
    merged = ours.merge(adapter_of(tensors, cfg, convention), "exact")
    assert merged.retained == pytest.approx(1.0, abs=1e-4)
    for (index, path), module in merged.modules.items():
        base = ours.model.model.layers[index].get_submodule(path).base.inner
        got = module.inner
        assert got.packed is base.packed and got.scales_and_zeros is base.scales_and_zeros   # shared, not copied
        want, wrong = base.zeros.clone(), base.zeros.clone()
        for target, offset, size in layout.slices(cfg, path):
            prefix = f"base_model.model.model.layers.{index}.{path.rpartition('.')[0]}.{target}"
            if f"{prefix}.lora_A.weight" not in tensors:
                continue
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            c = ALPHA / RANK * CONVENTIONS[convention](base.in_features)
            want[offset:offset + size] += c * (b @ a)
            wrong[offset:offset + size] += ALPHA / RANK * (b @ a) * (1.0 if convention != "sum" else 1 / GROUP)
        torch.testing.assert_close(got.zeros, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got.zeros, wrong, rtol=1e-5, atol=1e-6)   # the negative control
    copied = sum(m.inner.shift.nbytes for m in merged.modules.values())   # codes, scales and zeros are shared
    assert merged.nbytes == copied <= 0.2 * sum(module_bytes(ours.model.model.layers[i].get_submodule(p).base,
                                                            ours.backend) for i, p in merged.modules)


@pytest.mark.parametrize("flag", [False, True])
def test_exact_merge_answers_as_unmerged_and_as_the_papers_definition(tiny_model_dir, tmp_path, flag, mode):
    make_qalora(tiny_model_dir, tmp_path / "q", group=GROUP, flag=flag)
    backend = Int4Backend(GROUP)
    ours = Ours(tiny_model_dir, backend)
    adapter = ours.read(tmp_path / "q", "q")
    assert merge.preferred_method(adapter, backend) == "exact"
    merged = ours.merge(adapter, "exact")
    merge.install(ours.model, merged)
    ids = torch.randint(3, 49152, (23,), generator=torch.Generator().manual_seed(7))
    base = ours.logits(ids)
    ours.step.buffers.write(0, adapter)
    ours.step.set(compute_segments([0], [len(ids)]))
    unmerged = ours.logits(ids)
    ours.step.set(None)
    ours.step.weight_set = KEY
    got = ours.logits(ids)
    with torch.inference_mode():
        direct = qalora_direct(float_model_of(tiny_model_dir, backend), tmp_path / "q", GROUP,
                               pooled_times_groups=flag)
        want = direct(ids[None]).logits[0].float()
    assert (want - base).abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-4 if mode == "float32" else LOGIT_ATOL[mode], rtol=0)
    torch.testing.assert_close(got, unmerged, atol=1e-4 if mode == "float32" else 2e-3, rtol=0)


def test_exact_merge_is_refused_where_it_cannot_be_exact(tiny_model_dir, raw):
    path, tensors = raw
    on_int4 = Ours(tiny_model_dir, Int4Backend(64))
    cfg = on_int4.model.config
    with pytest.raises(FailedPreconditionError, match="adapter 'q' has group size 32, the base is int4 group 64"):
        on_int4.merge(adapter_of(tensors, cfg, "mean"), "exact")
    plain = Adapter("p", {key: LoraModule(m.a, m.b) for key, m in adapter_of(tensors, cfg, "mean").modules.items()},
                    ALPHA, "")
    with pytest.raises(FailedPreconditionError, match=r"group size none \(not QA-LoRA\)"):
        on_int4.merge(plain, "exact")
    assert merge.preferred_method(plain, on_int4.backend) == "dense"
    on_nf4 = Ours(tiny_model_dir, NF4Backend())
    with pytest.raises(FailedPreconditionError, match="the base is nf4 block 64 .none. and adapter 'q' has QA-LoRA "
                                                      "group size 32: use dense .* or requantize"):
        on_nf4.merge(adapter_of(tensors, cfg, "mean"), "exact")
    assert merge.preferred_method(adapter_of(tensors, cfg, "mean"), on_nf4.backend) == "dense"
