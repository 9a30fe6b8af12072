"""loraplex.v1.AdapterService: adapter administration, translated to and from the adapter loader and the
engine's weight sets (merges)."""

import asyncio
from concurrent.futures import Future

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from ...adapters.loader import AdapterLoader
from ...adapters.registry import AdapterStatus
from ..engine.weight_sets import MergeStatus, WeightSets
from ..errors import InvalidArgumentError
from .errors import abort_with

STATES = {"on_disk": pb.ON_DISK, "loaded": pb.LOADED, "unloaded": pb.UNLOADED}
TIERS = {"disk": pb.DISK, "host": pb.HOST, "device": pb.DEVICE}
METHODS = {"dense": pb.DENSE, "requantize": pb.REQUANTIZE, "exact": pb.EXACT}
MERGE_STATES = {"merging": pb.MERGING, "merged": pb.MERGED, "unmerged": pb.UNMERGED}


def to_info(status: AdapterStatus, merged: MergeStatus | None = None) -> pb.AdapterInfo:
    info = pb.AdapterInfo(adapter_id=status.adapter_id, state=STATES[status.state], tier=TIERS[status.tier],
                          version=status.version, rank=status.rank, ranks=status.ranks, alpha=status.alpha,
                          target_modules=list(status.target_modules), format=status.format,
                          size_bytes=status.size_bytes, pinned=status.pinned,
                          running_requests=status.running_requests)
    if merged is not None and merged.adapter_id == status.adapter_id:
        info.merge.CopyFrom(to_merge_info(merged))
    return info


def to_merge_info(status: MergeStatus) -> pb.MergeInfo:
    return pb.MergeInfo(adapter_id=status.adapter_id, state=MERGE_STATES[status.state],
                        method=METHODS.get(status.method, pb.MERGE_METHOD_UNSPECIFIED), version=status.version,
                        retained=status.retained, retained_by_layer=status.retained_by_layer,
                        size_bytes=status.size_bytes, seconds=status.seconds, warning=status.warning)


class AdapterService(pb_grpc.AdapterServiceServicer):
    def __init__(self, adapters: AdapterLoader, weights: WeightSets, default_method: str):
        self.adapters = adapters
        self.weights = weights
        self.default_method = default_method

    async def ListAdapters(self, request, context):
        statuses = await self._call(context, self.adapters.catalog)
        merged = self.weights.status()
        return pb.ListAdaptersResponse(adapters=[to_info(s, merged) for s in statuses])

    async def GetAdapter(self, request, context):
        return to_info(await self._call(context, lambda: self.adapters.describe(_id(request))), self.weights.status())

    async def LoadAdapter(self, request, context):
        status = await self._call(context, lambda: self.adapters.load(_id(request), request.pin))
        return to_info(status, self.weights.status())

    async def UnloadAdapter(self, request, context):
        def unload():
            self.weights.unmerge_if(_id(request))
            return self.adapters.unload(_id(request))
        return to_info(await self._call(context, unload))

    async def MergeAdapter(self, request, context):
        return to_merge_info(await self._call(context, lambda: self.weights.merge(_id(request), self._method(request))))

    async def UnmergeAdapter(self, request, context):
        return to_merge_info(await self._call(context, self.weights.unmerge))

    def _method(self, request) -> str:
        if request.method == pb.MERGE_METHOD_UNSPECIFIED:
            return self.default_method
        for name, value in METHODS.items():
            if value == request.method:
                return name
        raise InvalidArgumentError("method", f"{request.method} is not a merge method (DENSE, REQUANTIZE, EXACT)")

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
