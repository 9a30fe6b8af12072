"""loraplex.v1.AdapterService: adapter administration, translated to and from the registry."""

import asyncio

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from ...adapters.registry import AdapterRegistry, AdapterStatus
from ..errors import InvalidArgumentError
from .errors import abort_with

STATES = {"on_disk": pb.ON_DISK, "loaded": pb.LOADED, "unloaded": pb.UNLOADED}
TIERS = {"disk": pb.DISK, "host": pb.HOST, "device": pb.DEVICE}


def to_info(status: AdapterStatus) -> pb.AdapterInfo:
    return pb.AdapterInfo(adapter_id=status.adapter_id, state=STATES[status.state], tier=TIERS[status.tier],
                          version=status.version, rank=status.rank, ranks=status.ranks, alpha=status.alpha,
                          target_modules=list(status.target_modules), format=status.format,
                          size_bytes=status.size_bytes, pinned=status.pinned,
                          running_requests=status.running_requests)


class AdapterService(pb_grpc.AdapterServiceServicer):
    def __init__(self, registry: AdapterRegistry, loader=None):
        self.registry = registry
        self.loader = loader          # runs loads on the adapter loader thread, beside slot jobs

    async def ListAdapters(self, request, context):
        statuses = await self._call(context, self.registry.catalog)
        return pb.ListAdaptersResponse(adapters=[to_info(s) for s in statuses])

    async def GetAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.registry.describe(_id(request))))

    async def LoadAdapter(self, request, context):
        load = lambda: self.registry.load(_id(request), request.pin)   # noqa: E731
        return to_info(await self._call(context, load, on_loader=True))

    async def UnloadAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.registry.unload(_id(request))))

    async def _call(self, context, fn, on_loader: bool = False):
        """Registry calls may read files: run them off the event loop (loads on the adapter loader thread,
        the rest on an executor thread); map errors to statuses."""
        try:
            if on_loader and self.loader is not None:
                return await asyncio.wrap_future(self.loader.call(fn))
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
            await abort_with(context, exc)


def _id(request) -> str:
    if not request.adapter_id:
        raise InvalidArgumentError("adapter_id", "is empty")
    return request.adapter_id
