"""What a server says of its model (ModelInfo), the adapters it serves, and how it tokenizes (Tokenize), for
an engine in this process; a cluster front asks a replica for the same (cluster/front.py)."""

import asyncio
from dataclasses import dataclass

from .build import ModelDescription
from .engine.engine import Engine


@dataclass
class EngineFacts:
    engine: Engine
    model: ModelDescription
    max_batch_size: int

    def facts(self) -> dict:
        m, runner = self.model, self.engine.runner
        return dict(model_name=m.name, architecture=m.architecture, max_sequence_length=m.max_sequence_length,
                    max_new_tokens=self.engine.limits.max_new_tokens, quantization=m.quantization,
                    compute_dtype=m.dtype, device=m.device, vocab_size=m.vocab_size,
                    kv_cache_tokens=runner.num_blocks * runner.block_size, max_batch_size=self.max_batch_size)

    async def describe(self) -> dict:
        return self.facts()

    async def adapter_ids(self) -> list[str]:
        """Every adapter a request may name: those in memory and those on disk."""
        if self.engine.adapters is None:
            return []
        statuses = await asyncio.get_running_loop().run_in_executor(None, self.engine.adapters.catalog)
        return [s.adapter_id for s in statuses]

    async def tokenize(self, text: str, return_tokens: bool) -> tuple[list[int], list[str]]:
        # ~1.5 s per MB of text: on an executor thread, so the event loop keeps streaming meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.encode, text, return_tokens)

    def encode(self, text: str, return_tokens: bool) -> tuple[list[int], list[str]]:
        ids = self.engine.tokenizer.encode(text)
        return ids, self.engine.tokenizer.convert_ids_to_tokens(ids) if return_tokens else []
