"""Values that cross between the ingress, the trunk replicas and the operator CLI over Ray.

Errors need no wrapper: every TreeLM error pickles with its type and fields
(hierarchy.errors.PicklableError), so replicas and the update desk raise them and the caller
raises the same error again (:func:`remote_cause`); the status table of
cluster/service/status.py then applies exactly as in the single-process server.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.exceptions

from cluster.service.quota import QuotaPolicy
from nodes.runtime.requests import DEFAULT_CONTENDED_RUNNING
from nodes.store.tree import NODE_RECORD, TREE_RECORD

__all__ = ["IngressSpec", "TrunkInfo", "TrunkSpec", "remote_cause", "tree_content_digest"]


@dataclass(frozen=True)
class TrunkSpec:
    """What one trunk replica needs to start (the deployment's constructor argument)."""

    tree: str
    tree_dir: str  # readable at the same path on every Ray node that may host a replica
    namespace: str  # where the replica board lives
    max_batch: int = 16
    max_queue: int = 256
    tenant_step_rows: int | None = None  # nodes.runtime.parking: a tenant's rows per step under contention
    tenant_contended_running: int | None = DEFAULT_CONTENDED_RUNNING  # nodes.runtime.fair (None: off)
    prefill_chunk: int = 32  # nodes.runtime.prefill: tokens of a long prompt per step while rows decode
    max_adapters: int = 64
    host_cache: int = 1 << 30
    prefix_cache: int = 256 << 20
    precision: str = "fp32"  # nodes.base.precision, resolved where the replica runs ("auto")
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
    tree_dir: str = ""  # where the ingress reads the tree's variants (Distribution)


@dataclass(frozen=True)
class IngressSpec:
    """The ingress deployment's constructor argument (a ServerConfig's fields plus the trunks)."""

    trunks: tuple[TrunkInfo, ...]
    registry_url: str
    namespace: str
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None  # the OpenAI-compatible HTTP API beside gRPC (None: off)
    auth: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_client_tenants: str | None = None  # certificate subject -> tenant (cluster/service/client_certs.py)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    grace_s: float = 10.0
    updates: bool = True  # serve Updates through the desk actor (cluster/ray/desk.py)
    variant_key: str | None = None  # signs variant manifests (Distribution); None: not offered
    variant_key_password_file: str | None = None  # its passphrase (else $TREELM_KEY_PASSPHRASE)
    variant_delegations: tuple[str, ...] = ()  # root's delegation files, one per tree
    variant_cache_bytes: int = 20 << 30  # bound on each tree dir's built variants
    upload_max_file_bytes: int = 256 << 20  # update uploads: see cluster.ray.config.IngressConfig
    upload_spool_bytes: int = 1 << 30
    upload_per_tenant: int = 2
    upload_idle_s: float = 30.0
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)  # per-tenant limits, stamped on each request
    feedback: bool = True  # record every response for feedback (ServerConfig.feedback)
    refusals_per_s: int = 20  # ServerConfig.refusals_per_s


def tree_content_digest(tree_dir: Path) -> str:
    """sha256 over tree.json and every node.json (versions and file digests live there)."""
    digest = hashlib.sha256()
    for path in sorted([tree_dir / TREE_RECORD, *tree_dir.rglob(NODE_RECORD)]):
        digest.update(str(path.relative_to(tree_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def remote_cause(error: ray.exceptions.RayTaskError) -> BaseException:
    """The exception a Ray task, actor method or Serve replica raised, as it was raised.

    Ray wraps it in a RayTaskError whose message carries the remote traceback; callers want the
    typed error (its message, its fields), which arrives intact in ``cause``."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
