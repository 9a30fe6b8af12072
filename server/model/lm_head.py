"""The output head: logits from the final hidden states, and an exact greedy choice that costs about a
third of computing all logits in float32.

Greedy screening: a bfloat16 copy of the head scores every token cheaply; a rigorous bound on how far
each bf16 score can be from its float32 value keeps every token that could still be the float32 argmax;
only those few rows are recomputed in float32. The chosen token is the float32 argmax (first index on
ties), the same choice as computing all float32 logits. On CPUs without AVX512-BF16, where torch's
bfloat16 matmul is no faster than float32's, the screen is our own kernel (`adapters/csrc/
bf16_linear_cpu.cpp`: float32 activations times the widened bf16 copy, which the same bound covers).
"""

import torch
import torch.nn.functional as F

from ...adapters import native

# |bf16 score - fp32 logit| <= SLACK * |x| * |w_t|: rounding x and w_t to bf16 (2^-8 each), the bf16
# result itself (2^-8 of |x.w_t| <= |x||w_t|), plus float32 accumulation with a wide margin (2^-12).
SLACK = 2**-7 + 2**-8 + 2**-12
LOGIT_ROWS = 8   # full logits are computed in products of exactly this many rows (see OutputHead.logits)


TILE = native.TILE_ROWS


def tiles_screen_faster(weight: torch.Tensor) -> bool:
    """Whether our bf16 kernel screens faster than torch here: a CPU without AVX512-BF16 but with AVX2 or
    AVX-512, kernels built (`native.tile_products_fast`)."""
    bf16_instructions = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return weight.device.type == "cpu" and not bf16_instructions and native.tile_products_fast()


def bf16_tiles(weight: torch.Tensor) -> torch.Tensor:
    """[vocab, hidden] -> [ceil(vocab / 16), hidden, 16] bfloat16 (rows padded with zeros): the native
    screen's layout, (t, c, j) = weight[16t + j, c]."""
    vocab, hidden = weight.shape
    padded = torch.cat([weight.to(torch.bfloat16), weight.new_zeros(-vocab % TILE, hidden, dtype=torch.bfloat16)])
    return padded.reshape(-1, TILE, hidden).transpose(1, 2).contiguous()


class OutputHead:
    def __init__(self, weight: torch.Tensor, tiles: bool | None = None):
        """tiles: screen with the native kernel (None: where it is faster, `tiles_screen_faster`)."""
        self.weight = weight                                 # [vocab, hidden], the compute dtype
        self.screen = weight.dtype == torch.float32
        if self.screen:
            self.tiles = tiles_screen_faster(weight) if tiles is None else tiles and native.available()
            if self.tiles:
                self.weight_bf16 = bf16_tiles(weight)        # [vocab / 16, hidden, 16]
            else:
                self.weight_bf16 = weight.to(torch.bfloat16)     # [vocab, hidden]
            self.row_norms = weight.norm(dim=1)              # [vocab]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> [n, vocab] float32, each row's bits independent of the other rows.

        A matrix product's rounding depends on its row count (BLAS blocks by shape: measured, 29 of 29
        rows differed in their last bits between a batch of 2-16 and the row alone), so the rows go in
        chunks of exactly LOGIT_ROWS, zero-padded: a row then gets the same logits alone or in any batch.
        The product is bound by reading the head's weight, so the padding costs little."""
        n = hidden.shape[0]
        padded = hidden.new_zeros(-(-n // LOGIT_ROWS) * LOGIT_ROWS, hidden.shape[1])
        padded[:n] = hidden
        chunks = [F.linear(chunk, self.weight) for chunk in padded.split(LOGIT_ROWS)]
        return torch.cat(chunks)[:n].float()

    def greedy(self, hidden: torch.Tensor, banned: list[tuple[int, ...]] | None = None) -> list[int]:
        """The argmax of logits(hidden) per row, leaving out the row's banned tokens, without computing
        all logits in float32."""
        if not self.screen:
            logits = self.logits(hidden)
            for i, ids in enumerate(banned or ()):
                logits[i, list(ids)] = float("-inf")
            return logits.argmax(dim=-1).tolist()
        scores = self._screen_scores(hidden)                                         # [n, vocab]
        for i, ids in enumerate(banned or ()):
            scores[i, list(ids)] = float("-inf")      # neither a bound for the others nor a candidate
        tokens, counts = self._candidates(scores, hidden.norm(dim=1))
        rows = self.weight.index_select(0, tokens)                                  # [candidates, hidden]
        chosen = []
        for i, (start, count) in enumerate(zip(counts.cumsum(0).sub(counts).tolist(), counts.tolist())):
            exact = F.linear(hidden[i:i + 1], rows[start:start + count])    # ascending: ties go to the first
            chosen.append(start + exact.argmax())
        return tokens[torch.stack(chosen)].tolist()

    def _candidates(self, scores: torch.Tensor, hidden_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token whose float32 logit may reach the row's best lower bound (each score +- its slack),
        ascending per row: (tokens [total] int64, counts [n]). The native op computes the same bounds
        without the [n, vocab] temporaries."""
        if scores.device.type == "cpu" and native.available():
            return torch.ops.loraplex.screen_candidates(scores, hidden_norms.contiguous(), self.row_norms, SLACK)
        slack = SLACK * hidden_norms.unsqueeze(1) * self.row_norms                # [n, vocab]
        floor = (scores - slack).amax(dim=-1, keepdim=True)   # the best allowed token's fp32 logit is at least this
        keep = scores + slack >= floor                        # tokens whose fp32 logit may reach it
        return keep.nonzero()[:, 1], keep.sum(dim=1)

    def _screen_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32: each token's score against the bf16 copy of its row."""
        if self.tiles:
            scores = torch.ops.loraplex.bf16_linear(hidden.float().contiguous(), self.weight_bf16)
            return scores[:, :self.weight.shape[0]]
        return F.linear(hidden.to(torch.bfloat16), self.weight_bf16).float()
