import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "tree", "path", "level", "parent", "language", "domain", "subdomain", "tags", "visibility", "owner", "aliases")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SUBDOMAIN_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    id: str
    tree: str
    path: str
    level: str
    parent: str
    language: str
    domain: str
    subdomain: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    visibility: str
    owner: str
    aliases: _containers.ScalarMap[str, int]
    def __init__(self, id: _Optional[str] = ..., tree: _Optional[str] = ..., path: _Optional[str] = ..., level: _Optional[str] = ..., parent: _Optional[str] = ..., language: _Optional[str] = ..., domain: _Optional[str] = ..., subdomain: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., visibility: _Optional[str] = ..., owner: _Optional[str] = ..., aliases: _Optional[_Mapping[str, int]] = ...) -> None: ...

class NodeVersion(_message.Message):
    __slots__ = ("node", "version", "parent_version", "status", "manifest_digest", "metrics", "created_at", "aliases")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: int
    parent_version: int
    status: str
    manifest_digest: str
    metrics: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., status: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[NodeVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[NodeVersion, _Mapping]]] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("task", "device", "memory", "context", "batch", "top", "bandwidth", "compute", "tags", "tree", "dtype")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    task: str
    device: str
    memory: str
    context: int
    batch: int
    top: int
    bandwidth: str
    compute: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    tree: str
    dtype: str
    def __init__(self, task: _Optional[str] = ..., device: _Optional[str] = ..., memory: _Optional[str] = ..., context: _Optional[int] = ..., batch: _Optional[int] = ..., top: _Optional[int] = ..., bandwidth: _Optional[str] = ..., compute: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., tree: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class MatchCandidate(_message.Message):
    __slots__ = ("node", "version", "variant", "fit", "memory_bytes", "score", "reasons", "tokens_per_s")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: int
    variant: str
    fit: str
    memory_bytes: int
    score: float
    reasons: _containers.RepeatedScalarFieldContainer[str]
    tokens_per_s: float
    def __init__(self, node: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., fit: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., score: _Optional[float] = ..., reasons: _Optional[_Iterable[str]] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class MatchSuggestion(_message.Message):
    __slots__ = ("kind", "message", "node", "variant", "context", "fit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    node: str
    variant: str
    context: int
    fit: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., node: _Optional[str] = ..., variant: _Optional[str] = ..., context: _Optional[int] = ..., fit: _Optional[str] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("candidates", "suggestions")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[MatchCandidate]
    suggestions: _containers.RepeatedCompositeFieldContainer[MatchSuggestion]
    def __init__(self, candidates: _Optional[_Iterable[_Union[MatchCandidate, _Mapping]]] = ..., suggestions: _Optional[_Iterable[_Union[MatchSuggestion, _Mapping]]] = ...) -> None: ...
