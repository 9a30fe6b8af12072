"""The seam between the model and the format of its quantized decoder linears.

A backend turns a dense weight into a module that multiplies by its quantized form, and gives back the
dense weight such a module multiplies by (DoRA's norms need it, and so does a merge into the weights).
The loader, the LoRA layers and the server know a backend only through this interface; the format itself
(codes, scales, packing, kernels) is known to the backend's own module alone. The layout wrappers around a
backend's modules (row padding, the parts of a packed module) belong to the loader, not to a backend.
"""

from abc import ABC, abstractmethod

import torch
from torch import nn

from .config import ModelConfig

DEFAULT = "nf4"


class QuantBackend(ABC):
    """One quantization format with its settings. Subclasses are frozen dataclasses of those settings."""

    name: str   # the format, as ModelInfo and the model_info metric report it: "nf4", "int4"

    @abstractmethod
    def validate(self, model: ModelConfig, device: torch.device) -> None:
        """Raises ValueError, naming the setting and the width it does not fit, when these settings cannot
        quantize every decoder linear of `model` on `device`."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:
        """A module on `device`, x [..., in] -> [..., out] in the compute dtype `dtype`, that multiplies by
        the quantized `weight` ([out, in], in `dtype`) and adds `bias` ([out], or None)."""

    @abstractmethod
    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        """[out, in] float32: the weight that `module`, made by `quantize`, multiplies by."""

    @abstractmethod
    def stacks(self, in_features: int) -> bool:
        """Whether weights of this width stacked along out_features quantize, row for row, as each would
        alone, so that the parts of a packed linear can share one module (else each part gets its own)."""

    def nbytes(self, module: nn.Module) -> int:
        """The memory `module`, made by `quantize`, holds: its parameters and buffers (a backend whose
        scales live elsewhere counts them too)."""
        return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))

    def zero_group_size(self) -> int | None:
        """Input columns per float zero point, for a format that has them (an update constant over each
        such group folds into the zeros exactly: shift_zeros); None for one that has none."""
        return None

    def shift_zeros(self, module: nn.Module, shift: torch.Tensor) -> nn.Module:
        """A module multiplying by `module`'s weight plus `shift` [out, in / zero_group_size()] broadcast over
        each group: the zeros moved, the codes and scales kept (shared where the format can share them)."""
        raise NotImplementedError(f"{self.describe()} has no zero points")

    def describe(self) -> str:
        """The format and its settings, for the log: "nf4 block 64"."""
        return self.name


def make_backend(name: str = DEFAULT, blocksize: int = 64, group_size: int = 64) -> QuantBackend:
    """The backend `name`: nf4 with its block size, int4 with its group size."""
    if name == "nf4":
        from .nf4 import NF4Backend

        return NF4Backend(blocksize=blocksize)
    if name == "int4":
        from .int4 import Int4Backend

        return Int4Backend(group_size=group_size)
    raise ValueError(f"quantization {name!r} is not supported (supported: nf4, int4)")
