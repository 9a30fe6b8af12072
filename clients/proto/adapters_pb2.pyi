from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MergeMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_METHOD_UNSPECIFIED: _ClassVar[MergeMethod]
    DENSE: _ClassVar[MergeMethod]
    REQUANTIZE: _ClassVar[MergeMethod]
    EXACT: _ClassVar[MergeMethod]

class MergeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_STATE_UNSPECIFIED: _ClassVar[MergeState]
    MERGING: _ClassVar[MergeState]
    MERGED: _ClassVar[MergeState]
    UNMERGED: _ClassVar[MergeState]

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ON_DISK: _ClassVar[AdapterState]
    LOADED: _ClassVar[AdapterState]
    UNLOADED: _ClassVar[AdapterState]

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    DISK: _ClassVar[AdapterTier]
    HOST: _ClassVar[AdapterTier]
    DEVICE: _ClassVar[AdapterTier]
MERGE_METHOD_UNSPECIFIED: MergeMethod
DENSE: MergeMethod
REQUANTIZE: MergeMethod
EXACT: MergeMethod
MERGE_STATE_UNSPECIFIED: MergeState
MERGING: MergeState
MERGED: MergeState
UNMERGED: MergeState
ADAPTER_STATE_UNSPECIFIED: AdapterState
ON_DISK: AdapterState
LOADED: AdapterState
UNLOADED: AdapterState
ADAPTER_TIER_UNSPECIFIED: AdapterTier
DISK: AdapterTier
HOST: AdapterTier
DEVICE: AdapterTier

class MergeInfo(_message.Message):
    __slots__ = ("adapter_id", "state", "method", "version", "retained", "retained_by_layer", "size_bytes", "seconds", "warning")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    RETAINED_BY_LAYER_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    state: MergeState
    method: MergeMethod
    version: int
    retained: float
    retained_by_layer: _containers.RepeatedScalarFieldContainer[float]
    size_bytes: int
    seconds: float
    warning: str
    def __init__(self, adapter_id: _Optional[str] = ..., state: _Optional[_Union[MergeState, str]] = ..., method: _Optional[_Union[MergeMethod, str]] = ..., version: _Optional[int] = ..., retained: _Optional[float] = ..., retained_by_layer: _Optional[_Iterable[float]] = ..., size_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., warning: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "state", "tier", "version", "rank", "ranks", "alpha", "target_modules", "format", "size_bytes", "error", "pinned", "running_requests", "merge", "replicas", "by_replica")
    class RanksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    BY_REPLICA_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    state: AdapterState
    tier: AdapterTier
    version: int
    rank: int
    ranks: _containers.ScalarMap[str, int]
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    format: str
    size_bytes: int
    error: str
    pinned: bool
    running_requests: int
    merge: MergeInfo
    replicas: _containers.RepeatedScalarFieldContainer[str]
    by_replica: _containers.RepeatedCompositeFieldContainer[ReplicaAdapter]
    def __init__(self, adapter_id: _Optional[str] = ..., state: _Optional[_Union[AdapterState, str]] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., version: _Optional[int] = ..., rank: _Optional[int] = ..., ranks: _Optional[_Mapping[str, int]] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., format: _Optional[str] = ..., size_bytes: _Optional[int] = ..., error: _Optional[str] = ..., pinned: _Optional[bool] = ..., running_requests: _Optional[int] = ..., merge: _Optional[_Union[MergeInfo, _Mapping]] = ..., replicas: _Optional[_Iterable[str]] = ..., by_replica: _Optional[_Iterable[_Union[ReplicaAdapter, _Mapping]]] = ...) -> None: ...

class ReplicaAdapter(_message.Message):
    __slots__ = ("replica_id", "state", "tier", "version", "pinned", "running_requests")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: AdapterState
    tier: AdapterTier
    version: int
    pinned: bool
    running_requests: int
    def __init__(self, replica_id: _Optional[str] = ..., state: _Optional[_Union[AdapterState, str]] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., version: _Optional[int] = ..., pinned: _Optional[bool] = ..., running_requests: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "pin", "replica")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    pin: bool
    replica: str
    def __init__(self, adapter_id: _Optional[str] = ..., pin: _Optional[bool] = ..., replica: _Optional[str] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "replica")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    replica: str
    def __init__(self, adapter_id: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class MergeAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "method", "replica")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    method: MergeMethod
    replica: str
    def __init__(self, adapter_id: _Optional[str] = ..., method: _Optional[_Union[MergeMethod, str]] = ..., replica: _Optional[str] = ...) -> None: ...

class UnmergeAdapterRequest(_message.Message):
    __slots__ = ("replica",)
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica: str
    def __init__(self, replica: _Optional[str] = ...) -> None: ...
