from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterCacheCounters(_message.Message):
    __slots__ = ("hits", "misses", "loads", "evictions", "active", "host", "host_bytes")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    loads: int
    evictions: int
    active: int
    host: int
    host_bytes: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., active: _Optional[int] = ..., host: _Optional[int] = ..., host_bytes: _Optional[int] = ...) -> None: ...

class Trunk(_message.Message):
    __slots__ = ("tree", "base_digest", "loaded_adapters", "queue_depth", "running", "max_batch", "cache")
    TREE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    tree: str
    base_digest: str
    loaded_adapters: _containers.RepeatedScalarFieldContainer[str]
    queue_depth: int
    running: int
    max_batch: int
    cache: AdapterCacheCounters
    def __init__(self, tree: _Optional[str] = ..., base_digest: _Optional[str] = ..., loaded_adapters: _Optional[_Iterable[str]] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., max_batch: _Optional[int] = ..., cache: _Optional[_Union[AdapterCacheCounters, _Mapping]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "auth_enabled", "tenant", "trunks", "in_flight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    AUTH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRUNKS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    auth_enabled: bool
    tenant: str
    trunks: _containers.RepeatedCompositeFieldContainer[Trunk]
    in_flight: int
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., auth_enabled: _Optional[bool] = ..., tenant: _Optional[str] = ..., trunks: _Optional[_Iterable[_Union[Trunk, _Mapping]]] = ..., in_flight: _Optional[int] = ...) -> None: ...

class RetireNodeRequest(_message.Message):
    __slots__ = ("node", "force")
    NODE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    node: str
    force: bool
    def __init__(self, node: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RetireNodeResponse(_message.Message):
    __slots__ = ("node", "retired")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    node: str
    retired: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., retired: _Optional[_Iterable[str]] = ...) -> None: ...
