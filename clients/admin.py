"""Client of loraplex.v1.AdapterService: list, show, load (optionally pinned), unload, merge and unmerge
adapters."""

from dataclasses import dataclass

import grpc

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from .client import DEFAULT_TARGET, _typed_errors


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    state: str            # ON_DISK, LOADED, UNLOADED
    tier: str             # DISK, HOST, DEVICE
    version: int
    rank: int
    ranks: dict
    alpha: float
    target_modules: tuple
    format: str
    size_bytes: int
    pinned: bool
    running_requests: int
    merge: "MergeInfo | None" = None     # while this adapter is merged
    replicas: tuple = ()                 # on a cluster: the replica ids holding it in memory


@dataclass(frozen=True)
class MergeInfo:
    adapter_id: str
    state: str            # MERGING, MERGED, UNMERGED
    method: str           # DENSE, REQUANTIZE, EXACT
    version: int
    retained: float       # share of the adapter's update the merged weights keep
    retained_by_layer: tuple
    size_bytes: int       # memory of the merged copy, beside the base weights
    seconds: float
    warning: str


def _info(message: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(message.adapter_id, pb.AdapterState.Name(message.state), pb.AdapterTier.Name(message.tier),
                       message.version, message.rank, dict(message.ranks), message.alpha,
                       tuple(message.target_modules), message.format, message.size_bytes, message.pinned,
                       message.running_requests, _merge_info(message.merge) if message.HasField("merge") else None,
                       tuple(message.replicas))


def _merge_info(message: pb.MergeInfo) -> MergeInfo:
    return MergeInfo(message.adapter_id, pb.MergeState.Name(message.state), pb.MergeMethod.Name(message.method),
                     message.version, round(message.retained, 6), tuple(round(r, 6) for r in message.retained_by_layer),
                     message.size_bytes, round(message.seconds, 3), message.warning)


class AdapterAdmin:
    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = pb_grpc.AdapterServiceStub(self._channel)
        self._kw = {"timeout": timeout, "metadata": (("authorization", f"Bearer {token}"),) if token else None}

    def list(self) -> list[AdapterInfo]:
        with _typed_errors():
            return [_info(a) for a in self._stub.ListAdapters(pb.ListAdaptersRequest(), **self._kw).adapters]

    def get(self, adapter_id: str) -> AdapterInfo:
        with _typed_errors():
            return _info(self._stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), **self._kw))

    # replica: on a cluster front, the one replica (its id) to change; "" = every replica

    def load(self, adapter_id: str, pin: bool = False, replica: str = "") -> AdapterInfo:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, pin=pin, replica=replica)
        with _typed_errors():
            return _info(self._stub.LoadAdapter(request, **self._kw))

    def unload(self, adapter_id: str, replica: str = "") -> AdapterInfo:
        with _typed_errors():
            return _info(self._stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id, replica=replica),
                                                  **self._kw))

    def merge(self, adapter_id: str, method: str | None = None, replica: str = "") -> MergeInfo:
        """method: "dense", "requantize", "exact", or None for the server's --merge-method."""
        value = pb.MERGE_METHOD_UNSPECIFIED if method is None else pb.MergeMethod.Value(method.upper())
        request = pb.MergeAdapterRequest(adapter_id=adapter_id, method=value, replica=replica)
        with _typed_errors():
            return _merge_info(self._stub.MergeAdapter(request, **self._kw))

    def unmerge(self, replica: str = "") -> MergeInfo:
        with _typed_errors():
            return _merge_info(self._stub.UnmergeAdapter(pb.UnmergeAdapterRequest(replica=replica), **self._kw))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AdapterAdmin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_dict(info) -> dict:
    """An AdapterInfo or MergeInfo as JSON-ready values."""
    return {k: (list(v) if isinstance(v, tuple) else as_dict(v) if isinstance(v, MergeInfo) else v)
            for k, v in info.__dict__.items()}


__all__ = ["AdapterAdmin", "AdapterInfo", "MergeInfo", "as_dict"]
