"""Per-tenant quotas: each tenant's share of the engines and its tokens per minute.

    quotas = Quotas(QuotaPolicy.load(Path("tenant-limits.yaml"), defaults))
    trunk = quotas.bind(trunk, caller)        # what Admission.admit returns
    await trunk.generate(request)             # stamped with the tenant and its limits; tokens charged

Six limits per tenant, with server-wide defaults and per-tenant overrides (a YAML file, see
:meth:`QuotaPolicy.load`):

- ``max_running``: its requests in an engine's batch at once; more wait in its own queue.
- ``max_queued``: its requests waiting in an engine's queue; beyond it RESOURCE_EXHAUSTED / 429.
- ``tokens_per_minute``: generated tokens, a token bucket of that capacity refilled at that rate
  per minute; a call while the bucket is empty is refused RESOURCE_EXHAUSTED / 429 with the
  seconds until it refills. A call in progress is never cut short: its tokens may take the bucket
  below zero, and the tenant then waits until it is positive again.
- ``fine_tuning_jobs``: its queued and running fine-tuning jobs (registry/jobs.py counts them when
  a job is created; one more is refused RESOURCE_EXHAUSTED / 429).
- ``stored_files``, ``stored_file_bytes``: the training files it keeps (100 files, 256 MiB by
  default); an upload past either is refused RESOURCE_EXHAUSTED / 429 (kind ``file-quota``) until
  it deletes some.

The engine enforces the first two (nodes/runtime/fair.py: they travel with each request, so a Ray
replica applies the limits the ingress read); the ingress process keeps the token buckets. On a
Ray cluster each trunk replica and each ingress therefore bounds a tenant on its own.
Anonymous callers (auth off) share the limits of the tenant named ``""`` in the file, else the defaults.

Limits an operator set in the registry (``treelm registry tenant limits``, registry/limits.py)
override the file's and the defaults, field by field. ``Quotas`` reads them when built (one
small query) and again, in a thread, when a request finds its copy older than ``refresh_s``
(that request still uses the copy), so a change reaches every busy server within a few seconds
and without a restart; a failed read keeps the last limits it had.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from cluster.errors import RateLimited, ServeError
from cluster.service.auth import Caller
from cluster.service.trunk import Trunk, TrunkView
from nodes.runtime.requests import GenerationRequest, GenerationResult, TenantLimits, TokenChunk

__all__ = ["LIMITS_REFRESH_S", "QuotaPolicy", "Quotas", "TenantQuota", "TenantTrunk"]

log = logging.getLogger("treelm.server")

LIMITS_REFRESH_S = 2.0  # how stale the registry's tenant limits may be in a server
# tenant -> {limit: value}: what the registry sets (registry.limits.all_tenant_limits)
Overrides = Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class TenantQuota:
    """One tenant's limits; None = unbounded (the engine's batch and queue still bound it)."""

    max_running: int | None = field(default=16, metadata={"help": "requests in an engine's batch at once"})
    max_queued: int | None = field(default=64, metadata={"help": "requests waiting in an engine's queue"})
    tokens_per_minute: int | None = field(default=None, metadata={"help": "generated tokens per minute"})
    fine_tuning_jobs: int | None = field(default=2, metadata={"help": "queued and running fine-tuning jobs"})
    stored_files: int | None = field(default=100, metadata={"help": "training files kept at once"})
    stored_file_bytes: int | None = field(default=256 << 20, metadata={"help": "bytes of training files kept"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ServeError(f"tenant limit {f.name} must be an integer >= 1 (or unset), got {value!r}")

    @property
    def engine_limits(self) -> TenantLimits:
        return TenantLimits(max_running=self.max_running, max_queued=self.max_queued)


@dataclass(frozen=True)
class QuotaPolicy:
    """Defaults for every tenant and overrides for some (by tenant name)."""

    defaults: TenantQuota = field(default_factory=TenantQuota)
    tenants: Mapping[str, TenantQuota] = field(default_factory=dict)

    def for_tenant(self, tenant: str | None) -> TenantQuota:
        return self.tenants.get(tenant or "", self.defaults)

    @classmethod
    def load(cls, path: Path, defaults: TenantQuota | None = None) -> QuotaPolicy:
        """Read overrides from YAML; a tenant's unnamed limits keep the defaults::

        tenants:
          acme: {max_running: 16, max_queued: 128, tokens_per_minute: 200000}
          trial: {tokens_per_minute: 5000}
        """
        defaults = defaults or TenantQuota()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ServeError(f"cannot read the tenant limits {path}: {exc}") from None
        tenants = data.get("tenants") if isinstance(data, dict) else None
        if not isinstance(tenants, dict) or set(data) - {"tenants"}:
            raise ServeError(f"{path}: expected a mapping with one key, 'tenants' (tenant name -> limits)")
        known = {f.name for f in fields(TenantQuota)}
        out: dict[str, TenantQuota] = {}
        for name, limits in tenants.items():
            if not isinstance(name, str) or not isinstance(limits, dict) or set(limits) - known:
                raise ServeError(f"{path}: tenant {name!r} needs a mapping of {', '.join(sorted(known))}")
            try:
                out[name] = replace(defaults, **limits)
            except ServeError as exc:
                raise ServeError(f"{path}: tenant {name!r}: {exc}") from None
        return cls(defaults, out)

    def with_overrides(self, overrides: Overrides) -> QuotaPolicy:
        """This policy with the registry's limits laid over each named tenant's, field by field."""
        if not overrides:
            return self
        tenants = dict(self.tenants)
        for name, limits in overrides.items():
            known = {k: v for k, v in limits.items() if k in _FIELDS}
            try:
                tenants[name] = replace(self.for_tenant(name), **known)
            except ServeError as exc:  # a row written around registry/limits.py: that tenant keeps the server's
                log.warning("tenant %r: ignoring its limits in the registry: %s", name, exc)
        return QuotaPolicy(self.defaults, tenants)


_FIELDS = frozenset(f.name for f in fields(TenantQuota))


class _Bucket:
    """A token bucket over generated tokens (capacity = the per-minute rate)."""

    def __init__(self, per_minute: int, now: float):
        self.per_minute = per_minute
        self.level = float(per_minute)
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.per_minute), self.level + (now - self.at) * self.per_minute / 60.0)
        self.at = now


class Quotas:
    """The policy and each tenant's token bucket (one event loop: no lock; the registry's
    limits are swapped in whole by a reading thread)."""

    def __init__(
        self,
        policy: QuotaPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        overrides: Callable[[], Overrides] | None = None,
        refresh_s: float = LIMITS_REFRESH_S,
    ):
        self.configured = policy or QuotaPolicy()  # the server's own: options and file
        self.policy = self.configured
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._overrides = overrides
        self._refresh_s = refresh_s
        self._read_at = float("-inf")
        self._reading = threading.Lock()
        if overrides is not None:
            self._read()  # the first requests already see them

    def for_tenant(self, tenant: str | None) -> TenantQuota:
        """The tenant's limits now (the registry's over the server's)."""
        self._refresh()
        return self.policy.for_tenant(tenant)

    def _refresh(self) -> None:
        if self._overrides is None or time.monotonic() - self._read_at < self._refresh_s:
            return
        if self._reading.acquire(blocking=False):
            self._read_at = time.monotonic()
            threading.Thread(target=self._read, args=(True,), name="treelm-tenant-limits", daemon=True).start()

    def _read(self, locked: bool = False) -> None:
        assert self._overrides is not None
        try:
            self.policy = self.configured.with_overrides(self._overrides())
            self._read_at = time.monotonic()
        except Exception as exc:  # the registry is away: keep the limits we have
            log.warning("cannot read tenant limits from the registry (keeping the last ones): %s", exc)
        finally:
            if locked:
                self._reading.release()

    def bind(self, trunk: Trunk, caller: Caller) -> TenantTrunk:
        return TenantTrunk(trunk, self, caller.tenant)

    def check(self, tenant: str | None) -> None:
        """RateLimited while the tenant's bucket is empty."""
        bucket = self._bucket(tenant)
        if bucket is None or bucket.level >= 1.0:
            return
        wait = (1.0 - bucket.level) * 60.0 / bucket.per_minute
        raise RateLimited(
            f"your tenant generated its {bucket.per_minute} tokens per minute; retry in {wait:.1f} s", wait
        )

    def charge(self, tenant: str | None, tokens: int) -> None:
        bucket = self._bucket(tenant)
        if bucket is not None:
            bucket.level -= tokens

    def _bucket(self, tenant: str | None) -> _Bucket | None:
        rate = self.for_tenant(tenant).tokens_per_minute
        if rate is None:
            return None
        key = tenant or ""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.per_minute != rate:
            bucket = self._buckets[key] = _Bucket(rate, now)
        bucket.refill(now)
        return bucket


class TenantTrunk(TrunkView):
    """A trunk as one tenant uses it: requests carry the tenant and its limits, tokens are charged."""

    def __init__(self, trunk: Trunk, quotas: Quotas, tenant: str | None):
        super().__init__(trunk)
        self._quotas = quotas
        self.tenant = tenant

    def _stamp(self, request: GenerationRequest) -> GenerationRequest:
        self._quotas.check(self.tenant)
        limits = self._quotas.for_tenant(self.tenant).engine_limits
        return replace(request, tenant=self.tenant, limits=limits)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await self.trunk.generate(self._stamp(request))
        self._quotas.charge(self.tenant, result.usage.completion_tokens)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        stamped = self._stamp(request)
        async for chunk in self.trunk.stream(stamped):
            self._quotas.charge(self.tenant, len(chunk.token_ids))
            yield chunk
