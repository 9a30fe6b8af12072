"""LoRA layers for CUDA: the same `LoraLinear` (same slot buffers, same step state), whose delta for all
the targets of a packed module (q|k|v, gate|up, o, down) is one Triton launch (`ops.lora_apply` with
`triton_ops.fused`) instead of a shrink and an expand per target.

Why: on a GPU a decode step of a small model is bound by the host, not the device: every kernel launch
and every Python call in a layer counts. Two launches per target (14 per decoder layer) cost the embedded
model's 16-distinct-adapter batch about a third of its base-only speed on an H100 (docs/benchmarks-
adapters.md); one launch per packed module (4 per layer) is what the fused kernel gives. Bits are the two-
kernel path's (tests/test_cuda.py).

`use_fused(model)` switches every LoraLinear of a model built on CUDA to this forward; server/build.py
calls it when Triton is available, unless `--no-lora-fused`. Only the delta differs: DoRA's output
scales and everything else stay LoraLinear's.
"""

import torch
from torch import nn

from . import ops
from .lora_layer import LoraLinear


class FusedLoraLinear(LoraLinear):
    """A LoraLinear whose targets are applied by ops.lora_apply (one fused launch on CUDA)."""

    def prepare(self) -> "FusedLoraLinear":
        from . import triton_ops

        self.targets_args = [(a, b, ranks, offset, size) for a, b, ranks, offset, size in self.slices]
        self.fused = triton_ops.fused_args(self.targets_args) if triton_ops.available() else None
        return self

    def add_delta(self, x: torch.Tensor, segments, out: torch.Tensor) -> None:
        ops.lora_apply(x, self.targets_args, segments, out, self.fused)


def use_fused(model: nn.Module) -> int:
    """Switches the model's LoraLinear modules to FusedLoraLinear in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            module.prepare()
            count += 1
    return count
