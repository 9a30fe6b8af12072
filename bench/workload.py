"""The benchmark's inputs (fixed prompts, equal-length decode prompts, a Poisson request stream) and the
latency/throughput summary both peers share."""

import random
from dataclasses import dataclass

import numpy as np

# Online prompts: 20 to 60 tokens each with the SmolLM2 tokenizer.
PROMPTS = (
    "Write a short poem about a lighthouse keeper who waits for a ship that never arrives, using simple words.",
    "Summarize the following idea: a city that plants a tree for every child born there will, after fifty years, "
    "have a forest inside its streets.",
    "You are a helpful assistant. A customer says their order arrived damaged and they want a refund. "
    "Reply politely and explain the next steps they should take.",
    "List five practical tips for someone who is learning to cook at home for the first time and has a small budget.",
    "Describe the water cycle to a ten year old, mentioning evaporation, condensation, precipitation and collection, "
    "and keep each step to one sentence.",
    "Translate the meaning of this sentence into plain English: the committee deferred the motion pending further "
    "review of the fiscal implications.",
    "Write the opening paragraph of a mystery story set on a night train crossing the mountains in winter, where the "
    "lights go out just after midnight and a passenger disappears.",
    "Give three arguments for and three arguments against working from home, then say which side you find more "
    "convincing and why.",
    "Explain what a hash table is, how collisions are handled, and why lookups are fast on average.",
    "A farmer has seventeen sheep and all but nine run away. How many sheep are left? Explain your reasoning step by "
    "step before giving the final answer.",
    "Draft a friendly email to a neighbour asking whether they could water your plants for a week while you are "
    "away on holiday in the mountains, and offer something in return.",
    "Here is a note from a project meeting: the release slipped by two weeks because the database migration failed "
    "in staging, the team agreed to add a rollback script, and QA asked for one more test cycle. Rewrite it as three "
    "clear bullet points for the manager.",
    "Plan a relaxed three day visit to a coastal town for two people who like walking, seafood and old churches but "
    "dislike crowds. For each day give a morning, an afternoon and an evening idea, with one sentence each, and "
    "mention one rainy day alternative.",
    "What are the main differences between a comet, an asteroid and a meteor? Answer in a short paragraph.",
)

# Decode prompts: this text plus a per-request tail, truncated (by both peers) to its last N tokens.
_DECODE_BASE = ("The old library at the edge of town kept its doors open late into the evening, and the people who "
                "came there after work found quiet tables, warm lamps and shelves of books about distant places. ")


def decode_prompts(batch: int) -> list[str]:
    """Distinct texts; each is long enough that its last 40 tokens are all text, not the tail alone."""
    return [f"{_DECODE_BASE}This is reader number {i + 1} of the evening." for i in range(batch)]


def last_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The ids the engine feeds for `text` with truncate_input_tokens=n."""
    from loraplex.server.engine.prompt import encode_prompt, truncate

    return truncate(encode_prompt(tokenizer, text), n)


@dataclass(frozen=True)
class OnlineRequest:
    index: int
    arrival: float      # seconds after the first request
    prompt: str
    output_len: int     # min_new_tokens = max_new_tokens = output_len


def poisson_stream(n: int, rate: float, seed: int, min_out: int, max_out: int) -> list[OnlineRequest]:
    """n requests, exponential gaps with mean 1/rate (the first at 0), prompts drawn from PROMPTS,
    output lengths uniform in [min_out, max_out]."""
    rng = random.Random(seed)
    stream, t = [], 0.0
    for i in range(n):
        stream.append(OnlineRequest(i, t, PROMPTS[rng.randrange(len(PROMPTS))], rng.randint(min_out, max_out)))
        t += rng.expovariate(rate)
    return stream


def summarize(arrivals: list[float], token_times: list[list[float]]) -> dict:
    """Online metrics from each request's arrival and the times its tokens came out (one clock)."""
    for i, times in enumerate(token_times):
        if not times:
            raise RuntimeError(f"request {i} produced no tokens")
    ttft = np.array([times[0] - a for a, times in zip(arrivals, token_times)])
    itl = np.concatenate([np.diff(times) for times in token_times])
    e2e = np.array([times[-1] - a for a, times in zip(arrivals, token_times)])
    tokens = sum(len(times) for times in token_times)
    makespan = max(times[-1] for times in token_times) - min(arrivals)
    return {
        "output_tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
        "e2e_p50_s": float(np.percentile(e2e, 50)), "e2e_p99_s": float(np.percentile(e2e, 99)),
    }
