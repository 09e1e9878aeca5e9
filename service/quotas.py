"""Per-tenant quotas: what one tenant may hold at once, so that it cannot starve the others.

Each quota is the tenant's override (a ``tenant_quotas`` row, set by an admin) or else the setting's
default (``MAML_QUOTA_<NAME>``). Two kinds:

* **concurrency** (``jobs``, ``sweeps``, ``workers``, ``cpus``, ``gpus``, ``adaptations``): what
  the tenant's queued and running work holds; it frees up as that work ends, so going over answers
  429 with Retry-After. A request that alone asks for more than the limit could never fit: 403.
* **size** (``iterations`` per job or trial, ``trials`` per sweep, stored ``models`` and
  ``model_bytes``): waiting does not help: 403.

A run's resources (:func:`job_demand`, :func:`sweep_demand`): a job holds ``resources.workers``
workers, times ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs; a sweep holds that per trial
(the largest its space can give) times the trials it runs at once (``max_concurrent_trials``, else
all of them: Tune runs as many as the cluster allows).

Submission (:func:`admit`) locks the tenant's quota row (``SELECT ... FOR UPDATE`` on PostgreSQL;
on SQLite the row's upsert takes the database's write lock), counts what the tenant holds, and
leaves the caller to insert its run and commit in the same transaction: concurrent submissions of a
tenant take turns, and together never go over. On PostgreSQL other tenants' submissions do not wait.
:func:`precheck` makes the same checks without the lock, before the spec's policy checks (which
build the model), so a tenant over its quota costs the API little.

Models are registered when a run succeeds, long after its submission, and a finished run's model is
never refused (nor lost): instead, at submission a tenant needs room for one more model, counting
each of its queued and running jobs and sweeps as the model it will register. ``model_bytes`` is
checked the same way, on the stored files: a tenant at or over it cannot submit, and a run may end
one model's size over it.

Adaptation queries are counted per tenant in this process (:class:`AdaptationShares`): a fair share
of the replica's adaptation pool (``adapt_max_concurrency + adapt_queue_limit`` slots, shared by all).
Data access functions are keyword-only and take the session.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, union
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import JOB_STATUSES, TERMINAL_STATUSES, ApiKey, Job, Model, Sweep, TenantQuota, utcnow
from service.errors import QuotaExceeded
from service.schemas import QuotaLimits, QuotaUse, TenantQuotaPublic
from workers.spec import JobSpec, ResourcesSpec
from workers.sweep_spec import Domain, SweepSpec, apply_config, trial_count

logger = logging.getLogger(__name__)

NAMES: tuple[str, ...] = tuple(QuotaLimits.model_fields)  # jobs, sweeps, workers, ..., adaptations
CONCURRENCY = frozenset({"jobs", "sweeps", "workers", "cpus", "gpus", "adaptations"})  # 429: frees up
_SLACK = 1e-9  # CPUs and GPUs are sums of floats: 30 workers of 0.1 CPU must fit in 3
# A run holds its resources (and the room of the model it will register) until it ends.
ACTIVE_STATUSES = tuple(status for status in JOB_STATUSES if status not in TERMINAL_STATUSES)


# ------------------------------------------------------------------------------------------ demand


@dataclass(frozen=True)
class Demand:
    """What one run asks of its tenant's quotas: concurrency it holds while queued or running, and
    its size (``iterations`` per job or trial, ``trials`` per sweep)."""

    jobs: int = 0
    sweeps: int = 0
    workers: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    iterations: int = 0
    trials: int = 0


def _resources_demand(resources: ResourcesSpec, trials_at_once: int = 1) -> dict[str, Any]:
    workers = resources.workers * trials_at_once
    return {"workers": workers, "cpus": workers * resources.cpus_per_worker,
            "gpus": workers * resources.gpus_per_worker}


def job_demand(spec: JobSpec) -> Demand:
    return Demand(jobs=1, iterations=spec.outer.iterations, **_resources_demand(spec.resources))


def _field(spec: JobSpec, path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        node = getattr(node, part)
    return node


def trial_max(sweep: SweepSpec, path: str) -> Any:
    """The largest value a trial of ``sweep`` can have at ``path`` (``resources.workers``): the base's,
    or one the space sets there (a value of a choice or grid, a bound of a range), directly or with a
    whole section (``resources``, whose other fields then take their defaults)."""
    values = [_field(sweep.base, path)]
    for key, domain in sweep.space.items():
        if path != key and not path.startswith(key + "."):
            continue
        for value in domain.value:  # a range's two bounds, or every choice
            try:
                values.append(_field(apply_config(sweep.base, {key: value}), path))
            except ValidationError:  # refused by the sweep's own validation; not a value a trial gets
                continue
    return max(values)


def sweep_demand(sweep: SweepSpec) -> Demand:
    """A sweep runs ``trial_count`` trials, ``max_concurrent_trials`` of them at once (all when unset);
    each trial holds at most the largest resources its space can give."""
    trials = trial_count(sweep)
    at_once = min(sweep.max_concurrent_trials or trials, trials)
    resources = ResourcesSpec(workers=trial_max(sweep, "resources.workers"),
                              cpus_per_worker=trial_max(sweep, "resources.cpus_per_worker"),
                              gpus_per_worker=trial_max(sweep, "resources.gpus_per_worker"))
    return Demand(sweeps=1, iterations=trial_max(sweep, "outer.iterations"), trials=trials,
                  **_resources_demand(resources, at_once))


def _stored_job_demand(spec: dict[str, Any]) -> Demand:
    # The stored spec is a validated JobSpec's dump: its resources are all there is to read.
    return Demand(jobs=1, **_resources_demand(ResourcesSpec.model_validate(spec.get("resources") or {})))


def _stored_sweep_demand(spec: dict[str, Any]) -> Demand:
    # Without SweepSpec's own validation, which applies every value of the space to the base again.
    sweep = SweepSpec.model_construct(
        base=JobSpec.model_validate(spec["base"]), num_samples=spec["num_samples"],
        max_concurrent_trials=spec.get("max_concurrent_trials"),
        space={path: Domain.model_validate(domain) for path, domain in spec["space"].items()})
    return sweep_demand(sweep)


# ------------------------------------------------------------------------------------------ limits


def defaults(settings: Settings) -> dict[str, int]:
    return {name: getattr(settings, f"quota_{name}") for name in NAMES}


def _overrides_of(row: TenantQuota | None) -> dict[str, int]:
    if row is None:
        return {}
    return {name: value for name in NAMES if (value := getattr(row, name)) is not None}


def get_overrides(*, session: Session, tenant: str) -> dict[str, int]:
    return _overrides_of(session.get(TenantQuota, tenant))


def get_limits(*, session: Session, settings: Settings, tenant: str) -> QuotaLimits:
    return QuotaLimits(**{**defaults(settings), **get_overrides(session=session, tenant=tenant)})


def set_overrides(*, session: Session, tenant: str, values: dict[str, int | None], replace: bool) -> None:
    """Set the given overrides (None: back to the default); with ``replace``, the others go back to
    their defaults too. Commits."""
    unknown = set(values) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown quotas: {', '.join(sorted(unknown))}")
    row = _locked_row(session, tenant)
    for name in NAMES:
        if name in values or replace:
            setattr(row, name, values.get(name))
    row.updated_at = utcnow()
    session.commit()


def clear_overrides(*, session: Session, tenant: str) -> None:
    """Every quota of the tenant back to its default. Commits."""
    set_overrides(session=session, tenant=tenant, values={}, replace=True)


def _locked_row(session: Session, tenant: str) -> TenantQuota:
    """The tenant's quota row (created, all defaults, if it has none), locked until the transaction
    ends: concurrent submissions and changes of one tenant's quotas take turns here.

    PostgreSQL: the upsert waits for a concurrent one of the same new tenant to end, then the row is
    selected FOR UPDATE. SQLite: the upsert is a write, which takes the database's write lock at
    once (before anything is read: a transaction that read first could not write after another's
    commit), held to the commit.
    """
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(insert(TenantQuota).values(tenant=tenant, updated_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["tenant"]))
    elif session.get(TenantQuota, tenant) is None:
        session.add(TenantQuota(tenant=tenant))
        session.flush()
    query = select(TenantQuota).where(TenantQuota.tenant == tenant).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


# --------------------------------------------------------------------------------------------- use


_MODEL_BYTES: dict[str, int] = {}  # a registered model's folder -> its bytes (the folder never changes)
_MODEL_BYTES_LIMIT = 100_000  # folders remembered; past that the memory starts again
_MODEL_BYTES_LOCK = threading.Lock()


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a model's folder: weights and model.json); 0 if it is gone."""
    total = 0
    try:
        entries = os.scandir(path)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    total += folder_bytes(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:  # removed meanwhile
                continue
    return total


def stored_model_bytes(path: str) -> int:
    """:func:`folder_bytes` of a registered model, remembered: the registry moves a model's folder
    into place whole before its row is committed and never changes it, so each folder is read once
    per process (a submission does not stat every stored file again, on a network volume neither)."""
    with _MODEL_BYTES_LOCK:
        known = _MODEL_BYTES.get(path)
    if known is not None:
        return known
    size = folder_bytes(Path(path))
    if size:  # a folder that is missing now is looked at again next time
        with _MODEL_BYTES_LOCK:
            if len(_MODEL_BYTES) >= _MODEL_BYTES_LIMIT:
                _MODEL_BYTES.clear()
            _MODEL_BYTES[path] = size
    return size


def use_by_tenant(*, session: Session, tenants: Iterable[str],
                  adaptations: dict[str, int] | None = None) -> dict[str, QuotaUse]:
    """What each of ``tenants`` holds now. ``adaptations``: queries in flight by tenant (this process's
    :class:`AdaptationShares`)."""
    tenants = list(tenants)
    totals: dict[str, dict[str, float]] = {tenant: dict.fromkeys(QuotaUse.model_fields, 0.0) for tenant in tenants}
    # The runs first, then the models: a run that succeeds between the two reads is counted twice
    # (as a run, and as its model), never not at all.
    for table, demand_of in ((Job, _stored_job_demand), (Sweep, _stored_sweep_demand)):
        rows = session.execute(select(table.tenant, table.spec)
                               .where(table.tenant.in_(tenants), table.status.in_(ACTIVE_STATUSES))).tuples()
        for tenant, spec in rows:
            try:
                demand = demand_of(spec)
            except (ValidationError, KeyError, TypeError) as exc:  # a spec stored by another version
                logger.warning("quota use of %s: a stored %s spec cannot be read (%s): counted as one run",
                               tenant, table.kind, exc)
                demand = Demand(jobs=int(table is Job), sweeps=int(table is Sweep))
            counts = totals[tenant]
            for name in ("jobs", "sweeps", "workers", "cpus", "gpus"):
                counts[name] += getattr(demand, name)
            counts["models"] += 1  # the model it registers if it succeeds
    for tenant, path in session.execute(select(Model.tenant, Model.path).where(Model.tenant.in_(tenants))).tuples():
        totals[tenant]["models"] += 1
        totals[tenant]["model_bytes"] += stored_model_bytes(path)
    for tenant, n in (adaptations or {}).items():
        if tenant in totals:
            totals[tenant]["adaptations"] = n
    return {tenant: QuotaUse(**{name: value if name in ("cpus", "gpus") else int(value)
                                for name, value in counts.items()})
            for tenant, counts in totals.items()}


def get_use(*, session: Session, tenant: str, adaptations: int = 0) -> QuotaUse:
    return use_by_tenant(session=session, tenants=[tenant], adaptations={tenant: adaptations})[tenant]


def describe(*, session: Session, settings: Settings, tenants: list[str],
             adaptations: dict[str, int] | None = None) -> list[TenantQuotaPublic]:
    """Each tenant's quotas in force, its overrides and its use."""
    use = use_by_tenant(session=session, tenants=tenants, adaptations=adaptations)
    rows = session.scalars(select(TenantQuota).where(TenantQuota.tenant.in_(tenants))).all()
    overrides = {row.tenant: _overrides_of(row) for row in rows}
    return [TenantQuotaPublic(tenant=tenant, limits=QuotaLimits(**{**defaults(settings), **overrides.get(tenant, {})}),
                              overrides=overrides.get(tenant, {}), use=use[tenant]) for tenant in tenants]


def list_tenants(*, session: Session, limit: int = 100, offset: int = 0) -> tuple[list[str], int]:
    """Tenants with a key, a quota row, a run or a model, by name: a page, and how many in all."""
    names = union(*(select(column) for column in (ApiKey.tenant, TenantQuota.tenant, Job.tenant, Sweep.tenant,
                                                  Model.tenant))).subquery()
    count = session.scalar(select(func.count()).select_from(names)) or 0
    page = session.scalars(select(names.c.tenant).order_by(names.c.tenant).limit(limit).offset(offset))
    return list(page.all()), count


# ---------------------------------------------------------------------------------------- admission


def _refuse(quota: str, *, limit: float, used: float, requested: float | None, retry_after: int) -> QuotaExceeded:
    # A request that alone is over a concurrency limit would never fit: retrying cannot help.
    never = requested is not None and requested > limit + _SLACK
    status = 429 if quota in CONCURRENCY and not never else 403
    return QuotaExceeded(quota, limit=limit, used=used, requested=requested, status=status,
                         retry_after=retry_after if status == 429 else None)


def _check(limits: QuotaLimits, use: QuotaUse, demand: Demand, settings: Settings) -> None:
    """Raise QuotaExceeded for the first quota ``demand`` would go over: size limits first (a 403 is
    final; a 429 then a 403 would only make the client wait for nothing), then concurrency."""
    retry = settings.quota_retry_after_s
    for quota in ("iterations", "trials"):
        asked = getattr(demand, quota)
        if asked > getattr(limits, quota):
            raise _refuse(quota, limit=getattr(limits, quota), used=asked, requested=asked, retry_after=retry)
    if use.models + 1 > limits.models:
        raise _refuse("models", limit=limits.models, used=use.models, requested=1, retry_after=retry)
    if use.model_bytes >= limits.model_bytes:  # a new model's size is not known before it is trained
        raise _refuse("model_bytes", limit=limits.model_bytes, used=use.model_bytes, requested=None,
                      retry_after=retry)
    for quota in ("jobs", "sweeps", "workers", "cpus", "gpus"):
        asked, used, limit = getattr(demand, quota), getattr(use, quota), getattr(limits, quota)
        if asked and used + asked > limit + _SLACK:
            raise _refuse(quota, limit=limit, used=used, requested=asked, retry_after=retry)


def precheck(*, session: Session, settings: Settings, tenant: str, demand: Demand) -> None:
    """:func:`admit`'s checks without the lock, and without writing: to refuse a request over its
    quota before its spec is checked (which builds the model). Ends its transaction."""
    try:
        limits = get_limits(session=session, settings=settings, tenant=tenant)
        _check(limits, get_use(session=session, tenant=tenant), demand, settings)
    finally:
        session.rollback()


def admit(*, session: Session, settings: Settings, tenant: str, demand: Demand) -> None:
    """Lock the tenant's quotas and check that ``demand`` fits in them, or QuotaExceeded (rolled back).

    The caller inserts its run in the same transaction and commits, which releases the lock; nothing
    else may commit in between. The tenant's use is read after the lock is held, so it includes every
    run a concurrent submission inserted before.
    """
    try:
        row = _locked_row(session, tenant)
        limits = QuotaLimits(**{**defaults(settings), **_overrides_of(row)})
        _check(limits, get_use(session=session, tenant=tenant), demand, settings)
    except BaseException:
        session.rollback()
        raise


# -------------------------------------------------------------------------------------- adaptation


class AdaptationShares:
    """Adaptation queries in flight per tenant, in this process: each tenant gets at most its
    ``adaptations`` quota of the adaptation pool's slots, so one tenant cannot fill them all.

    >>> release = shares.acquire("acme", shares.limit("acme", session_factory))   # QuotaExceeded: 429
    >>> ...; release()

    A tenant's limit is read from the database and remembered ``quota_cache_s`` seconds (an
    admin's change on this replica is seen at once: :meth:`forget`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._limits: dict[str, tuple[int, float]] = {}  # tenant -> (limit, monotonic time read)

    def in_flight(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._in_flight[tenant] if tenant is not None else sum(self._in_flight.values())

    def by_tenant(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def cached_limit(self, tenant: str) -> int | None:
        """The tenant's limit if read less than ``quota_cache_s`` ago (no database access)."""
        with self._lock:
            cached = self._limits.get(tenant)
        if cached is None or time.monotonic() - cached[1] >= self.settings.quota_cache_s:
            return None
        return cached[0]

    def limit(self, tenant: str, session_factory: sessionmaker[Session]) -> int:
        """The tenant's adaptations quota: remembered, else read (blocking: call it off the event loop)."""
        cached = self.cached_limit(tenant)
        if cached is not None:
            return cached
        with session_factory() as session:
            limit = get_limits(session=session, settings=self.settings, tenant=tenant).adaptations
        with self._lock:
            self._limits[tenant] = (limit, time.monotonic())
        return limit

    def forget(self, tenant: str) -> None:
        with self._lock:
            self._limits.pop(tenant, None)

    def acquire(self, tenant: str, limit: int) -> None:
        """Count one more query of ``tenant``, or QuotaExceeded (429 with the adaptation Retry-After)
        when it already has ``limit`` in flight. Pair with :meth:`release`."""
        with self._lock:
            used = self._in_flight[tenant]
            if used + 1 > limit:
                raise _refuse("adaptations", limit=limit, used=used, requested=1,
                              retry_after=self.settings.adapt_retry_after_s)
            self._in_flight[tenant] = used + 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]
