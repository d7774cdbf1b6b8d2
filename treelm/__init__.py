"""TreeLM client SDK (gRPC). Imports neither torch nor Ray: ``from treelm import Client``.

Example::

    from treelm import Client

    client = Client("127.0.0.1:50051", token="tlm_...")
    print(client.generate("demo/en/medical", prompt="The patient", max_new_tokens=16).text)
"""

from treelm._async_client import AsyncClient, AsyncStream
from treelm._client import Client, Stream
from treelm._errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    NodeNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServerError,
    TreeLMError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from treelm._transport import RetryPolicy
from treelm._types import (
    AdapterCacheCounters,
    ChatMessage,
    Choice,
    Chunk,
    Echo,
    FinishReason,
    MatchCandidate,
    MatchResult,
    MatchSuggestion,
    Node,
    NodeVersion,
    Result,
    RollbackResult,
    SamplingOptions,
    ServerStatus,
    Timings,
    TokenLogprob,
    TrunkStatus,
    UpdateStatus,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterCacheCounters",
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "ChatMessage",
    "Choice",
    "Chunk",
    "Client",
    "DeadlineExceeded",
    "Echo",
    "FailedPrecondition",
    "FinishReason",
    "InvalidRequest",
    "MatchCandidate",
    "MatchResult",
    "MatchSuggestion",
    "Node",
    "NodeNotFound",
    "NodeVersion",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Result",
    "RetryPolicy",
    "RollbackResult",
    "SamplingOptions",
    "ServerError",
    "ServerStatus",
    "Stream",
    "Timings",
    "TokenLogprob",
    "TreeLMError",
    "TrunkStatus",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UpdateStatus",
    "Usage",
    "__version__",
]
