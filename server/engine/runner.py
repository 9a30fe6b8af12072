"""Runs one step on the model: builds the step context, feeds the tokens, samples the next ones.
Never touches a queue; the scheduler and engine decide what runs."""

import torch

from ...adapters.segments import compute_segments
from ..model.context import Pieces, StepContext
from ..model.llama import LlamaForCausalLM
from . import kv_cache
from ..model.lm_head import OutputHead
from .sampler import Sampled, pick
from .scheduler import Batch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 kv_cache_mb: int, block_size: int, lora_step=None):
        cfg = model.config
        self.model = model
        self.lora_step = lora_step       # shared with the LoRA layers; None = adapters off
        self.head = OutputHead(model.lm_head.weight)
        self.device = device
        self.block_size = block_size
        per_token = kv_cache.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        self.num_blocks = kv_cache.num_blocks_for_budget(kv_cache_mb, block_size, per_token)
        caches = kv_cache.allocate_caches(cfg.num_layers, self.num_blocks * block_size, cfg.num_kv_heads,
                                          cfg.head_dim, dtype, device)
        for layer, (k, v) in zip(model.model.layers, caches):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v

    @torch.inference_mode()
    def step(self, batch: Batch, eos_ids: tuple[int, ...]) -> Sampled:
        """The next token of every sequence whose tokens are all fed after this step (token_ids[i] None
        for a prompt piece that is not its prompt's last)."""
        decodes = batch.num_decodes
        # equal context lengths side by side, so attention groups are slices; outputs follow this order
        batch.seqs[:decodes] = sorted(batch.seqs[:decodes], key=lambda seq: seq.num_tokens)
        if batch.pieces is not None:
            input_ids, ctx = self._prepare_mixed(batch)
        else:
            input_ids, ctx = self._prepare_prefill(batch.seqs) if batch.prefill else self._prepare_decode(batch.seqs)
        if self.lora_step is not None:
            slots = [seq.slot for seq in batch.seqs]
            lengths = [batch.feeds(i) for i in range(len(batch.seqs))]
            lora = max(slots) >= 0 and batch.weight_set is None     # a merged step needs no LoRA work
            self.lora_step.set(compute_segments(slots, lengths, self.device) if lora else None)
            self.lora_step.weight_set = batch.weight_set
        hidden = self.model(input_ids, ctx)
        wanted = [i for i, seq in enumerate(batch.seqs) if batch.fed_after(i) == seq.num_tokens]
        if len(wanted) == len(batch.seqs):
            return pick(self.head, hidden, batch.seqs, eos_ids)
        return _spread(pick(self.head, hidden, [batch.seqs[i] for i in wanted], eos_ids), wanted, len(batch.seqs))

    @torch.inference_mode()
    def move_kv(self, saves: list[tuple[Sequence, list[int]]], restores: list[Sequence]) -> None:
        """Preempted sequences' K/V rows (under their old block tables) to host memory, then resumed ones'
        saved rows into their new blocks; before the next step writes into any freed block."""
        for seq, table in saves:
            rows = self._tensor(self._rows(table, 0, seq.num_cached))
            seq.saved_kv = [(attn.k_cache[rows].cpu(), attn.v_cache[rows].cpu()) for attn in self._attention()]
        for seq in restores:
            rows = self._tensor(self._rows(seq.block_table, 0, seq.num_cached))
            for attn, (k, v) in zip(self._attention(), seq.saved_kv):
                attn.k_cache[rows] = k.to(attn.k_cache.device)
                attn.v_cache[rows] = v.to(attn.v_cache.device)
            seq.saved_kv = None

    def _attention(self):
        return [layer.self_attn for layer in self.model.model.layers]

    def _rows(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare_prefill(self, seqs: list[Sequence]):
        ids, positions, rows, bounds = [], [], [], [0]
        for seq in seqs:
            tokens = seq.all_ids()
            ids += tokens
            positions += range(len(tokens))
            rows += self._rows(seq.block_table, 0, len(tokens))
            bounds.append(bounds[-1] + len(tokens))
        ctx = StepContext(is_prefill=True, positions=self._tensor(positions), write_rows=self._tensor(rows),
                          cu_seqlens=bounds, logits_index=self._tensor([b - 1 for b in bounds[1:]]))
        return self._tensor(ids), ctx

    def _prepare_mixed(self, batch: Batch):
        """Decode rows first (as in a decode step), then each prompt piece's tokens."""
        decodes = batch.num_decodes
        ids, positions, rows, logits = [], [], [], []
        ctx = None
        if decodes:
            decode_ids, ctx = self._prepare_decode(batch.seqs[:decodes])
            ids, positions, rows = decode_ids.tolist(), ctx.positions.tolist(), ctx.write_rows.tolist()
            logits = list(range(decodes))
        bounds, starts, key_rows = [0], [], []
        for seq, (start, end) in zip(batch.seqs[decodes:], batch.pieces):
            ids += seq.all_ids()[start:end]
            positions += range(start, end)
            rows += self._rows(seq.block_table, start, end)
            bounds.append(bounds[-1] + end - start)
            starts.append(start)
            key_rows.append(self._tensor(self._rows(seq.block_table, 0, end)) if start else None)
            if end == seq.num_tokens:
                logits.append(decodes + bounds[-1] - 1)
        pieces = Pieces(offset=decodes, bounds=bounds, starts=starts, key_rows=key_rows)
        step = StepContext(is_prefill=False, positions=self._tensor(positions), write_rows=self._tensor(rows),
                           gather_rows=ctx and ctx.gather_rows, decode_groups=ctx and ctx.decode_groups,
                           block_tables=ctx and ctx.block_tables, context_lengths=ctx and ctx.context_lengths,
                           block_size=self.block_size, logits_index=self._tensor(logits), pieces=pieces)
        return self._tensor(ids), step

    def _prepare_decode(self, seqs: list[Sequence]):
        lengths = [seq.num_tokens for seq in seqs]   # ascending
        width = -(-lengths[-1] // self.block_size)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, seq in enumerate(seqs):
            tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table[:width])
        # KV cache rows of every position of every sequence: [batch, width * block_size]
        rows = (tables[:, :, None] * self.block_size + torch.arange(self.block_size)).flatten(1)
        ctx = StepContext(is_prefill=False, positions=self._tensor([n - 1 for n in lengths]),
                          write_rows=rows[torch.arange(len(seqs)), torch.tensor(lengths) - 1].to(self.device),
                          gather_rows=rows[:, :lengths[-1]].flatten().to(self.device),
                          decode_groups=_runs(lengths), block_tables=tables.to(self.device),
                          context_lengths=torch.tensor(lengths).to(self.device), block_size=self.block_size,
                          logits_index=torch.arange(len(seqs), device=self.device))
        last = [seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1] for seq in seqs]
        return self._tensor(last), ctx


def _spread(sampled: Sampled, wanted: list[int], size: int) -> Sampled:
    """Sampled for the `wanted` rows of a batch, laid out over the whole batch (None where no token)."""
    tokens, logprobs, top = [None] * size, [0.0] * size, [[] for _ in range(size)]
    for j, i in enumerate(wanted):
        tokens[i] = sampled.token_ids[j]
        if sampled.logprobs is not None:
            logprobs[i], top[i] = sampled.logprobs[j], sampled.top[j]
    return Sampled(tokens, logprobs, top, {wanted[j]: exc for j, exc in sampled.failed.items()})


def _runs(sorted_lengths: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal values in a sorted list, as (start, end, value)."""
    runs, start = [], 0
    for i in range(1, len(sorted_lengths) + 1):
        if i == len(sorted_lengths) or sorted_lengths[i] != sorted_lengths[start]:
            runs.append((start, i, sorted_lengths[start]))
            start = i
    return runs
