"""QA-LoRA factors trained on an HF model whose decoder linears carry the INT4 base's dequantized weights.

PEFT trains QA-LoRA only on GPTQ-quantized layers, so the update is added here by a forward hook on each
targeted linear: s * B A pool(x), pool averaging the input over groups of `group_size` columns times the
number of groups (PEFT's `use_qalora` convention, so the files read as PEFT's: A is [r, in / g], B is
[out, r], s = alpha / r). A starts as PEFT initializes a LoRA A (Kaiming-uniform), B at zero. The saved
layout is PEFT's (`base_model.model.<linear>.lora_A.weight`, `use_qalora` and `qalora_group_size` in
adapter_config.json), which the server reads and, on an INT4 base of the same group size, merges exactly.
"""

import json
import math
import pathlib

import torch
from torch import nn


class QALoraModel(nn.Module):
    """`base` (frozen) with a QA-LoRA update on every linear named in `targets`; called like the base."""

    def __init__(self, base: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, group_size: int):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.group_size, self.targets = rank, alpha, group_size, tuple(targets)
        self.factors = nn.ParameterDict()
        self.names: dict[str, str] = {}        # parameter key -> the linear's module path
        for p in base.parameters():
            p.requires_grad_(False)
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in self.targets:
                self._attach(name, module)

    def _attach(self, name: str, linear: nn.Linear) -> None:
        if linear.in_features % self.group_size:
            raise ValueError(f"QA-LoRA group size {self.group_size} does not divide {name}'s {linear.in_features} "
                             f"inputs")
        key = name.replace(".", "__")
        a = torch.empty(self.rank, linear.in_features // self.group_size)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.factors[f"{key}__A"] = nn.Parameter(a)
        self.factors[f"{key}__B"] = nn.Parameter(torch.zeros(linear.out_features, self.rank))
        self.names[key] = name
        linear.register_forward_hook(self._hook(key))

    def _hook(self, key: str):
        scaling = self.alpha / self.rank

        def add_update(module, args, out):
            x = args[0]
            groups = x.shape[-1] // self.group_size
            pooled = x.reshape(*x.shape[:-1], groups, self.group_size).mean(-1) * groups
            a, b = self.factors[f"{key}__A"], self.factors[f"{key}__B"]
            return out + scaling * (pooled.to(a.dtype) @ a.t() @ b.t()).to(out.dtype)
        return add_update

    def forward(self, **inputs):
        return self.base(**inputs)

    # ---- PEFT's file layout ------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, name in self.names.items():
            for part in ("A", "B"):
                tensors[f"base_model.model.{name}.lora_{part}.weight"] = \
                    self.factors[f"{key}__{part}"].detach().contiguous()
        save_file(tensors, directory / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.targets),
                  "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_qalora": True,
                  "qalora_group_size": self.group_size}
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory) -> "QALoraModel":
        """The adapter saved in `directory` on `base`, trainable."""
        from safetensors.torch import load_file

        directory = pathlib.Path(directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        if not config.get("use_qalora"):
            raise ValueError(f"{directory} does not hold a QA-LoRA adapter (no use_qalora in its config)")
        model = cls(base, tuple(config["target_modules"]), config["r"], config["lora_alpha"],
                    config["qalora_group_size"])
        saved = load_file(directory / "adapter_model.safetensors")
        with torch.no_grad():
            for key, name in model.names.items():
                for part in ("A", "B"):
                    model.factors[f"{key}__{part}"].copy_(saved[f"base_model.model.{name}.lora_{part}.weight"])
        return model
