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
    DiskError,
    FailedPrecondition,
    FeedbackDeleted,
    InvalidRequest,
    NodeNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    PullError,
    ResponseNotFound,
    ServerError,
    TreeLMError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VerificationFailed,
)
from treelm._hardware import DeviceProfile, detect_hardware, hardware_profile
from treelm._pulltypes import Offer, PullResult, TrustBundle, UpdateCheck
from treelm._transport import RetryPolicy
from treelm._types import (
    AdapterCacheCounters,
    ChatMessage,
    Choice,
    Chunk,
    Echo,
    Feedback,
    FinishReason,
    MatchCandidate,
    MatchResult,
    MatchSuggestion,
    Node,
    NodeVersion,
    Result,
    Retention,
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
    "DeviceProfile",
    "DiskError",
    "Echo",
    "FailedPrecondition",
    "Feedback",
    "FeedbackDeleted",
    "FinishReason",
    "InvalidRequest",
    "MatchCandidate",
    "MatchResult",
    "MatchSuggestion",
    "Node",
    "NodeNotFound",
    "NodeVersion",
    "NotFound",
    "Offer",
    "Overloaded",
    "PermissionDenied",
    "PullError",
    "PullResult",
    "ResponseNotFound",
    "Result",
    "Retention",
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
    "TrustBundle",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UpdateCheck",
    "UpdateStatus",
    "Usage",
    "VerificationFailed",
    "__version__",
    "detect_hardware",
    "hardware_profile",
]
