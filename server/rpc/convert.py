"""Protobuf messages <-> engine values. No engine logic here."""

from loraplex.v1 import generation_pb2 as pb

from ..engine.request import GenerationRequest, ResponseOptions, SamplingParams, StoppingParams
from ..engine.sequence import RequestOutput
from ..errors import InvalidArgumentError

# The logical request fields (engine/request.py) that the gRPC API nests, by their paths in GenerateRequest.
FIELD_PATHS = {
    **{f: f"params.sampling.{f}" for f in ("temperature", "top_k", "top_p", "seed", "repetition_penalty")},
    **{f: f"params.stopping.{f}" for f in ("max_new_tokens", "min_new_tokens", "stop_sequences",
                                            "include_stop_sequence", "time_limit_millis")},
    **{f: f"params.response.{f}" for f in ("token_logprobs", "top_n_tokens")},
}


def to_request(msg: pb.GenerateRequest, default_max_new_tokens: int) -> GenerationRequest:
    """Raises InvalidArgumentError naming the field at fault."""
    params = msg.params
    s, st, r = params.sampling, params.stopping, params.response
    sampling = SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.top_p != 0 else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.repetition_penalty != 0 else 1.0,
    )
    stopping = StoppingParams(
        max_new_tokens=st.max_new_tokens if st.HasField("max_new_tokens") else default_max_new_tokens,
        min_new_tokens=st.min_new_tokens,
        stop_sequences=tuple(st.stop_sequences),
        include_stop_sequence=st.include_stop_sequence,
        time_limit_millis=st.time_limit_millis,
    )
    response = ResponseOptions(token_logprobs=r.token_logprobs, top_n_tokens=r.top_n_tokens)
    if msg.WhichOneof("prompt") == "messages":
        prompt = tuple({"role": m.role, "content": m.content} for m in msg.messages.messages)
    else:
        prompt = msg.text
    extra = {"request_id": msg.request_id} if msg.request_id else {}
    return GenerationRequest(prompt=prompt, adapter_id=msg.adapter_id, sampling=sampling, stopping=stopping,
                             response=response, truncate_input_tokens=msg.truncate_input_tokens, **extra)


def on_the_wire(exc: Exception, msg: pb.GenerateRequest) -> Exception:
    """exc, naming the field at fault by its path in msg (the prompt is `text` or `messages`)."""
    if not isinstance(exc, InvalidArgumentError):
        return exc
    if exc.field == "prompt":
        return exc.renamed(msg.WhichOneof("prompt") or "text")
    if exc.field.startswith("messages["):
        return exc.renamed("messages." + exc.field)
    return exc.renamed(FIELD_PATHS.get(exc.field, exc.field))


def to_response(out: RequestOutput, text: str | None = None, tokens=None) -> pb.GenerateResponse:
    tokens = out.tokens if tokens is None else tokens
    return pb.GenerateResponse(
        request_id=out.request_id,
        text=out.text if text is None else text,
        input_token_count=out.input_token_count,
        generated_token_count=out.generated_token_count,
        stop_reason=out.stop_reason.value,
        stop_sequence=out.stop_sequence,
        seed=out.seed,
        tokens=[pb.TokenInfo(token_id=t.token_id, text=t.text, logprob=t.logprob,
                             top_tokens=[pb.TopToken(token_id=i, text=s, logprob=lp) for i, s, lp in t.top_tokens])
                for t in tokens],
    )
