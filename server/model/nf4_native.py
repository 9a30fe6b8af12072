"""Our NF4 kernel (`adapters/csrc/nf4_linear_cpu.cpp`) for CPUs that bitsandbytes' fused kernel does not run
on (it needs AVX512-BF16): there `Linear4bit` dequantizes its whole weight into a float32 copy on every call
and then multiplies. This module multiplies by the same float32 weight (bitsandbytes' own dequantization:
code-book value times block absmax) without the copy, summing each output in one fixed order, so a row's
result never depends on the batch. HF transformers on such a CPU (dequantize + matmul) differs from it only
in the order of the sums.

Measured on a 2-core Ice Lake Xeon (AVX-512F, no AVX512-BF16), one [1536 -> 576] linear: 0.041 ms at 1 row
and 0.199 ms at 16 against 0.202 ms and 0.762 ms for dequantize + matmul (docs/decode-profile.md).
"""

import torch
from torch import nn

from ...adapters import native

TILE = native.TILE_ROWS


def available(layer: nn.Module) -> bool:
    """Whether `layer` (a bitsandbytes Linear4bit on the CPU) can run on this kernel: NF4 with float32
    compute, whole even blocks per row, and the native kernels built with a vector variant for this CPU
    (`native.tile_products_fast`: without AVX2 bitsandbytes' own path is faster)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    if not isinstance(layer, bnb.nn.Linear4bit) or layer.weight.device.type != "cpu":
        return False
    state = layer.weight.quant_state
    return (state.quant_type == "nf4" and layer.compute_dtype in (None, torch.float32) and state.blocksize % 2 == 0
            and state.shape[1] % state.blocksize == 0 and not getattr(state, "packing_format_for_cpu", False)
            and native.tile_products_fast())


def block_scales(state) -> torch.Tensor:
    """[out * in / blocksize] float32: the absmax of each block, as bitsandbytes' dequantize_4bit uses it."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float()
    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def nf4_layout(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int):
    """The kernel's layout of a bitsandbytes NF4 weight (packed [out * in / 2] uint8, element 2i in the high
    nibble of byte i, then 2i + 1; absmax [out * in / blocksize]), rows padded with zeros to tiles of 16:
    codes [tiles, in / 2, 16] uint8, byte (t, p, j) = q(16t + j, 2p) | q(16t + j, 2p + 1) << 4, and
    scales [tiles, in / blocksize, 16] float32."""
    out_features, in_features = shape
    tiles = -(-out_features // TILE)
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(out_features, in_features)
    scales = absmax.reshape(out_features, in_features // blocksize)
    pad = tiles * TILE - out_features
    q = torch.cat([q, q.new_zeros(pad, in_features)]).reshape(tiles, TILE, in_features // 2, 2)
    scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])]).reshape(tiles, TILE, -1)
    codes = (q[..., 0] | (q[..., 1] << 4)).transpose(1, 2).contiguous()
    return codes, scales.transpose(1, 2).contiguous()


class NativeNF4Linear(nn.Module):
    row_invariant = True    # each output one fixed sequence of sums: no row padding needed (row_padding.py)

    def __init__(self, layer: nn.Module):
        super().__init__()
        import bitsandbytes.functional as bnbf

        state = layer.weight.quant_state
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        codes, scales = nf4_layout(layer.weight.data, block_scales(state), state.shape, state.blocksize)
        self.register_buffer("codes", codes, persistent=False)      # [tiles, in / 2, 16] uint8
        self.register_buffer("scales", scales, persistent=False)    # [tiles, in / blocksize, 16] float32
        self.register_buffer("table", bnbf.get_4bit_type("nf4", device="cpu").float().contiguous(), persistent=False)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.ops.loraplex.nf4_linear(flat, self.codes, self.scales, self.table)    # [m, tiles * 16]
        if out.shape[1] != self.out_features:
            out = out[:, :self.out_features].contiguous()
        out = out.to(x.dtype)
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """[out, in] float32: the weight this kernel multiplies by (code-book value times block absmax)."""
        tiles, pairs, _ = self.codes.shape
        q = torch.stack([self.codes & 0xF, self.codes >> 4], dim=-1)          # [tiles, in / 2, 16, 2]
        q = q.permute(0, 2, 1, 3).reshape(tiles * TILE, self.in_features).long()
        scales = self.scales.transpose(1, 2).reshape(tiles * TILE, -1).repeat_interleave(self.blocksize, dim=1)
        return (self.table[q] * scales)[:self.out_features]
