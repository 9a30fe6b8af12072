"""QA-LoRA (Xu et al., 2023): lora_A acts on the input pooled over groups of `group_size` consecutive input
features, so its width is in_features / group_size. Pooling is linear, so A · pool(x) = A_wide · x with
A_wide[:, j] = c · A[:, j // group_size]: the adapter is served as an equivalent LoRA of full width in mixed
batches, and the group structure stays in `LoraModule.group_size` (A_wide[:, ::group_size] / c is A).

The factor c: the paper's definition (average pooling) gives c = 1 / group_size. PEFT's `use_qalora`
variant multiplies the average by in_features / group_size (see its QALoraLinearVariant), so adapters
that declare `use_qalora` get c = (in_features / group_size) / group_size, as PEFT computes them.
"""

import torch

from loraplex.server.model.config import ModelConfig
from loraplex.server.model.layout import in_out_features

from .peft_files import CONFIG_FILE, AdapterFormatError, Factors, positive_int

MIN_DETECTED_GROUP = 8   # a narrower lora_A is a mismatch (another base), not a quantization group


def declared_group_size(config: dict) -> int | None:
    if config.get("use_qalora"):
        return positive_int(config, "qalora_group_size", config.get("qalora_group_size", 16))
    if config.get("group_size") is not None:
        return positive_int(config, "group_size")
    return None


def detect_group_size(factors: Factors, model: ModelConfig) -> int | None:
    """The group size when every lora_A is narrower than its input by one power-of-two factor >= 8
    (quantization group sizes); None when the widths are the base's own (or do not fit: the shape check
    then says which)."""
    sizes = set()
    for (_, target), found in factors.items():
        a = found["A"]
        in_features, _ = in_out_features(model, target)
        if a.dim() != 2 or a.shape[1] == in_features:
            return None
        if a.shape[1] == 0 or in_features % a.shape[1]:
            return None
        sizes.add(in_features // a.shape[1])
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if size >= MIN_DETECTED_GROUP and size & (size - 1) == 0 else None


def pooled_width(where: str, in_features: int, group_size: int) -> int:
    if in_features % group_size:
        raise AdapterFormatError(f"{where}: QA-LoRA group size {group_size} does not divide the input width "
                                 f"{in_features} ({CONFIG_FILE})")
    return in_features // group_size


def pool_factor(config: dict, in_features: int, group_size: int) -> float:
    if config.get("use_qalora"):
        return (in_features // group_size) / group_size
    return 1.0 / group_size


def widen(a: torch.Tensor, group_size: int, factor: float) -> torch.Tensor:
    """[r, in / g] -> [r, in]: each column repeated over its group, times the pooling factor (float32)."""
    return (a.to(torch.float32) * factor).repeat_interleave(group_size, dim=1)
