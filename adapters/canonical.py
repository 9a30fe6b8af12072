"""The one canonical in-memory form of an adapter, whatever format it was read from.

Format readers (one module per format under `formats/`) validate and normalize at load time, so the hot
path only ever sees `delta_W = b @ a` per (layer, target), plus an optional per-output scale applied after
base + delta, and never branches on the adapter's format:

- LoRA, QLoRA, rsLoRA, rank/alpha patterns: the format's scaling folded into `b`, or, for factors saved in
  bfloat16 / float16 and served by the CPU kernels, both kept as saved with the scaling in `b_scale` (they
  are widened, and b scaled, only inside the LoRA op: see csrc/lora_cpu.cpp);
- AdaLoRA: the singular values folded into `a`, pruned ranks dropped, its scaling folded into `b`;
- QA-LoRA: `a` widened from [r, in / group_size] to act on the full input (`group_size` is kept);
- DoRA: `magnitude` as read; `output_scale = magnitude / ||W + b a||` (row norms over the dequantized base
  weight) is filled in once at load by `formats.dora.bind`, in the server process that holds the base.
"""

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update of one linear: y = (base(x) + x @ a.T @ b.T) * output_scale, i.e. delta_W = b @ a
    ([out, in]) and, for DoRA, a per-output-feature scale (None: 1)."""

    a: Tensor  # [rank, in_features]
    b: Tensor  # [out_features, rank]; the format's scaling (e.g. alpha / r) folded in unless b_scale says
    magnitude: Tensor | None = None     # [out_features] float32: DoRA's magnitude vector m, as read
    output_scale: Tensor | None = None  # [out_features] float32: m / ||W + b a|| per row, set by dora.bind
    group_size: int | None = None       # QA-LoRA: a's columns are constant over groups of this many inputs
    b_scale: float | None = None    # 16-bit factors kept as saved: the scaling still to apply to b; None: folded

    @property
    def needs_base(self) -> bool:
        """DoRA's scale depends on the base weight, which only the server process has."""
        return self.magnitude is not None and self.output_scale is None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def factors(self) -> tuple[Tensor, Tensor]:
        """(a, b) with the scaling folded into b: float32 (b widened, then scaled) for factors kept as saved,
        so each value is the one the reader would have folded in."""
        if self.b_scale is None:
            return self.a, self.b
        return self.a.to(torch.float32), self.b.to(torch.float32) * self.b_scale

    def delta_weight(self) -> Tensor:
        """[out_features, in_features]: the dense update this module adds to the base weight."""
        a, b = self.factors()
        return b @ a

    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in (self.magnitude, self.output_scale) if t is not None)
        return self.a.nbytes + self.b.nbytes + extra


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    modules: dict[tuple[int, str], LoraModule]  # (layer index, target) -> update
    alpha: float  # the format's declared alpha (informational: scaling is already in each `b`)
    source: str  # the directory it was read from
    format: str = "lora"
    rank: int = field(init=False)  # the largest module rank (slot sizing)
    target_modules: tuple[str, ...] = field(init=False)  # sorted, derived from `modules`
    size_bytes: int = field(init=False)

    def __post_init__(self):
        if not self.modules:
            raise ValueError(f"adapter {self.adapter_id!r} has no modules")
        # frozen: derived fields are set once here, never recomputed on the hot path.
        object.__setattr__(self, "rank", max(m.rank for m in self.modules.values()))
        object.__setattr__(self, "target_modules", tuple(sorted({t for _, t in self.modules})))
        object.__setattr__(self, "size_bytes", sum(m.nbytes() for m in self.modules.values()))

    @property
    def ranks(self) -> dict[tuple[int, str], int]:
        return {key: module.rank for key, module in self.modules.items()}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.modules}))

    @property
    def needs_base(self) -> bool:
        return any(m.needs_base for m in self.modules.values())

    @property
    def scaled(self) -> bool:
        """Some module scales its output (DoRA): its slot needs the per-token scale step."""
        return any(m.output_scale is not None for m in self.modules.values())

    def with_modules(self, modules: dict[tuple[int, str], LoraModule]) -> "Adapter":
        return replace(self, modules=modules)
