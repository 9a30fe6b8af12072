"""The bitsandbytes NF4 backend: each decoder linear is bitsandbytes' own `Linear4bit`, quantized from the
checkpoint's weight on the target device, so the 4-bit numbers are exactly bitsandbytes' (and those of HF
transformers + `BitsAndBytesConfig(nf4)`). On CPUs with AVX512-BF16 the module is `nf4_cpu.FusedNF4Linear`,
which calls the same fused kernel with the same arguments; on other CPUs it is `nf4_native.NativeNF4Linear`,
which multiplies by bitsandbytes' dequantized weight without dequantizing it on every call.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import layout, nf4_cpu, nf4_native
from .config import ModelConfig
from .quant import QuantBackend

QUANT_TYPE = "nf4"   # bitsandbytes' name of the 4-bit code book


@dataclass(frozen=True)
class NF4Backend(QuantBackend):
    blocksize: int = 64          # weights per absmax scale, over the flattened [out, in] weight
    double_quant: bool = False   # bitsandbytes' compress_statistics: the scales themselves quantized

    name: ClassVar[str] = QUANT_TYPE

    def describe(self) -> str:
        return f"nf4 block {self.blocksize}" + (", double quant" if self.double_quant else "")

    def validate(self, model: ModelConfig, device: torch.device) -> None:
        if device.type != "cpu":
            return
        for width in layout.in_widths(model):
            if width % self.blocksize:
                raise ValueError(f"quant_blocksize {self.blocksize} does not divide the layer width {width}; "
                                 f"bitsandbytes' CPU kernels need whole blocks per row: use 64")

    def stacks(self, in_features: int) -> bool:
        # blocks run over the flattened weight: with a partial block per row, one would straddle two parts
        return in_features % self.blocksize == 0

    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, device, dtype) -> nn.Module:
        import bitsandbytes as bnb

        out_features, in_features = weight.shape
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                      compress_statistics=self.double_quant, quant_type=QUANT_TYPE,
                                      quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=self.blocksize,
                                         compress_statistics=self.double_quant, quant_type=QUANT_TYPE,
                                         quant_storage=torch.uint8, module=layer)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        layer = layer.to(device)   # moving to the device quantizes the weight
        if nf4_cpu.available(layer):
            return nf4_cpu.FusedNF4Linear(layer)
        return nf4_native.NativeNF4Linear(layer) if nf4_native.available(layer) else layer

    def nbytes(self, module: nn.Module) -> int:
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        scales = 0 if state is None else state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
        return super().nbytes(module) + scales      # Linear4bit keeps its scales in the quant state

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        if isinstance(module, (nf4_cpu.FusedNF4Linear, nf4_native.NativeNF4Linear)):
            return module.dense_weight()
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                raise ValueError("a Linear4bit repacked for the CPU kernel has no dense form here")
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        raise TypeError(f"{type(module).__name__} is not a module of the nf4 backend")
