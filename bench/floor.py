"""The floor of one decode step: only the work on the weights, nothing else (no attention, norms, rotary,
sampling, Python scheduling).

Built from the checkpoint's own fp32 weights, freshly quantized to NF4 (block 64), so it never touches the
engine's modules (bitsandbytes may have repacked those into a CPU-specific layout on first forward).

- dequant floor: for every quantized weight, dequantize it to fp32 and run F.linear at batch B;
  plus the fp32 lm_head matmul.
- fused floor: every weight as the module our NF4 backend makes of it (on CPUs with AVX512-BF16
  bitsandbytes' fused 4-bit kernel, the path both our engine and HF take; on other CPUs our own kernel,
  server/model/nf4_native.py, where HF dequantizes every weight per call); plus the same lm_head matmul.
"""

import pathlib
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open


def _checkpoint(directory: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


class Floor:
    def __init__(self, directory: str, blocksize: int = 64):
        import bitsandbytes.functional as bnbf

        tensors = _checkpoint(directory)
        names = [k for k, v in tensors.items() if k.startswith("model.layers.") and k.endswith(".weight") and v.dim() == 2]
        self.blocksize = blocksize
        self.dense = [tensors[k].float().contiguous() for k in names]
        self.quantized = [bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4") for w in self.dense]
        self.lm_head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float().contiguous()
        self.modules = None
        self.parameters = sum(w.numel() for w in self.dense)

    def _ops(self, batch: int, fused: bool, dequant_only: bool = False) -> list:
        """One decode step's weight work as separate calls, one per weight, then lm_head."""
        sizes = {w.shape[1] for w in self.dense} | {self.lm_head.shape[1]}
        x = {k: torch.randn(batch, k) for k in sizes}
        if fused:
            ops = [lambda m=m: m(x[m.in_features]) for m in self.modules]
        else:
            ops = [lambda p=p, s=s: self._dequant_linear(p, s, x, dequant_only) for p, s in self.quantized]
        if not dequant_only:
            ops.append(lambda: F.linear(x[self.lm_head.shape[1]], self.lm_head))
        return ops

    def _dequant_linear(self, packed, state, x, dequant_only: bool) -> None:
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(packed, state.absmax, self.blocksize, "nf4",
                                                                 state.shape, torch.float32)
        if not dequant_only:
            F.linear(x[weight.shape[1]], weight)

    def _build_modules(self) -> None:
        from loraplex.server.model.nf4 import NF4Backend

        backend = NF4Backend(blocksize=self.blocksize)
        # eval(): bitsandbytes only switches to its fused CPU kernel for modules in inference mode
        self.modules = [backend.quantize(w, None, torch.device("cpu"), torch.float32).eval() for w in self.dense]

    @torch.inference_mode()
    def step_seconds(self, batch: int, fused: bool, repeats: int) -> float:
        """Sum over the step's calls of each call's fastest time in `repeats` passes (after a warm-up pass).
        Taking each call's minimum keeps a neighbour's burst during one call out of the floor."""
        if fused and self.modules is None:
            self._build_modules()
        return _sum_of_minima(self._ops(batch, fused), repeats)

    @torch.inference_mode()
    def dequant_only_seconds(self, repeats: int) -> float:
        """The dequantization part of the dequant floor alone (it does not depend on B)."""
        return _sum_of_minima(self._ops(1, fused=False, dequant_only=True), repeats)


def _sum_of_minima(ops: list, repeats: int) -> float:
    for op in ops:
        op()
    best = [float("inf")] * len(ops)
    for _ in range(repeats):
        for j, op in enumerate(ops):
            start = time.perf_counter()
            op()
            best[j] = min(best[j], time.perf_counter() - start)
    return sum(best)
