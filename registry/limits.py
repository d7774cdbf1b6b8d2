"""Per-tenant limits kept in the registry, so every server of a cluster applies the same.

An operator sets them with ``treelm registry tenant limits NAME --max-running 8 ...``; a limit not
set here is the server's own (its ``--tenant-*`` options or ``--tenant-limits`` file). Servers
read the whole table every few seconds (cluster/service/quota.py), so a change applies without
a restart. Values are whole numbers >= 1; clearing one hands it back to the server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from registry._rows import utc
from registry.access import _tenant
from registry.db import Registry
from registry.errors import InvalidInput
from registry.models import Tenant, TenantLimit, utcnow

__all__ = ["TENANT_LIMIT_FIELDS", "TenantLimitsRecord", "all_tenant_limits", "get_tenant_limits", "set_tenant_limits"]

# The limits a tenant's row may set (cluster.service.quota.TenantQuota has the same fields).
TENANT_LIMIT_FIELDS = (
    "max_running",
    "max_queued",
    "tokens_per_minute",
    "fine_tuning_jobs",
    "stored_files",
    "stored_file_bytes",
)
# Each column's largest value: INTEGER (32 bits) on PostgreSQL for counts, BIGINT for tokens and bytes.
_MAX_VALUE = {
    f: (1 << 62) - 1 if f in ("tokens_per_minute", "stored_file_bytes") else (1 << 31) - 1 for f in TENANT_LIMIT_FIELDS
}


@dataclass(frozen=True)
class TenantLimitsRecord:
    """The limits the registry sets for one tenant (only those set; the others are the server's)."""

    tenant: str
    limits: Mapping[str, int]
    updated_at: datetime | None = None  # None: nothing was ever set


def _check(values: Mapping[str, int | None]) -> None:
    for name, value in values.items():
        if name not in TENANT_LIMIT_FIELDS:
            raise InvalidInput(f"unknown tenant limit {name!r}; known: {', '.join(TENANT_LIMIT_FIELDS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_VALUE[name]:
            raise InvalidInput(f"tenant limit {name} must be a whole number 1..{_MAX_VALUE[name]}, got {value!r}")


def _record(name: str, row: TenantLimit | None) -> TenantLimitsRecord:
    if row is None:
        return TenantLimitsRecord(name, {})
    limits = {f: getattr(row, f) for f in TENANT_LIMIT_FIELDS if getattr(row, f) is not None}
    return TenantLimitsRecord(name, limits, utc(row.updated_at))


def set_tenant_limits(
    reg: Registry, tenant: str, values: Mapping[str, int | None], clear: Iterable[str] = ()
) -> TenantLimitsRecord:
    """Sets ``values`` (None or a name in ``clear``: back to the server's) for ``tenant``.

    Checked whole before anything is written: an unknown tenant (TenantNotFound), field or a bad
    value (InvalidInput) changes nothing."""
    merged: dict[str, int | None] = dict(values)
    for name in clear:
        merged[name] = None
    _check(merged)
    with reg.write() as session:
        owner = _tenant(session, tenant)
        row = session.get(TenantLimit, owner.id)
        if row is None:
            row = TenantLimit(tenant_id=owner.id)
            session.add(row)
        for name, value in merged.items():
            setattr(row, name, value)
        row.updated_at = utcnow()
        session.flush()
        return _record(tenant, row)


def get_tenant_limits(reg: Registry, tenant: str) -> TenantLimitsRecord:
    with reg.read() as session:
        owner = _tenant(session, tenant)
        return _record(tenant, session.get(TenantLimit, owner.id))


def all_tenant_limits(reg: Registry) -> dict[str, dict[str, int]]:
    """Every tenant that has a limit set: tenant -> {limit: value} (what servers poll)."""
    with reg.read() as session:
        rows = session.execute(select(Tenant.name, TenantLimit).join(TenantLimit, TenantLimit.tenant_id == Tenant.id))
        out = {name: dict(_record(name, row).limits) for name, row in rows}
    return {name: limits for name, limits in out.items() if limits}
