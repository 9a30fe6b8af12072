"""The front's side of a generation on a cluster: each request goes through the Serve deployment handle to
a replica (replica.py), routed by its adapter id (Serve's model multiplexing; no model id for the base),
and its outputs stream back. The session (session.py) around it is the same as on a single server.

- The rest of the caller's deadline travels with the request; the replica stops the work when it passes.
- A caller that leaves (cancel, deadline, closed stream) cancels the replica's call at once, so the engine
  there aborts the request and frees its KV memory (Ray 2.60: only `response.cancel()` reaches the replica;
  a cancelled consumer alone leaves it running to the end).
- Errors keep the statuses of a single server: a replica's LoraplexError comes back whole; a replica that
  dies mid-stream is UNAVAILABLE (never INTERNAL, never a Ray traceback); full queues are RESOURCE_EXHAUSTED.
"""

import logging

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from ..engine.request import GenerationRequest
from ..errors import InternalError, LoraplexError, ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)


def from_ray(exc: BaseException) -> LoraplexError:
    """The error a client is told for what a Serve call raised."""
    if isinstance(exc, LoraplexError):
        return exc
    if isinstance(exc, ray_errors.RayTaskError) and isinstance(exc.cause, LoraplexError):
        return exc.cause
    if isinstance(exc, serve_errors.BackPressureError):
        return ResourceExhaustedError("every replica's queue is full; retry later").because("queue_full")
    if isinstance(exc, (ray_errors.RayActorError, ray_errors.ActorUnavailableError,
                        serve_errors.DeploymentUnavailableError, serve_errors.ReplicaUnavailableError,
                        serve_errors.RequestCancelledError,
                        ray_errors.RaySystemError)):
        return UnavailableError("the replica serving this request stopped; retry")
    cause = exc.cause if isinstance(exc, ray_errors.RayTaskError) else exc
    log.error("a replica call failed: %s: %s", type(cause).__name__, cause)
    return InternalError(f"internal error in a replica: {type(cause).__name__}")


class ClusterStreams:
    """Generation streams over the deployment handle; `drain` refuses new ones, `idle` tells when the
    running ones are done (the front's SIGTERM, as on a single server)."""

    def __init__(self, handle):
        self.handle = handle
        self.draining = False
        self.running = 0

    async def stream(self, request: GenerationRequest, timeout: float | None = None, incremental: bool = True):
        """incremental=False makes one call that returns every output at the end: Ray sets up a stream at
        ~7 ms and each item at ~1 ms here, so a unary Generate would pay for what nobody reads."""
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another replica")
        options = {"stream": incremental}
        if request.adapter_id:
            options["multiplexed_model_id"] = request.adapter_id
        self.running += 1
        handle = self.handle.options(**options)
        response = (handle.generate if incremental else handle.generate_whole).remote(request, timeout)
        try:
            async for item in response if incremental else _items(await response):
                if isinstance(item, BaseException):
                    raise item
                yield item
        except LoraplexError:
            raise
        except Exception as exc:   # noqa: BLE001 - whatever Ray raised, mapped to a status
            raise from_ray(exc) from None
        finally:
            self.running -= 1
            response.cancel()   # harmless after the end; stops the replica's work when the caller left

    def drain(self) -> None:
        self.draining = True

    def idle(self) -> bool:
        return self.running == 0


async def _items(outputs: list):
    for item in outputs:
        yield item


class ClusterFacts:
    """ModelInfo, the adapters and Tokenize, answered by a replica (every replica serves the same model and
    reads the same adapter directories)."""

    def __init__(self, handle):
        self.handle = handle
        self.cached: dict | None = None

    async def describe(self) -> dict:
        if self.cached is None:
            facts = await self._call(self.handle.describe.remote())
            facts.pop("replica_id", None)
            self.cached = facts
        return self.cached

    async def adapter_ids(self) -> list[str]:
        return await self._call(self.handle.adapter_ids.remote())

    async def tokenize(self, text: str, return_tokens: bool):
        result = await self._call(self.handle.tokenize.remote(text, return_tokens))
        if isinstance(result, BaseException):
            raise result
        return result

    @staticmethod
    async def _call(response):
        try:
            return await response
        except Exception as exc:   # noqa: BLE001
            raise from_ray(exc) from None
