"""The one canonical in-memory form of an adapter, whatever format it was read from.

Format readers (one module per format, e.g. `peft_lora`) validate and normalize at load time, so the hot
path only ever sees `delta_W = b @ a` per (layer, target) and never branches on the adapter's format.
"""

from dataclasses import dataclass, field

from torch import Tensor

# Linear modules of a Llama-family decoder layer that an adapter may target.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update of one linear: y += x @ a.T @ b.T, i.e. delta_W = b @ a ([out, in])."""

    a: Tensor  # [rank, in_features]
    b: Tensor  # [out_features, rank]; the format's scaling (e.g. alpha / r) is already folded in
    # Room for later formats, read only by code that knows them; plain LoRA leaves both None.
    magnitude: Tensor | None = None  # [out_features]: DoRA's per-output scale vector (not implemented)
    group_size: int | None = None  # QA-LoRA: input pooled in groups of this size before `a` (not implemented)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def delta_weight(self) -> Tensor:
        """[out_features, in_features]: the dense update this module adds to the base weight."""
        return self.b @ self.a

    def nbytes(self) -> int:
        extra = self.magnitude.nbytes if self.magnitude is not None else 0
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
