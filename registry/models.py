"""SQLAlchemy 2 typed models of the registry schema.

These rows never leave :mod:`registry`: repository functions convert them to the
frozen dataclasses of :mod:`registry.records`. The schema itself is created
and changed only by the Alembic migrations in ``registry/migrations``; a test
checks that the migrated schema and these models agree.
"""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from registry.vocab import (
    ALIAS_NAMES,
    DEPLOYMENT_STATUSES,
    JOB_STATUSES,
    KEY_ROLES,
    KEY_STATUSES,
    LEVELS,
    PERPLEXITY_ROLES,
    PIN_STATUSES,
    TOKEN_ROLES,
    UPDATE_KINDS,
    UPDATE_STATES,
    VARIANT_KINDS,
    VERSION_STATUSES,
    VISIBILITIES,
)

__all__ = [
    "Alias",
    "ApiToken",
    "BaseModel",
    "Deployment",
    "FeedbackRetention",
    "FeedbackRow",
    "FineTuningEvent",
    "FineTuningJob",
    "KeyGroup",
    "Model",
    "Node",
    "NodeTag",
    "NodeVersion",
    "PolicyDecision",
    "ResponseRow",
    "ServingPin",
    "SigningKey",
    "Tenant",
    "TrainingFile",
    "UpdateEvent",
    "UpdateRecord",
    "Variant",
    "VersionPerplexity",
]


# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}  # noqa: RUF012 (SQLAlchemy's own shape)


class Tenant(Model):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantLimit(Model):
    """A tenant's limits as the operator set them in the registry (``treelm registry tenant limits``);
    NULL: the server's own setting. Servers read them every few seconds (cluster/service/quota.py)."""

    __tablename__ = "tenant_limits"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    max_running: Mapped[int | None] = mapped_column(Integer)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuning_jobs: Mapped[int | None] = mapped_column(Integer)
    stored_files: Mapped[int | None] = mapped_column(Integer)
    stored_file_bytes: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class BaseModel(Model):
    """A base (root) model: its digest and the architecture facts memory estimates need."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str] = mapped_column(String(200))  # the spec's base.model ("tiny", "smollm2", a dir)
    architecture: Mapped[str] = mapped_column(String(100))  # e.g. LlamaForCausalLM
    weight_dtype: Mapped[str] = mapped_column(String(16))  # dtype of the stored weights
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    quantizable_parameter_count: Mapped[int] = mapped_column(BigInteger)  # 2-D linear weights (int8-able)
    weights_bytes: Mapped[int] = mapped_column(BigInteger)  # safetensors bytes on disk
    layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    attention_heads: Mapped[int] = mapped_column(Integer)
    kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    intermediate_size: Mapped[int | None] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    max_context: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Node(Model):
    """One model in a tree; the base itself is the node with the empty path."""

    __tablename__ = "nodes"
    __table_args__ = (
        UniqueConstraint("tree", "path"),
        CheckConstraint(_in("level", LEVELS), name="level"),
        CheckConstraint(_in("visibility", VISIBILITIES), name="visibility"),
        CheckConstraint("visibility = 'public' OR owner_tenant_id IS NOT NULL", name="private_has_owner"),
        # Matching seeks on these: a path lineage, or a task's attributes.
        Index(None, "path"),
        Index(None, "language", "domain", "subdomain"),
        Index(None, "domain", "subdomain"),
        Index(None, "subdomain"),
        Index(None, "parent_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(300), unique=True)  # "<tree>/<path>", or "<tree>" for the base
    tree: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(250))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    level: Mapped[str] = mapped_column(String(16))
    depth: Mapped[int] = mapped_column(Integer)
    language: Mapped[str | None] = mapped_column(String(64))
    domain: Mapped[str | None] = mapped_column(String(64))
    subdomain: Mapped[str | None] = mapped_column(String(64))
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    owner_tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by `treelm node retire`: no longer listed, matched or served; its records stay, and its
    # id stays taken (a retired node's name is never given to another node).
    retired_at: Mapped[datetime | None] = mapped_column()

    parent: Mapped[Node | None] = relationship(remote_side=[id])
    base_model: Mapped[BaseModel] = relationship()
    owner: Mapped[Tenant | None] = relationship()
    tags: Mapped[list[NodeTag]] = relationship(order_by="NodeTag.tag", cascade="all, delete-orphan")


class NodeTag(Model):
    __tablename__ = "node_tags"
    __table_args__ = (Index(None, "tag"),)

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


class NodeVersion(Model):
    """An immutable version of one node's adapter; only ``status`` ever changes."""

    __tablename__ = "node_versions"
    __table_args__ = (
        UniqueConstraint("node_id", "version"),
        CheckConstraint(_in("status", VERSION_STATUSES), name="status"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)  # the parent's version it is pinned to
    manifest_digest: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Model):
    """A movable name (``stable``, ``candidate``) for one version of one node."""

    __tablename__ = "aliases"
    __table_args__ = (
        UniqueConstraint("node_id", "name"),
        CheckConstraint(_in("name", ALIAS_NAMES), name="name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    name: Mapped[str] = mapped_column(String(16))
    version_id: Mapped[int] = mapped_column(ForeignKey("node_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Variant(Model):
    """A way to ship one node version to a device, with its size and (when measured) speed."""

    __tablename__ = "variants"
    __table_args__ = (
        UniqueConstraint("version_id", "kind"),
        CheckConstraint(_in("kind", VARIANT_KINDS), name="kind"),
        CheckConstraint("bytes >= 0 AND adapter_parameters >= 0", name="sizes"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("node_versions.id"))
    kind: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger)  # what a device downloads and stores
    bytes_estimated: Mapped[bool] = mapped_column(Boolean)  # False when measured on disk
    adapter_parameters: Mapped[int] = mapped_column(BigInteger)  # LoRA parameters held beside the weights
    tokens_per_second: Mapped[float | None] = mapped_column(Float)  # measured decode speed, when known
    measured_device: Mapped[str | None] = mapped_column(String(8))  # device kind the speed was measured on
    uri: Mapped[str | None] = mapped_column(Text)  # where the exported artefact lives
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Model):
    """A tenant's bearer token, stored as HMAC-SHA256(salt, secret); the secret is never stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("role", TOKEN_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)  # public part, for lookup
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    salt: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    role: Mapped[str] = mapped_column(String(16), default="tenant", server_default="tenant")
    expires_at: Mapped[datetime | None] = mapped_column()  # None: never expires


class SigningKey(Model):
    """A public key the update protocol trusts for one role (optionally for one node)."""

    __tablename__ = "signing_keys"
    __table_args__ = (
        CheckConstraint(_in("role", KEY_ROLES), name="role"),
        CheckConstraint(_in("status", KEY_STATUSES), name="status"),
        Index(None, "node_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    public_key: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(String(16), default="ed25519")
    role: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="active")
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class Deployment(Model):
    """Which trunk and endpoint serve a node (written by the cluster)."""

    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("node_id", "endpoint"),
        CheckConstraint(_in("status", DEPLOYMENT_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    trunk: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16), default="active")
    version_id: Mapped[int | None] = mapped_column(ForeignKey("node_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class UpdateRecord(Model):
    """One update of the protocol: a signed package, a parent's candidate, or a contribution upward.

    ``envelope`` is the DSSE envelope (JSON); ``approvals`` the detached approval signatures;
    ``figures`` screening and gate numbers; ``round_id`` the candidate a contribution went into.
    """

    __tablename__ = "updates"
    __table_args__ = (
        CheckConstraint(_in("kind", UPDATE_KINDS), name="kind"),
        CheckConstraint(_in("state", UPDATE_STATES), name="state"),
        Index(None, "target_id", "state"),
        Index(None, "node_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    update_id: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))  # whose version this is
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int] = mapped_column(Integer)  # the parent version it was made over
    target_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))  # the parent it contributes to
    state: Mapped[str] = mapped_column(String(24))
    manifest_digest: Mapped[str] = mapped_column(String(64))
    envelope: Mapped[str] = mapped_column(Text)
    approvals: Mapped[list[Any]] = mapped_column(JSON, default=list)
    figures: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    round_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class UpdateEvent(Model):
    """An append-only log of every state change the update protocol makes."""

    __tablename__ = "update_events"
    __table_args__ = (Index(None, "node_id"), Index(None, "update_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    update_id: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class KeyGroup(Model):
    """Signing policy of one key group (role, optional node): threshold and key-set version."""

    __tablename__ = "key_groups"
    __table_args__ = (
        CheckConstraint(_in("role", KEY_ROLES), name="role"),
        CheckConstraint("threshold >= 1", name="threshold_positive"),
        UniqueConstraint("role", "scope"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(300))  # the node id, or "*" for a role-wide group
    threshold: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServingPin(Model):
    """How a node was served: the exact chain of versions, and whether it is held on older ones.

    Append-only: the row with the highest id per node is current; older rows are the chains the
    node was validated against (a rollback restores one of them without measuring again).
    """

    __tablename__ = "serving_pins"
    __table_args__ = (
        CheckConstraint(_in("status", PIN_STATUSES), name="status"),
        Index(None, "node_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    version: Mapped[int] = mapped_column(Integer)
    chain: Mapped[list[Any]] = mapped_column(JSON)  # [{"path", "version", "adapter"}, ...] top ancestor first
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ResponseRow(Model):
    """One generation's response id, so feedback can find it: who asked, which node and version.

    ``prompt`` and ``answer`` are kept only where the tenant turned retention on for the node;
    ``deleted_at`` marks a response whose tenant deleted its records (its texts are gone and no
    later feedback is taken for it). The tenant is a name ("" when auth is off), not a foreign key,
    so anonymous callers and later-removed tenants need no row of their own.
    """

    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("tenant", "response_id"), Index(None, "node", "tenant"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    response_id: Mapped[str] = mapped_column(String(128))
    node: Mapped[str] = mapped_column(String(300))
    version: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str | None] = mapped_column(Text)  # JSON: {"prompt": ...} or {"messages": [...]}
    answer: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column()


class FeedbackRow(Model):
    """A rating (+1/-1) of one response, with an optional corrected answer and tags."""

    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint("rating IN (-1, 1)", name="rating"),
        Index(None, "node", "tenant"),
        Index(None, "response_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_pk: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    tenant: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(300))
    rating: Mapped[int] = mapped_column(Integer)
    correction: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    used_by: Mapped[str | None] = mapped_column(String(64))  # the update made from it, once used


class FeedbackRetention(Model):
    """Whether a tenant keeps prompt and answer texts of one node's responses (off unless a row says on)."""

    __tablename__ = "feedback_retention"
    __table_args__ = (UniqueConstraint("tenant", "node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(300))
    enabled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PolicyDecision(Model):
    """Append-only: what the update-timing policy decided for a node, and why (`treelm update log`)."""

    __tablename__ = "policy_decisions"
    __table_args__ = (Index(None, "node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    node: Mapped[str] = mapped_column(String(300))
    action: Mapped[str] = mapped_column(String(32))  # make | wait | aggregate | failed
    reason: Mapped[str] = mapped_column(Text)
    update_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class VersionPerplexity(Model):
    """Append-only forgetting history: one version's perplexity on one node's eval text.

    For every version the update protocol makes (packages, candidates, rebased children) and for
    the chain it is measured over: ``role`` own (its own eval text), parent (its parent's),
    sibling (each sibling's, under the sibling's own chain over this version when the version is
    a parent's candidate) or stale (a child left as it was over a parent's new version).
    """

    __tablename__ = "version_perplexities"
    __table_args__ = (
        CheckConstraint(_in("role", PERPLEXITY_ROLES), name="role"),
        Index(None, "node_id", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    version: Mapped[int] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(16))  # genesis | package | candidate | rebase
    role: Mapped[str] = mapped_column(String(16))
    text_node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))  # whose eval text
    perplexity: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingFile(Model):
    """A file a tenant uploaded for fine-tuning (``POST /v1/files``), kept in the registry so every
    ingress and every training worker of a cluster reads the same bytes. Checked when uploaded
    (cluster/jobs/data.py): ``format`` is jsonl (chat records) or text, ``records`` how many."""

    __tablename__ = "training_files"
    __table_args__ = (Index(None, "tenant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[str] = mapped_column(String(40), unique=True)  # "file-<hex>"
    tenant: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(8))
    records: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[builtins.bytes] = mapped_column(LargeBinary)  # builtins: `bytes` is a column here
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTuningJob(Model):
    """One fine-tuning job: a tenant's request for a new node under ``parent``, and where it stands.

    ``node`` is the node the job creates (the parent's id and the suffix). A job is claimed by one
    worker (``worker``) when it starts; ``result`` holds the figures (perplexities, timings) and
    ``error`` {code, message} why it failed.
    """

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("visibility", VISIBILITIES), name="visibility"),
        Index(None, "tenant"),
        Index(None, "status", "tree"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), unique=True)  # "ftjob-<hex>"
    tenant: Mapped[str] = mapped_column(String(64))
    tree: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str] = mapped_column(String(300))
    node: Mapped[str] = mapped_column(String(300))
    visibility: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class FineTuningEvent(Model):
    """Append-only progress of one job: a message and figures (step, loss, eval perplexity, phase)."""

    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index(None, "job_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    level: Mapped[str] = mapped_column(String(8))  # info | warning | error
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
