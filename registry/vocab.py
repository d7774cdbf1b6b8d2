"""The registry's closed vocabularies: the values its columns may hold (checked by the schema's
CHECK constraints in :mod:`registry.models` and by the records in :mod:`registry.records`).

A module of its own so that values and records can be used without loading SQLAlchemy.
"""

from __future__ import annotations

__all__ = [
    "ALIAS_NAMES",
    "DEPLOYMENT_STATUSES",
    "JOB_FINISHED",
    "JOB_STATUSES",
    "KEY_ROLES",
    "KEY_STATUSES",
    "LEVELS",
    "PERPLEXITY_ORIGINS",
    "PERPLEXITY_ROLES",
    "PIN_STATUSES",
    "TOKEN_ROLES",
    "UPDATE_KINDS",
    "UPDATE_STATES",
    "VARIANT_KINDS",
    "VERSION_STATUSES",
    "VISIBILITIES",
]

LEVELS = ("base", "language", "domain", "subdomain")
VISIBILITIES = ("public", "private")
VERSION_STATUSES = ("candidate", "accepted", "rejected", "revoked")
ALIAS_NAMES = ("stable", "candidate")
# Kept in step with migration 0004 (a CHECK constraint) and with nodes.build.variants.kinds.
VARIANT_KINDS = (
    "chain",
    "flat",
    "merged",
    "merged-fp16",
    "merged-bf16",
    "merged-int8",
    "gguf-f16",
    "gguf-q4_0",
    "gguf-lora",
)
KEY_ROLES = ("node", "evaluator", "operator", "root")
KEY_STATUSES = ("active", "revoked")
# Bearer tokens: a tenant uses its nodes; an operator may also call the Admin service.
TOKEN_ROLES = ("tenant", "operator")
DEPLOYMENT_STATUSES = ("active", "draining", "stopped")
# The signed update protocol (cluster.updates): what an update record is and where it stands.
UPDATE_KINDS = ("package", "candidate", "contribution", "rebase", "create")
UPDATE_STATES = ("pending", "aggregated", "absorbed", "awaiting-approval", "stable", "rejected")
PIN_STATUSES = ("pinned", "held")
# Fine-tuning jobs (registry.jobs): queued -> running -> succeeded | failed | cancelled.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINISHED = ("succeeded", "failed", "cancelled")
# The forgetting history (version_perplexities): which version made it, whose text it measures.
PERPLEXITY_ORIGINS = ("genesis", "package", "candidate", "rebase")
PERPLEXITY_ROLES = ("own", "parent", "sibling", "stale")
