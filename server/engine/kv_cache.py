"""Paged KV cache: fixed-size blocks of token rows, handed out to sequences as they grow.

Paging (rather than one max-length region per sequence) lets short requests take only the memory they
use, so the same budget holds more concurrent sequences; blocks are allocated a token at a time, and
when none are left the newest running sequence is preempted (its rows kept in host memory, see
Scheduler._preempt).
"""

import math

import torch


class BlockManager:
    """Pure bookkeeping of which blocks are free; knows nothing of tensors."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("the KV cache budget holds no block; raise kv_cache_mb")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence with this table needs to hold num_tokens."""
        return max(0, math.ceil(num_tokens / self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends blocks to block_table (in place) until it holds num_tokens."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"KV cache has {self.num_free} free blocks, {need} needed")
        for _ in range(need):
            block_table.append(self._free.pop())

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(budget_mb: int, block_size: int, bytes_per_token: int) -> int:
    return (budget_mb * 2**20) // (block_size * bytes_per_token)


def allocate_caches(num_layers: int, num_rows: int, num_kv_heads: int, head_dim: int, dtype, device):
    """One K and one V tensor per layer: [num_rows, num_kv_heads, head_dim], row = block * block_size + offset."""
    shape = (num_rows, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]
