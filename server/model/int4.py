"""The group-wise asymmetric INT4 backend, on torch's own int4 kernels.

w = (q - 8) * scale + zero, q in 0..15, one float scale and zero per (output row, group of `group_size`
input columns), set by min-max over the group (QA-LoRA's eq. 1): scale = (max - min) / 15 and zero =
min + 8 * scale, so q = 0 lands on the group's min and q = 15 on its max. That convention is the one torch's
CPU kernel computes (measured: it reproduces `_weight_int4pack_mm_for_cpu` to 2.6e-6-5.3e-6 in float32,
where (q - zp) * s and q * s + z miss by 3-9). A float zero per group is what lets a QA-LoRA adapter, whose
update is constant within each group, fold into the zeros alone.

The packed codes are in the kernel's own blocked layout, which torch does not document; `codes()` reads
them back through the packing op itself (each nibble's source found by packing the digits of its index),
so nothing here depends on that layout.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import layout
from .config import ModelConfig
from .quant import QuantBackend

GROUP_SIZES = (32, 64, 128, 256)
ROWS = 16            # the packing op wants out_features in multiples of 16: weights are padded with zero rows
INNER_K_TILES = 2    # the packing op's tiling argument (ignored by the CPU op's layout, required by its check)


@dataclass(frozen=True)
class Int4Backend(QuantBackend):
    group_size: int = 64

    name: ClassVar[str] = "int4"

    def describe(self) -> str:
        return f"int4 group {self.group_size}"

    def validate(self, model: ModelConfig, device: torch.device) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"quant_group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size}")
        if device.type != "cpu":
            raise ValueError(f"int4 runs on the CPU only so far, not on {device.type}: use --quant nf4")
        for width in layout.in_widths(model):
            if width % self.group_size:
                raise ValueError(f"quant_group_size {self.group_size} does not divide the layer width {width}: "
                                 f"int4 needs whole groups per row")

    def stacks(self, in_features: int) -> bool:
        return True          # each row is quantized on its own

    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, device, dtype) -> nn.Module:
        codes, scales, zeros = quantize_groups(weight.to(device, torch.float32), self.group_size)
        return Int4Linear.from_codes(codes, scales, zeros, self.group_size,
                                     None if bias is None else bias.to(device), dtype)

    def zero_group_size(self) -> int | None:
        return self.group_size

    def shift_zeros(self, module: nn.Module, shift: torch.Tensor) -> nn.Module:
        if not isinstance(module, Int4Linear):
            raise TypeError(f"{type(module).__name__} is not a module of the int4 backend")
        return module.with_zeros(module.zeros.float() + shift.to(module.packed.device))

    def nbytes(self, module: nn.Module) -> int:
        shared = module.packed.nbytes if getattr(module, "shares_codes", False) else 0
        return super().nbytes(module) - shared

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        if not isinstance(module, Int4Linear):
            raise TypeError(f"{type(module).__name__} is not a module of the int4 backend")
        return module.dense_weight()


def quantize_groups(weight: torch.Tensor, group_size: int):
    """(codes int32 [out, in] in 0..15, scales [out, in/g], zeros [out, in/g]) of a float32 weight, min-max
    per (row, group)."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = torch.where(high > low, (high - low) / 15, torch.ones_like(low))   # a flat group: any scale
    zeros = low + 8 * scales
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32)
    return codes.reshape(out_features, in_features), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] float32: (q - 8) * scale + zero, per (row, group)."""
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, in_features // group_size, group_size).float() - 8
    return (groups * scales[..., None].float() + zeros[..., None].float()).reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """x [..., in] -> [..., out] in the compute dtype through `_weight_int4pack_mm_for_cpu`, plus the bias.
    packed: the op's codes for [out padded to ROWS, in]; scales_and_zeros: [in/g, out padded, 2]."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None, shares_codes: bool = False):
        super().__init__()
        self.out_features, self.in_features = out_features, scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.shares_codes = shares_codes       # packed belongs to another module (a merge shifted the zeros)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> "Int4Linear":
        out_features, in_features = codes.shape
        pad = -out_features % ROWS
        codes = torch.cat([codes, codes.new_full((pad, in_features), 8)])       # padded rows: (8 - 8) * 1 + 0
        scales = torch.cat([scales, scales.new_ones(pad, scales.shape[1])])
        zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
        scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, scales_and_zeros, group_size, out_features, None if bias is None else bias.to(dtype))

    def with_zeros(self, zeros: torch.Tensor) -> "Int4Linear":
        """A module on the same codes (shared, not copied) and scales, with these zeros [out, in/g]."""
        scales_and_zeros = self.scales_and_zeros.clone()
        scales_and_zeros[:, :self.out_features, 1] = zeros.t().to(scales_and_zeros.dtype)
        return Int4Linear(self.packed, scales_and_zeros, self.group_size, self.out_features,
                          None if self.bias is None else self.bias.data, shares_codes=True)

    @property
    def scales(self) -> torch.Tensor:
        return self.scales_and_zeros[:, :self.out_features, 0].t()

    @property
    def zeros(self) -> torch.Tensor:
        return self.scales_and_zeros[:, :self.out_features, 1].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        out = out[:, :self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def codes(self) -> torch.Tensor:
        """int32 [out, in] in 0..15, read back from the packed buffer."""
        rows = self.packed.shape[0]
        source = _nibble_sources(rows, self.in_features, self.packed.device)
        nibbles = torch.stack([self.packed & 0xF, self.packed >> 4], -1).flatten().to(torch.int32)
        codes = torch.empty(rows * self.in_features, dtype=torch.int32, device=self.packed.device)
        codes[source] = nibbles
        return codes.reshape(rows, self.in_features)[:self.out_features]

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)


def _nibble_sources(rows: int, cols: int, device) -> torch.Tensor:
    """For each nibble of a packed [rows, cols] code matrix (low nibble first, bytes in order), the flat
    index of the code it holds: the packing op applied to each base-16 digit of every index."""
    index = torch.arange(rows * cols, dtype=torch.int64, device=device)
    source = torch.zeros(rows * cols, dtype=torch.int64, device=device)
    place = 1
    while place < rows * cols:
        plane = ((index // place) % 16).to(torch.int32).reshape(rows, cols)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, INNER_K_TILES)
        source += torch.stack([packed & 0xF, packed >> 4], -1).flatten().to(torch.int64) * place
        place *= 16
    return source
