from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferRequest(_message.Message):
    __slots__ = ("node", "version", "variant")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: int
    variant: str
    def __init__(self, node: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ...) -> None: ...

class VariantOffer(_message.Message):
    __slots__ = ("manifest", "delegation", "requires", "stable_note")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    STABLE_NOTE_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    delegation: bytes
    requires: VariantOffer
    stable_note: str
    def __init__(self, manifest: _Optional[bytes] = ..., delegation: _Optional[bytes] = ..., requires: _Optional[_Union[VariantOffer, _Mapping]] = ..., stable_note: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("node", "key", "file", "offset", "length")
    NODE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    node: str
    key: str
    file: str
    offset: int
    length: int
    def __init__(self, node: _Optional[str] = ..., key: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrustRequest(_message.Message):
    __slots__ = ("tree",)
    TREE_FIELD_NUMBER: _ClassVar[int]
    tree: str
    def __init__(self, tree: _Optional[str] = ...) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("root_keys", "root_threshold", "delegation")
    ROOT_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROOT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_FIELD_NUMBER: _ClassVar[int]
    root_keys: _containers.RepeatedScalarFieldContainer[bytes]
    root_threshold: int
    delegation: bytes
    def __init__(self, root_keys: _Optional[_Iterable[bytes]] = ..., root_threshold: _Optional[int] = ..., delegation: _Optional[bytes] = ...) -> None: ...
