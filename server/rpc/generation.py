"""loraplex.v1.GenerationService: translates messages, hands requests to the engine, streams back."""

import asyncio
import logging

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

from ..build import ModelDescription
from ..engine.engine import Engine
from ..engine.sequence import RequestOutput
from ..errors import InvalidArgumentError
from ..metrics import NO_METRICS, Metrics
from .convert import to_request, to_response
from .errors import abort_with
from .request_log import RequestLog

log = logging.getLogger(__name__)


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, engine: Engine, model: ModelDescription, default_max_new_tokens: int, max_batch_size: int,
                 log_prompts: bool = False, metrics: Metrics = NO_METRICS):
        self.engine = engine
        self.log_prompts = log_prompts
        self.metrics = metrics
        self.model = model
        self.default_max_new_tokens = default_max_new_tokens
        self.max_batch_size = max_batch_size

    async def Generate(self, request, context):
        text, tokens, last = [], [], None
        async for out in self._run(request, context):
            text.append(out.text)
            tokens.extend(out.tokens)
            last = out
        return to_response(last, "".join(text), tokens)

    async def GenerateStream(self, request, context):
        async for out in self._run(request, context):
            if out.text or out.tokens or out.finished:
                yield to_response(out)

    async def _run(self, request, context):
        """Yields the request's outputs; aborts the RPC with the mapped status on any engine error."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        record = RequestLog(request, self.log_prompts, self.metrics)
        try:
            req = to_request(request, self.default_max_new_tokens)
            sink = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)   # noqa: E731
            await self._add(req, sink)
        except asyncio.CancelledError:   # the client left (cancel, deadline) before the engine took it
            record.abandoned(context.time_remaining())
            raise
        except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
            record.failed(exc)
            await abort_with(context, exc)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                record.output(out)
                if out.error is not None:
                    finished = True
                    record.failed(out.error)
                    await abort_with(context, out.error)
                finished = out.finished
                if finished:
                    record.succeeded(out.stop_reason.name)
                yield out
        finally:
            if not finished:   # the client went away (cancel, deadline): free its memory now
                record.abandoned(context.time_remaining())
                self.engine.abort(req.request_id)

    async def _add(self, req, sink) -> None:
        """Engine.add_request on an executor thread: it tokenizes the prompt and checks the adapter id on
        disk. A thread cannot be stopped: if the client leaves meanwhile, the request is aborted once added."""
        added = asyncio.get_running_loop().run_in_executor(None, self.engine.add_request, req, sink)
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:
            added.add_done_callback(lambda f: f.exception() is None and self.engine.abort(req.request_id))
            raise

    async def Tokenize(self, request, context):
        if not request.text:
            await abort_with(context, InvalidArgumentError("text", "is empty"))
        try:
            # ~1.5 s per MB of text: on an executor thread, so the event loop keeps streaming meanwhile
            return await asyncio.get_running_loop().run_in_executor(None, self._tokenize, request)
        except Exception as exc:   # noqa: BLE001
            await abort_with(context, exc)

    def _tokenize(self, request) -> pb.TokenizeResponse:
        ids = self.engine.tokenizer.encode(request.text)
        tokens = self.engine.tokenizer.convert_ids_to_tokens(ids) if request.return_tokens else []
        return pb.TokenizeResponse(token_count=len(ids), token_ids=ids, tokens=tokens)

    async def ModelInfo(self, request, context):
        m, runner = self.model, self.engine.runner
        return pb.ModelInfoResponse(
            model_name=m.name, architecture=m.architecture, max_sequence_length=m.max_sequence_length,
            max_new_tokens=self.engine.limits.max_new_tokens, quantization=m.quantization,
            compute_dtype=m.dtype, device=m.device, vocab_size=m.vocab_size,
            kv_cache_tokens=runner.num_blocks * runner.block_size, max_batch_size=self.max_batch_size)
