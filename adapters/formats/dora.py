"""DoRA (Liu et al., 2024; PEFT `use_dora`): the layer's output is m / ||W + s·B·A|| (one value per output
feature, norms over each row of the dequantized base weight) times base(x) + s·B·A·x.

The reader keeps m (`lora_magnitude_vector`) as float32; `bind` computes the scale once per adapter
version, in the server process (which holds the base weights), before the adapter reaches a slot. The
LoRA layers then apply it per token after base + delta, so DoRA adapters share batches with plain ones.
"""

from collections.abc import Callable
from dataclasses import replace

import torch

from loraplex.adapters.canonical import Adapter
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.layout import TARGETS, in_out_features

from .peft_files import AdapterFormatError

BaseWeight = Callable[[int, str], torch.Tensor]   # (layer, target) -> dequantized W [out, in]


def magnitude(where: str, found: dict, model: ModelConfig, target: str) -> torch.Tensor:
    m = found["magnitude"]
    _, out_features = in_out_features(model, target)
    if tuple(m.shape) != (out_features,):
        raise AdapterFormatError(f"{where} lora_magnitude_vector: shape {tuple(m.shape)} does not fit the base "
                                 f"model (expected [{out_features}])")
    return m.to(torch.float32).contiguous()


def bind(adapter: Adapter, base_weight: BaseWeight | None) -> Adapter:
    """The adapter with every DoRA module's output_scale filled in from the base weights."""
    if not adapter.needs_base:
        return adapter
    if base_weight is None:
        raise AdapterFormatError("DoRA adapters need the base model's weights, which this reader lacks")
    modules = dict(adapter.modules)
    # Layer by layer in the targets' order, so that the parts of a packed base module (q|k|v, gate|up)
    # come one after another and share one dequantization (see lora_layer.base_weights).
    for layer, target in sorted(adapter.modules, key=lambda k: (k[0], TARGETS.index(k[1]))):
        module = adapter.modules[(layer, target)]
        if not module.needs_base:
            continue
        w = base_weight(layer, target)
        a, b = (f.to(w.device, torch.float32) for f in module.factors())
        norm = torch.linalg.norm(w.to(torch.float32) + b @ a, dim=1).cpu()
        scale = module.magnitude / norm
        if not torch.isfinite(scale).all():
            raise AdapterFormatError(f"layer {layer} {target}: DoRA scale is not finite (a zero-norm row of "
                                     "W + B A)")
        modules[(layer, target)] = replace(module, output_scale=scale.contiguous())
    return adapter.with_modules(modules)

