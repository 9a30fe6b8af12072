"""bitsandbytes' fused 4-bit CPU kernel, called directly.

On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit` repacks its weight on first use and runs a fused
kernel (bf16 activations, fp32 output). Its Python path around that kernel costs ~20 us per call (state
checks, dtype conversions of the scales on every call), which over the ~120 matmuls of a decode step adds
up. This module repacks once at load and calls the same kernel with the same arguments, so the numbers are
bitwise those of `Linear4bit` (and of HF transformers' bitsandbytes models).
"""

import ctypes as ct

import torch
from torch import nn


def available(layer: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return (isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cpu" and has_avx512bf16()
            and layer.weight.quant_state.quant_type == "nf4"
            and hasattr(lib, "gemv_4bit_inference_cpu_nf4_bf16"))


class FusedNF4Linear(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        state = layer.weight.quant_state
        packed = layer.weight.data
        if not getattr(state, "packing_format_for_cpu", False):
            packed, state = _convert_weight_packed_for_cpu(packed, state)
        self.out_features, self.in_features = state.shape
        self.register_buffer("packed", packed.contiguous(), persistent=False)       # [out, in / 2] uint8
        self.register_buffer("absmax", state.absmax.contiguous(), persistent=False)  # bf16 block scales
        self.bias = layer.bias
        self._blocks = state.blocksize
        self._kernel = lib.gemv_4bit_inference_cpu_nf4_bf16
        self._const = (ct.c_int64(self.out_features), ct.c_int64(self.in_features))
        self._blocksize = ct.c_int64(state.blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()     # [m, in]
        out = torch.empty(a.shape[0], self.out_features, dtype=torch.bfloat16)  # [m, out]
        n, k = self._const
        self._kernel(ct.c_int64(a.shape[0]), n, k, _ptr(a), _ptr(self.packed), _ptr(self.absmax), _ptr(out),
                     self._blocksize, ct.c_int64(a.stride(0)), ct.c_int64(out.stride(0)))
        out = out.to(x.dtype)
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


    def dense_weight(self) -> torch.Tensor:
        """[out, in] float32: the weight this kernel multiplies by, NF4 value times the bf16 block scale.

        Undoes the CPU packing (bitsandbytes' `_convert_weight_packed_for_cpu`): rows go in blocks of 32,
        and each run of 32 bytes holds, for one block and one pair of columns (2j, 2j+1), column 2j of the
        32 rows in its low nibbles and column 2j+1 in its high nibbles.
        """
        from bitsandbytes.functional import get_4bit_type

        n, k = self.out_features, self.in_features
        flat = self.packed.reshape(-1, 32)
        codes = torch.cat([flat & 0xF, flat >> 4], dim=-1)                 # [n * k / 64, 64]
        codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).long()
        values = get_4bit_type("nf4", device="cpu")[codes]                 # [n, k] float32
        scales = self.absmax.T.float().repeat_interleave(self._blocks, dim=1)  # absmax is [k / block, n]
        return values * scales


def _ptr(t: torch.Tensor) -> ct.c_void_p:
    return ct.c_void_p(t.data_ptr())
