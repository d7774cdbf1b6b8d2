from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadFileChunk(_message.Message):
    __slots__ = ("filename", "purpose", "data")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    filename: str
    purpose: str
    data: bytes
    def __init__(self, filename: _Optional[str] = ..., purpose: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainingFile(_message.Message):
    __slots__ = ("id", "filename", "purpose", "format", "records", "bytes", "sha256", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    filename: str
    purpose: str
    format: str
    records: int
    bytes: int
    sha256: str
    created_at: float
    def __init__(self, id: _Optional[str] = ..., filename: _Optional[str] = ..., purpose: _Optional[str] = ..., format: _Optional[str] = ..., records: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListFilesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[TrainingFile]
    def __init__(self, files: _Optional[_Iterable[_Union[TrainingFile, _Mapping]]] = ...) -> None: ...

class FileRequest(_message.Message):
    __slots__ = ("file_id",)
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    def __init__(self, file_id: _Optional[str] = ...) -> None: ...

class DeleteFileResponse(_message.Message):
    __slots__ = ("id", "deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    deleted: bool
    def __init__(self, id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("n_epochs", "learning_rate_multiplier", "learning_rate", "lora_rank", "batch_size")
    N_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    n_epochs: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_rank: int
    batch_size: int
    def __init__(self, n_epochs: _Optional[int] = ..., learning_rate_multiplier: _Optional[float] = ..., learning_rate: _Optional[float] = ..., lora_rank: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("model", "training_file", "validation_file", "suffix", "hyperparameters", "visibility")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    training_file: str
    validation_file: str
    suffix: str
    hyperparameters: Hyperparameters
    visibility: str
    def __init__(self, model: _Optional[str] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., suffix: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., visibility: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "param")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    param: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "model", "node", "fine_tuned_model", "status", "visibility", "training_file", "validation_file", "hyperparameters_json", "result_json", "error", "cancel_requested", "created_at", "started_at", "finished_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    node: str
    fine_tuned_model: str
    status: str
    visibility: str
    training_file: str
    validation_file: str
    hyperparameters_json: str
    result_json: str
    error: JobError
    cancel_requested: bool
    created_at: float
    started_at: float
    finished_at: float
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., node: _Optional[str] = ..., fine_tuned_model: _Optional[str] = ..., status: _Optional[str] = ..., visibility: _Optional[str] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., hyperparameters_json: _Optional[str] = ..., result_json: _Optional[str] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., cancel_requested: _Optional[bool] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "after")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after: str
    def __init__(self, limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "has_more")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    has_more: bool
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("id", "job_id", "level", "message", "data_json", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    job_id: str
    level: str
    message: str
    data_json: str
    created_at: float
    def __init__(self, id: _Optional[int] = ..., job_id: _Optional[str] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., data_json: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("job_id", "limit", "after")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    limit: int
    after: int
    def __init__(self, job_id: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "has_more")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    has_more: bool
    def __init__(self, events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "since")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    since: int
    def __init__(self, job_id: _Optional[str] = ..., since: _Optional[int] = ...) -> None: ...
