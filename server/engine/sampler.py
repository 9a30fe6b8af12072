"""Picks each sequence's next token from its logits: greedy, or temperature / top-k / top-p sampling
with the sequence's own seeded generator; repetition penalty and min_new_tokens apply before either.

Reported logprobs are of the model's distribution after the repetition penalty, before temperature,
top-k and top-p (the distribution the request's sampling settings reshape).
"""

from dataclasses import dataclass, field

import torch

from ..model.lm_head import OutputHead
from .sequence import Sequence


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[float] | None = None                          # per sequence, of the chosen token
    top: list[list[tuple[int, float]]] | None = None             # per sequence, the n most likely
    failed: dict[int, Exception] = field(default_factory=dict)   # sequence index -> why it got no token


def pick(head: OutputHead, hidden: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> Sampled:
    """Next tokens for a batch from its final hidden states [batch, hidden]: rows that only need the
    greedy choice take the output head's exact screened argmax; the others get full float32 logits."""
    plain = [i for i, seq in enumerate(seqs) if not _needs_distribution(seq)]
    full = [i for i, seq in enumerate(seqs) if _needs_distribution(seq)]
    tokens, logprobs, top = [0] * len(seqs), [0.0] * len(seqs), [[] for _ in seqs]
    if plain:
        banned = [eos_ids if _eos_banned(seqs[i]) else () for i in plain]
        for i, token in zip(plain, head.greedy(hidden[plain], banned)):
            tokens[i] = token
    if full:
        sampled = sample(head.logits(hidden[full]), [seqs[i] for i in full], eos_ids)
        for j, i in enumerate(full):
            tokens[i] = sampled.token_ids[j]
            if sampled.logprobs is not None:
                logprobs[i], top[i] = sampled.logprobs[j], sampled.top[j]
        failed = {full[j]: exc for j, exc in sampled.failed.items()}
    return Sampled(tokens, logprobs, top, failed if full else {})


def _needs_distribution(seq: Sequence) -> bool:
    request = seq.request
    return (not request.sampling.greedy or request.sampling.repetition_penalty != 1.0
            or request.response.token_logprobs or request.response.top_n_tokens > 0)


def _eos_banned(seq: Sequence) -> bool:
    return len(seq.output_ids) < seq.request.stopping.min_new_tokens


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> Sampled:
    """logits: [batch, vocab] float32, row i for seqs[i]; modified in place. Sampling runs on the CPU,
    where each sequence's seeded generator lives (so a seed gives the same tokens on any device)."""
    logits = logits.cpu()
    tokens, failed = [0] * len(seqs), {}
    for i, seq in enumerate(seqs):
        try:      # one sequence's failure ends that sequence alone, never the step
            tokens[i] = _choose(logits[i], seq, eos_ids)
        except (RuntimeError, ValueError) as exc:
            failed[i] = exc
    want_logprobs = any(s.request.response.token_logprobs or s.request.response.top_n_tokens for s in seqs)
    if not want_logprobs:
        return Sampled(tokens, failed=failed)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs[torch.arange(len(seqs)), torch.tensor(tokens)].tolist()
    top = []
    for i, seq in enumerate(seqs):
        n = seq.request.response.top_n_tokens
        values, ids = logprobs[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        top.append(list(zip(ids.tolist(), values.tolist())))
    return Sampled(tokens, chosen, top, failed)


def _choose(row: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> int:
    _penalize(row, seq, eos_ids)
    if not (row.isfinite() | row.isneginf()).all() or row.isneginf().all():
        raise ValueError("the model's scores for this request are not finite")
    return int(row.argmax()) if seq.request.sampling.greedy else _draw(row, seq)


def _penalize(row: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> None:
    params = seq.request.sampling
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_ids())), dtype=torch.long)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if _eos_banned(seq) and eos_ids:
        row[list(eos_ids)] = float("-inf")


def _draw(row: torch.Tensor, seq: Sequence) -> int:
    params = seq.request.sampling
    scores = row / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p; the first token always stays
        drop = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
