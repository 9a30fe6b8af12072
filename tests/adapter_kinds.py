"""Adapters of every supported kind, made by PEFT itself (the oracle for all of them), for the tests.

Each maker takes the base checkpoint and the output directory. Factors are random (or trained a few steps)
and scaled so that every adapter visibly changes the model's answers."""

import contextlib
import pathlib

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _scaled(model, factor: float, seed: int):
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            if "magnitude" in name:
                p.data *= 1 + 0.3 * torch.randn_like(p)     # DoRA: move m away from ||W + BA||
            elif "lora_E" not in name:
                p.data *= factor
    return model


def lora(base_dir, out, factor=1.0, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=ATTN + MLP, init_lora_weights=False))
    _scaled(model, factor, seed).save_pretrained(out)


def qlora(base_dir, out, factor=1.0, seed=1):
    """LoRA made on the 4-bit (NF4) base, as QLoRA trains it."""
    torch.manual_seed(seed)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    _scaled(model, factor, seed).save_pretrained(out)


def rslora(base_dir, out, factor=1.0, seed=2):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=ATTN,
                                      init_lora_weights=False))
    _scaled(model, factor, seed).save_pretrained(out)


def patterns(base_dir, out, factor=1.0, seed=3):
    """Per-module ranks and alphas: a pattern for a target everywhere and one for a single layer's module."""
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=ATTN + MLP, init_lora_weights=False,
                        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
                        alpha_pattern={"v_proj": 32, "layers.0.mlp.up_proj": 2})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    _scaled(model, factor, seed).save_pretrained(out)


def dora(base_dir, out, factor=1.0, seed=4):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=ATTN + ["up_proj"],
                                      init_lora_weights=False))
    _scaled(model, factor, seed).save_pretrained(out)


def adalora(base_dir, out, factor=1.0, seed=5, steps=6):
    """Trained `steps` steps with PEFT's budget allocation (update_and_allocate), which prunes ranks by
    zeroing singular values, so the saved ranks differ per module; then the kept values are scaled up."""
    torch.manual_seed(seed)
    config = AdaLoraConfig(init_r=8, target_r=3, tinit=1, tfinal=1, deltaT=1, total_step=steps, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:     # pruned values stay exactly zero
                p.data = torch.where(p == 0, p, torch.sign(p) * (1 + torch.rand_like(p)))
            elif "lora_A" in name or "lora_B" in name:
                p.data *= 10 * factor
    model.save_pretrained(out)


KINDS = {"lora": lora, "qlora": qlora, "rslora": rslora, "patterns": patterns, "dora": dora, "adalora": adalora}


def make_all(base_dir, root: pathlib.Path, factor=1.0) -> list[str]:
    for name, make in KINDS.items():
        make(base_dir, root / name, factor)
    return list(KINDS)



@contextlib.contextmanager
def dora_weights_before_packing(model):
    """PEFT's DoRA dequantizes the 4-bit base weight on every forward. On CPUs with AVX512-BF16,
    bitsandbytes repacks a Linear4bit's weight for its CPU kernel at the first forward, and PEFT's
    dequantization then reads the repacked bytes as if they were not (the weight comes out scrambled; on
    CUDA nothing is repacked). Inside this block PEFT's DoRA gets each weight as dequantized before any
    forward (call it on the 4-bit model before the first forward) and otherwise runs as it is."""
    from unittest import mock

    import peft.tuners.lora.dora as peft_dora
    from peft.utils.integrations import dequantize_module_weight

    dense = {id(m): dequantize_module_weight(m).detach().clone() for m in model.modules()
             if type(m).__name__ == "Linear4bit"}

    def dequantize(module):
        return dense[id(module)] if id(module) in dense else dequantize_module_weight(module)
    with mock.patch.object(peft_dora, "dequantize_module_weight", dequantize):
        yield


def as_the_fused_kernel_scales(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes' fused kernel (ours, and PEFT's model once it runs) multiplies
    by bf16-rounded block scales. A merge dequantizes first: with this, PEFT's merge starts from the base
    weights the server multiplies by, as our requantize does (else ~0.1% of the merged codes differ by one
    step: tests/test_merge.py). Elsewhere the scales stay float32 and this does nothing."""
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            state.absmax = state.absmax.to(torch.bfloat16).float()


NEAR_TIE = 0.1     # nats between the oracle's top two log-probabilities where a greedy flip is allowed


def peft_greedy(base_dir, adapter_dir, ids: list[int], new_tokens: int, merged: bool = False) -> list[int]:
    """PEFT's greedy tokens with one adapter (None: the base) on the NF4 base, exactly `new_tokens` of them;
    merged: after PEFT's merge_and_unload (the adapter quantized into the 4-bit weights)."""
    return peft_greedy_scored(base_dir, adapter_dir, ids, new_tokens, merged)[0]


def peft_greedy_scored(base_dir, adapter_dir, ids: list[int], new_tokens: int,
                       merged: bool = False) -> tuple[list[int], list[float]]:
    """peft_greedy's tokens, and at each step the gap between the oracle's top two log-probabilities."""
    from peft import PeftModel

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    with dora_weights_before_packing(model), torch.inference_mode():
        if adapter_dir is not None:
            if merged:
                as_the_fused_kernel_scales(model)
            model = PeftModel.from_pretrained(model, adapter_dir)
            if merged:
                model = model.merge_and_unload()
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, output_scores=True, return_dict_in_generate=True)
    gaps = [float(s[0].float().log_softmax(-1).topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), gaps


def agrees(ours: list[int], scored: tuple[list[int], list[float]], near_tie: float = NEAR_TIE) -> bool:
    """The near-tie rule: our greedy tokens equal the oracle's, or first differ at a step where the oracle's
    top two are within `near_tie` nats (where a last-bit difference in float32 may flip the choice)."""
    tokens, gaps = scored
    first = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), None)
    return len(ours) == len(tokens) and (first is None or gaps[first] < near_tie)
