from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitChunk(_message.Message):
    __slots__ = ("node", "data", "file", "envelope")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    node: str
    data: bytes
    file: str
    envelope: bytes
    def __init__(self, node: _Optional[str] = ..., data: _Optional[bytes] = ..., file: _Optional[str] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("update_id", "node", "version", "state", "reasons", "approvals", "approvals_needed", "kind", "parent", "parent_version", "candidate_id", "figures", "manifest_digest", "envelope")
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    node: str
    version: int
    state: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    approvals: int
    approvals_needed: int
    kind: str
    parent: str
    parent_version: int
    candidate_id: str
    figures: _containers.ScalarMap[str, float]
    manifest_digest: str
    envelope: bytes
    def __init__(self, update_id: _Optional[str] = ..., node: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., approvals: _Optional[int] = ..., approvals_needed: _Optional[int] = ..., kind: _Optional[str] = ..., parent: _Optional[str] = ..., parent_version: _Optional[int] = ..., candidate_id: _Optional[str] = ..., figures: _Optional[_Mapping[str, float]] = ..., manifest_digest: _Optional[str] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("update_id",)
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    def __init__(self, update_id: _Optional[str] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("update_id", "signature", "key_id")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    signature: bytes
    key_id: str
    def __init__(self, update_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("key_id", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("node", "alias", "to_version", "signatures")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    node: str
    alias: str
    to_version: int
    signatures: _containers.RepeatedCompositeFieldContainer[Signature]
    def __init__(self, node: _Optional[str] = ..., alias: _Optional[str] = ..., to_version: _Optional[int] = ..., signatures: _Optional[_Iterable[_Union[Signature, _Mapping]]] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("node", "alias", "version", "previous_version", "held")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    node: str
    alias: str
    version: int
    previous_version: int
    held: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., previous_version: _Optional[int] = ..., held: _Optional[_Iterable[str]] = ...) -> None: ...
