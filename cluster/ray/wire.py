"""Values that cross between the ingress, the trunk replicas and the operator CLI over Ray.

Typed errors of :mod:`nodes` do not survive Ray's pickling (their constructors
take a field and a message), and a replica that raises makes Serve log a
traceback for what is an ordinary answer (unknown node, full queue). So
replicas *return* expected errors as a :class:`RemoteError` value, and the
ingress raises the same typed error again; the gRPC status mapping in
cluster/service/interceptors.py then works exactly as in the single-process server.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from hierarchy.errors import HierarchyError
from nodes import errors as engine_errors
from nodes.store.tree import NODE_RECORD, TREE_RECORD

__all__ = ["IngressSpec", "RemoteError", "TrunkInfo", "TrunkSpec", "tree_content_digest"]

# Errors a replica may hand back as values, by name; anything else is a server bug (INTERNAL).
_PORTABLE: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        engine_errors.UnknownNode,
        engine_errors.InvalidRequest,
        engine_errors.QueueFull,
        engine_errors.DeadlineExceeded,
        engine_errors.RequestCancelled,
        engine_errors.EngineClosed,
        engine_errors.IntegrityError,
        engine_errors.AdapterError,
        engine_errors.BaseModelError,
        engine_errors.EngineError,
        engine_errors.NodesError,
    )
}


@dataclass(frozen=True)
class RemoteError:
    """An expected error of a replica, carried as a value (see the module docstring)."""

    kind: str  # the class name, one of _PORTABLE
    message: str  # str() of the original error
    field: str | None = None  # InvalidRequest's field

    @classmethod
    def of(cls, exc: BaseException) -> RemoteError:
        kind = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _PORTABLE), "NodesError")
        if isinstance(exc, HierarchyError):
            kind = "InvalidRequest"
        return cls(kind=kind, message=str(exc), field=getattr(exc, "field", None))

    def rebuild(self) -> BaseException:
        """The typed error again, with the same message (and field)."""
        error_type = _PORTABLE.get(self.kind, engine_errors.NodesError)
        error = error_type.__new__(error_type)
        Exception.__init__(error, self.message)
        if self.field is not None:
            error.field = self.field
        return error


@dataclass(frozen=True)
class TrunkSpec:
    """What one trunk replica needs to start (the deployment's constructor argument)."""

    tree: str
    tree_dir: str  # readable at the same path on every Ray node that may host a replica
    namespace: str  # where the replica board lives
    max_batch: int = 16
    max_queue: int = 256
    max_adapters: int = 64
    host_cache: int = 1 << 30
    preload: tuple[str, ...] = ()
    content: str = ""  # digest of tree.json and every node.json: a rebuilt tree restarts the replicas

    def version(self, code: str) -> str:
        """Serve's deployment version: equal versions let `scale` change replica counts in place."""
        return hashlib.sha256(repr((sorted(asdict(self).items()), code)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrunkInfo:
    """What the ingress knows of a trunk without loading it."""

    tree: str
    app: str  # Serve application name
    deployment: str
    base_digest: str
    nodes: tuple[str, ...]  # every node id the trunk serves (the tree name = the base)
    max_batch: int


@dataclass(frozen=True)
class IngressSpec:
    """The ingress deployment's constructor argument (a ServerConfig's fields plus the trunks)."""

    trunks: tuple[TrunkInfo, ...]
    registry_url: str
    namespace: str
    host: str = "127.0.0.1"
    port: int = 50051
    auth: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    grace_s: float = 10.0
    updates: bool = True  # serve Updates through the desk actor (cluster/ray/desk.py)


def tree_content_digest(tree_dir: Path) -> str:
    """sha256 over tree.json and every node.json (versions and file digests live there)."""
    digest = hashlib.sha256()
    for path in sorted([tree_dir / TREE_RECORD, *tree_dir.rglob(NODE_RECORD)]):
        digest.update(str(path.relative_to(tree_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
