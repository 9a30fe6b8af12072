"""The group-wise asymmetric INT4 backend, on torch's own int4 kernels.

w = (q - 8) * scale + zero, q in 0..15, one float scale and zero per (output row, group of `group_size`
input columns), set by min-max over the group (QA-LoRA's eq. 1): scale = (max - min) / 15 and zero =
min + 8 * scale, so q = 0 lands on the group's min and q = 15 on its max. That convention is the one torch's
CPU kernel computes (measured: it reproduces `_weight_int4pack_mm_for_cpu` to 2.6e-6-5.3e-6 in float32,
where (q - zp) * s and q * s + z miss by 3-9). A float zero per group is what lets a QA-LoRA adapter, whose
update is constant within each group, fold into the zeros alone.

The kernel computes in the activations' dtype, and in float32 it is a slow reference path: measured on a
2-core AMD EPYC with AVX512-BF16 ([3072, 576], 16 rows), 25 ms in float32 against 0.37 ms in bfloat16
(bitsandbytes' fused NF4 kernel: 0.23 ms). So where the CPU has AVX512-BF16 the kernel gets bfloat16
activations, scales and zeros, as the NF4 kernel does (scales and zeros are rounded to the kernel's dtype
before the codes are chosen). An exact merge moves the zeros by an amount far below a bfloat16 step of
them, so it is kept apart in float32: the merged module shares the base's codes, scales and zeros and adds
(x summed over each group) @ shift^T, 1/g of a matmul. (Keeping every module's zeros apart that way was
measured too: the embedded model decoded at 0.56-0.58x NF4's speed at batch 1-16, against 0.53-0.61x with
the zeros in the kernel, the same within this machine's noise; the int4 kernel itself is what is slower
than bitsandbytes' NF4 one here, 0.37 ms against 0.23 ms above.)

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
        kernel = kernel_dtype(dtype)
        codes, scales, zeros = quantize_groups(weight.to(device, torch.float32), self.group_size, kernel)
        return Int4Linear.from_codes(codes, scales, zeros, self.group_size,
                                     None if bias is None else bias.to(device, dtype), kernel)

    def zero_group_size(self) -> int | None:
        return self.group_size

    def shift_zeros(self, module: nn.Module, shift: torch.Tensor) -> nn.Module:
        if not isinstance(module, Int4Linear):
            raise TypeError(f"{type(module).__name__} is not a module of the int4 backend")
        return module.shifted(shift.to(module.packed.device))

    def nbytes(self, module: nn.Module) -> int:
        shared = module.packed.nbytes + module.scales_and_zeros.nbytes if getattr(module, "shift", None) is not None else 0
        return super().nbytes(module) - shared

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        if not isinstance(module, Int4Linear):
            raise TypeError(f"{type(module).__name__} is not a module of the int4 backend")
        return module.dense_weight()


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the int4 kernel computes in for a model computing in `dtype` (see the module's doc)."""
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if dtype == torch.float32 and bf16 else dtype


def quantize_groups(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32):
    """(codes int32 [out, in] in 0..15, scales [out, in/g], zeros [out, in/g], both float32) of a float32
    weight, min-max per (row, group), scales and zeros first rounded to `scale_dtype`."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = torch.where(high > low, (high - low) / 15, torch.ones_like(low)).to(scale_dtype).float()
    zeros = (low + 8 * scales).to(scale_dtype).float()
    offsets = zeros - 8 * scales                          # where q = 0 lands: the group's min, up to rounding
    codes = torch.round((groups - offsets[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32)
    return codes.reshape(out_features, in_features), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] float32: (q - 8) * scale + zero, per (row, group)."""
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, in_features // group_size, group_size).float() - 8
    return (groups * scales[..., None].float() + zeros[..., None].float()).reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """x [..., in] -> [..., out] in x's dtype through `_weight_int4pack_mm_for_cpu`, plus the bias.
    packed: the op's codes for [out padded to ROWS, in]; scales_and_zeros: [in/g, out padded, 2] in the
    kernel's dtype; shift: None, or (an exact merge) [in/g, out] float32 added to the zeros."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, group_size: int,
                 bias: torch.Tensor | None, shift: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = scales_and_zeros.shape[0] * group_size, out_features
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("shift", shift)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None, kernel: torch.dtype) -> "Int4Linear":
        out_features, in_features = codes.shape
        pad = -out_features % ROWS
        codes = torch.cat([codes, codes.new_full((pad, in_features), 8)])       # padded rows: (8 - 8) * 1 + 0
        scales = torch.cat([scales, scales.new_ones(pad, scales.shape[1])])
        zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
        scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(kernel)
        return cls(packed, scales_and_zeros, out_features, group_size, bias)

    def shifted(self, shift: torch.Tensor) -> "Int4Linear":
        """A module on the same codes, scales and zeros (shared, not copied), its zeros moved by `shift`
        [out, in/g] in float32."""
        total = shift.float() if self.shift is None else self.shift.t() + shift.float()
        return Int4Linear(self.packed, self.scales_and_zeros, self.out_features, self.group_size,
                          None if self.bias is None else self.bias.data, total.t().contiguous())

    @property
    def scales(self) -> torch.Tensor:
        return self.scales_and_zeros[:, :self.out_features, 0].t().float()

    @property
    def zeros(self) -> torch.Tensor:
        zeros = self.scales_and_zeros[:, :self.out_features, 1].t().float()
        return zeros if self.shift is None else zeros + self.shift.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(self.scales_and_zeros.dtype).contiguous(),
                                                         self.packed, self.group_size, self.scales_and_zeros)
        out = out[:, :self.out_features]
        if self.shift is not None:
            sums = flat.float().reshape(flat.shape[0], -1, self.group_size).sum(-1)     # [rows, in/g]
            out = out.float() + sums @ self.shift
        out = out.to(x.dtype)
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
