"""Jobs: the submission policy (allow-listed factories, confined dataset paths) and data access.

Data access functions are keyword-only and take the session; a ``scope`` of None is the admin
(every tenant), otherwise the caller's tenant: another tenant's job is simply not found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import JOB_STATUSES, TERMINAL_STATUSES, Job, JobMetric, utcnow
from service.errors import Conflict, InvalidInput, NotFound
from service.schemas import finite_metrics
from workers.errors import ModelError, SpecError
from workers.models import build_model
from workers.spec import ImageFolderTask, JobSpec, OmniglotTask
from workers.training import build

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ policy


def resolve_data_path(path: str, roots: Sequence[Path]) -> Path:
    """``task.path`` inside one of the data roots (symlinks resolved), or InvalidInput.

    A relative path is taken relative to each root in turn; the first that exists wins.
    """
    if not roots:
        raise InvalidInput("task.path", "no data roots are configured on the server (MAML_DATA_ROOTS)")
    given = Path(path).expanduser()
    candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
    for candidate in candidates:
        if not any(candidate == root or candidate.is_relative_to(root) for root in roots):
            raise InvalidInput("task.path", f"'{path}' is outside the configured data roots "
                               f"({', '.join(str(r) for r in roots)})")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InvalidInput("task.path", f"'{path}' is not a folder under the data roots")


def check_spec(spec: JobSpec, settings: Settings) -> JobSpec:
    """Apply the server's policy to a valid spec; returns it with ``task.path`` made absolute.

    Raises InvalidInput naming the field: a model factory outside the allow-list (it is not even
    imported), a factory that refuses its kwargs, a dataset path outside the data roots, a dataset
    that cannot give the tasks asked for (more ways than classes, fewer images than shots plus
    queries), a model that does not fit the task's inputs. The task family and the model are built
    once here, so such a job is refused at submission instead of failing later.
    """
    spec = spec.model_copy(deep=True)
    if spec.model.factory is not None:
        try:
            # Checks the allow-list before anything is imported, then the import and the kwargs.
            build_model(spec.model, input_shape=(1,), output_dim=1, allowed_modules=settings.model_allowlist)
        except ModelError as exc:
            raise InvalidInput(exc.field, exc.detail) from exc
        except Exception as exc:  # the user's factory failed: still the request's fault
            raise InvalidInput("model.factory", f"{spec.model.factory} failed: {type(exc).__name__}: {exc}") from exc
    task = spec.task
    if isinstance(task, OmniglotTask | ImageFolderTask):
        if task.path is not None:
            task.path = str(resolve_data_path(task.path, settings.allowed_data_roots))
        elif settings.data_root is None:
            raise InvalidInput("task.path", "required: the server has no default data root (MAML_DATA_ROOT)")
    if not spec.is_rl:
        try:
            build(spec, data_root=settings.data_root, cache_dir=settings.cache_path,
                  allowed_modules=settings.model_allowlist)
        except SpecError as exc:  # DatasetError, ModelError: the field is theirs
            raise InvalidInput(exc.field, exc.detail) from exc
    return spec


# ------------------------------------------------------------------------------------- data access


def _scoped(statement: Any, scope: str | None) -> Any:
    return statement if scope is None else statement.where(Job.tenant == scope)


def create_job(*, session: Session, tenant: str, spec: JobSpec) -> Job:
    job = Job(tenant=tenant, name=spec.name, spec=spec.model_dump(mode="json"), status="queued",
              total=spec.outer.iterations, iteration=0, metrics={}, attempts=0, cancel_requested=False)
    session.add(job)
    session.commit()
    return job


def get_job(*, session: Session, job_id: str, scope: str | None) -> Job:
    job = session.get(Job, job_id)
    if job is None or (scope is not None and job.tenant != scope):
        raise NotFound("job", job_id)
    return job


def list_jobs(*, session: Session, scope: str | None, status: str | None = None, limit: int = 100,
              offset: int = 0) -> tuple[list[Job], int]:
    """A page of jobs, newest first, and how many match in all."""
    where = _scoped(select(Job), scope)
    counted = _scoped(select(func.count()).select_from(Job), scope)
    if status is not None:
        where, counted = where.where(Job.status == status), counted.where(Job.status == status)
    count = session.scalar(counted) or 0
    rows = session.scalars(where.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), count


def _metrics_filter(statement: Any, job_id: str, since: int | None, after_id: int | None) -> Any:
    statement = statement.where(JobMetric.job_id == job_id)
    if since is not None:
        statement = statement.where(JobMetric.iteration > since)
    if after_id is not None:
        statement = statement.where(JobMetric.id > after_id)
    return statement


def list_metrics(*, session: Session, job_id: str, since: int | None = None, limit: int | None = None,
                 after_id: int | None = None, order_by_id: bool = False) -> list[JobMetric]:
    """The metric series by iteration (or in insertion order): points after iteration ``since``,
    or after row ``after_id`` (how a live stream resumes)."""
    query = _metrics_filter(select(JobMetric), job_id, since, after_id)
    query = query.order_by(JobMetric.id) if order_by_id else query.order_by(JobMetric.iteration, JobMetric.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query).all())


def count_metrics(*, session: Session, job_id: str, since: int | None = None) -> int:
    return session.scalar(_metrics_filter(select(func.count()).select_from(JobMetric), job_id, since, None)) or 0


def request_cancel(*, session: Session, job_id: str, scope: str | None) -> Job:
    """Cancel a queued job at once; flag a running one (the manager stops it). Finished: Conflict."""
    job = get_job(session=session, job_id=job_id, scope=scope)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job '{job_id}' is already {job.status}")
    if job.status == "queued":
        changed = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                                  .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
        if changed.rowcount == 0:  # type: ignore[attr-defined]  # claimed by a worker meanwhile
            session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    else:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.commit()
    session.refresh(job)
    return job


def count_by_status(*, session: Session) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = n
    return counts


# ----------------------------------------------------------------------------- manager transitions


def claim_job(*, session: Session, job_id: str) -> Job | None:
    """queued -> running, atomically; None if the job is no longer queued (cancelled meanwhile)."""
    changed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="running", attempts=Job.attempts + 1, started_at=utcnow(), error=None, eta_s=None))
    session.commit()
    if changed.rowcount == 0:  # type: ignore[attr-defined]
        return None
    return session.get(Job, job_id, populate_existing=True)


def record_progress(*, session: Session, job_id: str, points: Iterable[tuple[int, dict[str, float]]],
                    eta_s: float | None, replace_from: int | None = None) -> None:
    """Append metric points and move the job's progress to the last one.

    ``replace_from``: the first iteration of a resumed run; points at or after it from the run
    that was interrupted are dropped first, so the series has each iteration once.
    """
    rows = [JobMetric(job_id=job_id, iteration=it, metrics=finite_metrics(m)) for it, m in points]
    if replace_from is not None:
        session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.iteration >= replace_from))
    if rows:
        session.add_all(rows)
        iteration, latest = rows[-1].iteration, rows[-1].metrics
        session.execute(update(Job).where(Job.id == job_id).values(iteration=iteration, metrics=latest, eta_s=eta_s))
    session.commit()


def is_cancel_requested(*, session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(*, session: Session, job_id: str, status: str, error: str | None = None,
               model_id: str | None = None, iteration: int | None = None,
               metrics: dict[str, float] | None = None) -> None:
    """A run ended: a terminal status, or back to queued (a shutdown, to resume on the next start)."""
    values: dict[str, Any] = {"status": status, "error": error, "eta_s": None}
    if status in TERMINAL_STATUSES:
        values["finished_at"] = utcnow()
    if model_id is not None:
        values["model_id"] = model_id
    if iteration is not None:
        values["iteration"] = iteration
    if metrics is not None:
        values["metrics"] = finite_metrics(metrics)
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def recover_jobs(*, session: Session, max_attempts: int) -> list[str]:
    """After a restart: settle jobs a previous process left running; return the queue, oldest first.

    A running job whose cancel was requested is cancelled; one started ``max_attempts`` times
    already is failed with the reason (it keeps taking the service down, or keeps being killed);
    the rest are requeued, and their runner resumes from the last checkpoint in the run folder.
    """
    for job in session.scalars(select(Job).where(Job.status == "running")).all():
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", utcnow()
            logger.info("job %s: cancelled (cancel requested before the restart)", job.id)
        elif job.attempts >= max_attempts:
            job.status, job.finished_at = "failed", utcnow()
            job.error = (f"Interrupted: the service stopped while the job was running, {job.attempts} times "
                         f"(limit MAML_MAX_JOB_ATTEMPTS={max_attempts}); last progress at iteration {job.iteration}")
            logger.warning("job %s: failed after %d interrupted attempts", job.id, job.attempts)
        else:
            job.status, job.eta_s = "queued", None
            logger.info("job %s: interrupted at iteration %d, requeued to resume from its checkpoint",
                        job.id, job.iteration)
    session.commit()
    return list(session.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)).all())

