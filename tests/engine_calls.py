"""Calling an in-process engine directly: requests added between two steps of its loop, so that they are
scheduled together, and their outputs collected."""

import queue

from loraplex.server.engine.request import GenerationRequest, SamplingParams, StoppingParams


def run_together(engine, requests: list[GenerationRequest], timeout: float = 120) -> dict[str, list]:
    """Adds every request between two steps of the loop (so that they are prefilled in one step when they
    fit) and returns each request's outputs, by request id."""
    outputs = {r.request_id: queue.Queue() for r in requests}
    engine.between_steps(lambda: [engine.add_request(r, outputs[r.request_id].put) for r in requests])
    collected = {}
    for request_id, q in outputs.items():
        collected[request_id] = [q.get(timeout=timeout)]
        while not collected[request_id][-1].finished:
            collected[request_id].append(q.get(timeout=timeout))
    return collected


def exact_request(prompt: str, new_tokens: int, adapter_id: str = "", **sampling) -> GenerationRequest:
    """A request for exactly new_tokens tokens (no early EOS), with its token ids in the outputs."""
    from loraplex.server.engine.request import ResponseOptions
    return GenerationRequest(prompt, adapter_id=adapter_id, sampling=SamplingParams(**sampling),
                             stopping=StoppingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                             response=ResponseOptions(token_logprobs=True))


def token_ids(outputs: list) -> list[int]:
    return [t.token_id for out in outputs for t in out.tokens]


def tokens_and_logprobs(outputs: list) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for out in outputs for t in out.tokens]
