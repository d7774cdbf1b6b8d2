from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("response_id", "rating", "correction", "tags")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    rating: int
    correction: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, response_id: _Optional[str] = ..., rating: _Optional[int] = ..., correction: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedbackRecord(_message.Message):
    __slots__ = ("id", "response_id", "node", "version", "rating", "correction", "tags", "created_at", "used_by", "prompt", "answer")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    id: int
    response_id: str
    node: str
    version: int
    rating: int
    correction: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    used_by: str
    prompt: str
    answer: str
    def __init__(self, id: _Optional[int] = ..., response_id: _Optional[str] = ..., node: _Optional[str] = ..., version: _Optional[int] = ..., rating: _Optional[int] = ..., correction: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., used_by: _Optional[str] = ..., prompt: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class ListFeedbackRequest(_message.Message):
    __slots__ = ("node", "limit")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    node: str
    limit: int
    def __init__(self, node: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListFeedbackResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ...) -> None: ...

class ExportFeedbackRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class DeleteFeedbackRequest(_message.Message):
    __slots__ = ("node", "response_ids")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    response_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., response_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteFeedbackResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class RetentionRequest(_message.Message):
    __slots__ = ("node", "enabled")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    node: str
    enabled: bool
    def __init__(self, node: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class GetRetentionRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class Retention(_message.Message):
    __slots__ = ("node", "enabled")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    node: str
    enabled: bool
    def __init__(self, node: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class RetentionList(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Retention]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Retention, _Mapping]]] = ...) -> None: ...
