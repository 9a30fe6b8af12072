"""The output head: logits from the final hidden states, and an exact greedy choice that costs about a
third of computing all logits in float32.

Greedy screening: a bfloat16 copy of the head scores every token cheaply; a rigorous bound on how far
each bf16 score can be from its float32 value keeps every token that could still be the float32 argmax;
only those few rows are recomputed in float32. The chosen token is the float32 argmax (first index on
ties), the same choice as computing all float32 logits.
"""

import torch
import torch.nn.functional as F

# |bf16 score - fp32 logit| <= SLACK * |x| * |w_t|: rounding x and w_t to bf16 (2^-8 each), the bf16
# result itself (2^-8 of |x.w_t| <= |x||w_t|), plus float32 accumulation with a wide margin (2^-12).
SLACK = 2**-7 + 2**-8 + 2**-12


class OutputHead:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight                                 # [vocab, hidden], the compute dtype
        self.screen = weight.dtype == torch.float32
        if self.screen:
            self.weight_bf16 = weight.to(torch.bfloat16)     # [vocab, hidden]
            self.row_norms = weight.norm(dim=1)              # [vocab]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> [n, vocab] float32."""
        return F.linear(hidden, self.weight).float()

    def greedy(self, hidden: torch.Tensor, banned: list[tuple[int, ...]] | None = None) -> list[int]:
        """The argmax of logits(hidden) per row, leaving out the row's banned tokens, without computing
        all logits in float32."""
        if not self.screen:
            logits = self.logits(hidden)
            for i, ids in enumerate(banned or ()):
                logits[i, list(ids)] = float("-inf")
            return logits.argmax(dim=-1).tolist()
        scores = F.linear(hidden.to(torch.bfloat16), self.weight_bf16).float()      # [n, vocab]
        slack = SLACK * hidden.norm(dim=1, keepdim=True) * self.row_norms           # [n, vocab]
        low = scores - slack
        for i, ids in enumerate(banned or ()):
            low[i, list(ids)] = float("-inf")
        floor = low.amax(dim=-1, keepdim=True)    # the best allowed token's fp32 logit is at least this
        keep = scores + slack >= floor            # tokens whose fp32 logit may reach it
        for i, ids in enumerate(banned or ()):
            keep[i, list(ids)] = False
        tokens = []
        for i in range(hidden.shape[0]):
            candidates = keep[i].nonzero().squeeze(1)        # ascending, so ties resolve to the first index
            exact = F.linear(hidden[i:i + 1], self.weight.index_select(0, candidates))
            tokens.append(int(candidates[exact.argmax()]))
        return tokens
