"""loraplex.v1.AdapterService: adapter administration translated to and from admin.py (an engine in this
process); cluster/admin.py serves the same service over a cluster's replicas with these translations."""

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from ...adapters.registry import AdapterStatus
from ..admin import AdapterAdmin
from ..engine.weight_sets import MergeStatus
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
    """Over an engine in this process (admin.py); the `replica` field of a request names a cluster replica
    and has no meaning here: it must be empty."""

    def __init__(self, admin: AdapterAdmin):
        self.admin = admin

    async def ListAdapters(self, request, context):
        statuses, merged = await _answer(context, self.admin.catalog)
        return pb.ListAdaptersResponse(adapters=[to_info(s, merged) for s in statuses])

    async def GetAdapter(self, request, context):
        return to_info(*await _answer(context, lambda: self.admin.describe(request.adapter_id)))

    async def LoadAdapter(self, request, context):
        return to_info(*await _answer(context, lambda: self.admin.load(request.adapter_id, request.pin), request))

    async def UnloadAdapter(self, request, context):
        return to_info(*await _answer(context, lambda: self.admin.unload(request.adapter_id), request))

    async def MergeAdapter(self, request, context):
        merge = lambda: self.admin.merge(request.adapter_id, method_name(request))   # noqa: E731
        return to_merge_info(await _answer(context, merge, request))

    async def UnmergeAdapter(self, request, context):
        return to_merge_info(await _answer(context, self.admin.unmerge, request))


def method_name(request) -> str:
    """The merge method a request names; "" = the server's default."""
    if request.method == pb.MERGE_METHOD_UNSPECIFIED:
        return ""
    for name, value in METHODS.items():
        if value == request.method:
            return name
    raise InvalidArgumentError("method", f"{request.method} is not a merge method (DENSE, REQUANTIZE, EXACT)")


async def _answer(context, call, request=None):
    """call()'s result; its error (or a replica named on a single server) ends the RPC with its status."""
    try:
        if request is not None and request.replica:
            raise InvalidArgumentError("replica", f"{request.replica!r}: this server runs no replicas")
        return await call()
    except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
        await abort_with(context, exc)
