"""loraplex.v1.GenerationService: translates messages to and from the request session (session.py), which
runs them on an engine in this process or on a cluster's replicas, and maps errors to statuses."""

import logging

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

from ..errors import InvalidArgumentError
from ..outcome import Arrival
from ..session import RequestSession
from .convert import on_the_wire, to_request, to_response
from .errors import abort_with

log = logging.getLogger(__name__)


class GenerationService(pb_grpc.GenerationServiceServicer):
    """`model` answers ModelInfo and Tokenize (a ModelFacts, see facts.py)."""

    def __init__(self, session: RequestSession, model, default_max_new_tokens: int):
        self.session = session
        self.model = model
        self.default_max_new_tokens = default_max_new_tokens

    async def Generate(self, request, context):
        text, tokens, last = [], [], None
        async for out in self._run(request, context, incremental=False):
            text.append(out.text)
            tokens.extend(out.tokens)
            last = out
        return to_response(last, "".join(text), tokens)

    async def GenerateStream(self, request, context):
        async for out in self._run(request, context):
            if out.text or out.tokens or out.finished:
                yield to_response(out)

    async def _run(self, request, context, incremental: bool = True):
        """Yields the request's outputs; aborts the RPC with the mapped status on any error."""
        arrival = Arrival(request.request_id, request.adapter_id, _prompt_of(request))
        outputs = self.session.run(arrival, lambda: to_request(request, self.default_max_new_tokens),
                                   context.time_remaining, incremental)
        try:
            async for out in outputs:
                yield out
        except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
            await abort_with(context, on_the_wire(exc, request))

    async def Tokenize(self, request, context):
        if not request.text:
            await abort_with(context, InvalidArgumentError("text", "is empty"))
        try:
            ids, tokens = await self.model.tokenize(request.text, request.return_tokens)
        except Exception as exc:   # noqa: BLE001
            await abort_with(context, exc)
        return pb.TokenizeResponse(token_count=len(ids), token_ids=ids, tokens=tokens)

    async def ModelInfo(self, request, context):
        try:
            facts = await self.model.describe()
        except Exception as exc:   # noqa: BLE001
            await abort_with(context, exc)
        return pb.ModelInfoResponse(**facts)


def _prompt_of(request):
    if request.WhichOneof("prompt") == "messages":
        return [(m.role, m.content) for m in request.messages.messages]
    return request.text
