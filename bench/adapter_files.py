"""Adapters on disk for the mixed-adapter benchmark, and which adapter each request of a trace names."""

import os
import pathlib
import shutil

import numpy as np
import torch

from loraplex.server.model.layout import TARGETS


def make_peft_adapters(model_dir: str, root: pathlib.Path, n: int, rank: int, dora: bool = False) -> list[str]:
    """n PEFT-made random adapters (init_lora_weights=False) on all 7 projections, in root/a0 .. root/a{n-1};
    with dora, DoRA adapters (magnitudes moved off their initial norms) in root/d0 ...."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prefix, seed = ("d", 2000) if dora else ("a", 1000)
    names = []
    for i in range(n):
        torch.manual_seed(seed + i)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                                                use_dora=dora, init_lora_weights=False))
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.data *= 1 + 0.05 * torch.randn_like(p)
        model.save_pretrained(str(root / f"{prefix}{i}"))
        base = model.unload()
        names.append(f"{prefix}{i}")
    return names


def saved_in_16bit(root: pathlib.Path, names: list[str], dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Copies of the adapters `names` with every tensor cast to dtype, in root/h0 ... (same configs): what a
    user training in bfloat16 saves. PEFT widens them on load; the CPU engine serves them as saved."""
    from safetensors.torch import load_file, save_file

    copies = []
    for i, name in enumerate(names):
        d = root / f"h{i}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name / "adapter_config.json", d / "adapter_config.json")
        tensors = load_file(str(root / name / "adapter_model.safetensors"))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
        copies.append(d.name)
    return copies


def make_synthetic_adapters(template: pathlib.Path, root: pathlib.Path, n: int, seed: int,
                            distinct: int) -> list[str]:
    """n adapters named s0 .. s{n-1}: the template's config and tensor names/shapes with fresh random values
    of the template's scale. Only `distinct` weight files are written; the other adapters hard-link one of
    them, so 2,000 rank-16 adapters need ~1.2 GB of files (not 39 GB) and stay in the page cache. The
    server still reads, validates and copies each id on its own, as separate adapters."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(template / "adapter_model.safetensors"))
    scales = {k: float(v.float().std()) for k, v in tensors.items()}
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n):
        d = root / f"s{i}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(template / "adapter_config.json", d / "adapter_config.json")
        weights = d / "adapter_model.safetensors"
        if i < distinct:
            save_file({k: (torch.randn(v.shape, generator=gen) * scales[k]).to(v.dtype).contiguous()
                       for k, v in tensors.items()}, str(weights))
        else:
            os.link(root / f"s{i % distinct}" / "adapter_model.safetensors", weights)
        names.append(f"s{i}")
    return names


def zipf_choice(names: list[str], n: int, exponent: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    order = rng.permutation(len(names))          # which adapter gets which popularity rank
    picks = rng.choice(len(names), size=n, p=weights / weights.sum())
    return [names[order[k]] for k in picks]
