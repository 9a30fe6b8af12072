"""loraplex.v1.AdapterService: adapter administration, translated to and from the adapter loader."""

import asyncio
from concurrent.futures import Future

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from ...adapters.loader import AdapterLoader
from ...adapters.registry import AdapterStatus
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
    def __init__(self, adapters: AdapterLoader):
        self.adapters = adapters

    async def ListAdapters(self, request, context):
        statuses = await self._call(context, self.adapters.catalog)
        return pb.ListAdaptersResponse(adapters=[to_info(s) for s in statuses])

    async def GetAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.adapters.describe(_id(request))))

    async def LoadAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.adapters.load(_id(request), request.pin)))

    async def UnloadAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.adapters.unload(_id(request))))

    async def _call(self, context, fn):
        """fn looks at the disk: it runs on an executor thread, off the event loop; a load returns a future
        of the loader's administrative thread, awaited here. Errors are mapped to statuses."""
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, fn)
            return await asyncio.wrap_future(result) if isinstance(result, Future) else result
        except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
            await abort_with(context, exc)


def _id(request) -> str:
    if not request.adapter_id:
        raise InvalidArgumentError("adapter_id", "is empty")
    return request.adapter_id
