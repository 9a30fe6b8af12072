"""LoRA around any base linear: the base layer computes as it always does (4-bit or not, it knows nothing
of adapters), then each token's adapter delta is added through the segmented ops.

All LoRA layers of a model share one `LoraStep`, which the model runner refreshes once per step (the
segments of the batch and each slot's ranks, and the weight set the step runs on); layers only read it. A
packed base layer (q|k|v, gate|up) carries one target per output slice. Beside its base, a layer may hold
merged copies of it (`alternates`, by adapter version: see merge.py); a step on a merged weight set
multiplies by those where the adapter has them and by the base elsewhere, with no LoRA work.
"""

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.server.model import layout
from loraplex.server.model.loader import dense_weight
from loraplex.server.model.quant import QuantBackend

from . import ops
from .segments import Segments
from .slots import SlotBuffers


@dataclass
class LoraStep:
    """Per-step LoRA metadata; segments None = no adapter in this step. scaled: per token, the row of the
    scale buffers it is multiplied by (its slot's when that slot holds a DoRA adapter, else the row of
    ones); None when no token of the step is scaled."""
    buffers: SlotBuffers
    segments: Segments | None = None
    scaled: torch.Tensor | None = None
    weight_set: tuple | None = None     # a merged copy's key (adapter id, version, method); None: the base

    def set(self, segments: Segments | None) -> None:
        self.segments = segments if segments is not None and len(segments) else None
        self.scaled = None
        if self.segments is None:
            return
        flags = self.buffers.scaled
        present = [slot for slot in set(self.segments.slots) if flags[slot]]
        if present:
            device = next(iter(self.buffers.scale.values())).device
            token_slots = self.segments.token_slots.to(device)
            scaled = torch.isin(token_slots, torch.tensor(present, device=device))
            self.scaled = torch.where(scaled, token_slots, self.buffers.unscaled_row)


class LoraLinear(nn.Module):
    """targets: (target name, output offset, output size) per packed slice of the base's output."""

    def __init__(self, base: nn.Module, layer: int, targets: list[tuple[str, int, int]], step: LoraStep):
        super().__init__()
        self.base = base
        self.targets = targets
        self.step = step
        self.alternates: dict[tuple, nn.Module] = {}   # merged copies of base, by (id, version, method)
        # Views of this layer's rows of the slot buffers, taken once: slot writes update them in place.
        buffers = step.buffers
        self.slices = [(buffers.a[t][layer], buffers.b[t][layer], buffers.device_ranks[t][layer], offset, size)
                       for t, offset, size in targets]
        self.scales = [(buffers.scale[t][layer], offset, size) for t, offset, size in targets]
        self.storage = [(buffers.stored[t][layer], buffers.b_scale[t][layer]) for t, _, _ in targets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.alternates.get(self.step.weight_set, self.base)(x)     # [num_tokens, out_features]
        segments = self.step.segments
        if segments is None:
            return out
        self.add_delta(x, segments, out)
        if self.step.scaled is not None:                 # DoRA: (base + delta) * m / ||W + BA||, per token
            rows = self.step.scaled
            for scale, offset, size in self.scales:
                out[:, offset:offset + size].mul_(scale[rows])   # float32 scales, rounded once into out
        return out

    def add_delta(self, x: torch.Tensor, segments: Segments, out: torch.Tensor) -> None:
        """out[:, slice of t] += x @ A_t.T @ B_t.T per token's slot, for every target t (in place)."""
        ops.lora_apply(x, self.slices, segments, out, storage=self.storage)   # buffers are in the compute dtype


def attach_lora(model: nn.Module, step: LoraStep) -> None:
    """Wraps every packed linear of every decoder layer (layout.PACKED) in a LoraLinear sharing `step`,
    one target per output slice."""
    for index, layer in enumerate(model.model.layers):
        for path in layout.PACKED:
            parent_name, _, leaf = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            slices = layout.slices(model.config, path)
            setattr(parent, leaf, LoraLinear(getattr(parent, leaf), index, slices, step))


def base_weights(model: nn.Module, backend: QuantBackend):
    """(layer, target) -> that target's rows of the dequantized base weight [out, in] float32, for DoRA,
    read through the backend that quantized the model. The last packed module's is kept, since a DoRA
    adapter's modules come layer by layer (q, k, v share one)."""
    last: dict = {}

    def weight(layer: int, target: str) -> torch.Tensor:
        for lora in model.model.layers[layer].modules():
            if isinstance(lora, LoraLinear):
                for name, offset, size in lora.targets:
                    if name == target:
                        if last.get("module") is not lora:
                            last.clear()
                            last.update(module=lora, weight=dense_weight(lora.base, backend))
                        return last["weight"][offset:offset + size]
        raise KeyError(f"layer {layer} has no {target}")

    return weight
