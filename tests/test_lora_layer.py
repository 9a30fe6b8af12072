"""A LoRA-wrapped layer over a mixed batch (several adapters and base-only tokens) against PEFT's own
LoRA layers, each adapter alone (the oracle), on a tiny random Llama."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.adapters.lora_layer import LoraLinear, LoraStep
from loraplex.adapters.formats import read_adapter
from loraplex.adapters.segments import compute_segments
from loraplex.adapters.slots import SlotBuffers
from loraplex.server.model.config import ModelConfig
from servers import make_tiny_model

ADAPTERS = [  # (rank, alpha, targets)
    (4, 8, ["q_proj", "v_proj"]),
    (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (64, 128, ["k_proj", "up_proj"]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_dir = make_tiny_model(tmp_path_factory.mktemp("base"), seed=3)
    config = ModelConfig.from_hf(AutoModelForCausalLM.from_pretrained(base_dir).config)
    peft_models, adapters = [], []
    for i, (rank, alpha, targets) in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        out = tmp_path_factory.mktemp(f"adapter{i}")
        model.save_pretrained(out)
        peft_models.append(model.eval())
        adapters.append(read_adapter(out, f"a{i}", config, max_rank=64))
    return config, peft_models, adapters


def peft_module(model, layer, name):
    part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return getattr(getattr(model.base_model.model.model.layers[layer], part), name)


def base_of(module):
    """The plain linear under a PEFT LoRA layer (untargeted modules are plain already)."""
    return getattr(module, "base_layer", module)


@pytest.mark.parametrize("packed", [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)])
def test_mixed_batch_matches_peft_per_adapter(setup, packed):
    config, peft_models, adapters = setup
    shapes = {t: (m.in_features, m.out_features) for t in packed
              for m in [base_of(peft_module(peft_models[0], 0, t))]}
    buffers = SlotBuffers(4, 64, config.num_layers, shapes, torch.float32, torch.device("cpu"))
    slots = {0: 2, 1: 0, 2: 3}                               # adapter index -> device slot
    for i, slot in slots.items():
        subset = {k: m for k, m in adapters[i].modules.items() if k[1] in packed}
        if subset:
            buffers.write(slot, type(adapters[i])(adapter_id=adapters[i].adapter_id, modules=subset,
                                                  alpha=adapters[i].alpha, source=""))
    layer = 1
    bases = [base_of(peft_module(peft_models[0], layer, t)) for t in packed]
    base = torch.nn.Linear(bases[0].in_features, sum(b.out_features for b in bases), bias=False)
    base.weight.data = torch.cat([b.weight.data for b in bases])
    offsets, targets = 0, []
    for t, b in zip(packed, bases):
        targets.append((t, offsets, b.out_features))
        offsets += b.out_features
    step = LoraStep(buffers)
    wrapped = LoraLinear(base, layer, targets, step)
    # sequences: adapter 1 (3 tokens), base (2), adapter 0 (1), adapter 2 (4), adapter 1 (1)
    which, lengths = [1, None, 0, 2, 1], [3, 2, 1, 4, 1]
    step.set(compute_segments([slots[w] if w is not None else -1 for w in which], lengths))
    x = torch.randn(sum(lengths), base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = wrapped(x)
        start = 0
        for w, n in zip(which, lengths):
            rows = x[start:start + n]
            if w is None:
                want = torch.cat([b(rows) for b in bases], dim=-1)
            else:
                want = torch.cat([peft_module(peft_models[w], layer, t)(rows) for t in packed], dim=-1)
            torch.testing.assert_close(got[start:start + n], want, atol=1e-5, rtol=1e-5)
            start += n


def test_no_adapter_in_step_is_the_base_alone(setup):
    config, _, _ = setup
    buffers = SlotBuffers(1, 8, config.num_layers, {"o_proj": (64, 64)}, torch.float32, torch.device("cpu"))
    base = torch.nn.Linear(64, 64)
    step = LoraStep(buffers)
    step.set(compute_segments([-1, -1], [2, 3]))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(LoraLinear(base, 0, [("o_proj", 0, 64)], step)(x), base(x))
