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


def _ptr(t: torch.Tensor) -> ct.c_void_p:
    return ct.c_void_p(t.data_ptr())
