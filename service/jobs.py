"""Jobs: the submission policy (allow-listed factories, confined dataset paths) and data access.

What jobs share with sweeps (get, list, cancel, claim, finish, recover) is in :mod:`service.runs`;
here is what only jobs have: their creation and their metric series. Data access functions are
keyword-only and take the session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from torch import nn

from service import runs
from service.config import Settings
from service.db import JOB_STATUSES, DatabaseUnavailable, Job, JobMetric, retry_transient
from service.errors import InvalidInput
from service.schemas import finite_metrics
from workers.errors import SpecError
from workers.mamlpp import attach_for
from workers.models import build_model, parameter_count
from workers.rl.program import build_family, build_policy
from workers.spec import ImageFolderTask, JobSpec, OmniglotTask
from workers.supervised import torch_dtype
from workers.tasks import check_task

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
    queries), a model that does not fit the task's inputs, a model over
    ``MAML_MAX_MODEL_PARAMETERS``. The task is checked without decoding any dataset
    (``workers.tasks.check_task``: Omniglot from its zips' listings; for meta-RL, the environment
    family is built) and the model is built on PyTorch's meta device (shapes only): nothing of a
    tenant's size is allocated or decoded in this process, and such a job is refused at submission
    instead of failing later. The count includes the learned inner-loop pieces that training adds to
    the model (``workers.mamlpp.attach_for``, run here on the meta-device model: Meta-SGD doubles it).
    """
    spec = spec.model_copy(deep=True)
    if spec.model.factory is not None:
        # Checks the allow-list before anything is imported, then the import and the kwargs.
        _count_parameters(spec, lambda: build_model(spec.model, input_shape=(1,), output_dim=1,
                                                    allowed_modules=settings.model_allowlist))
    task = spec.task
    if isinstance(task, OmniglotTask | ImageFolderTask):
        if task.path is not None:
            task.path = str(resolve_data_path(task.path, settings.allowed_data_roots))
        elif settings.data_root is None:
            raise InvalidInput("task.path", "required: the server has no default data root (MAML_DATA_ROOT)")
    try:
        if spec.is_rl:
            env_family = build_family(spec)  # the environments can be made here (half-cheetah needs MuJoCo)
            count = _count_parameters(spec, lambda: attach_for(build_policy(spec, env_family), spec))
        else:
            input_shape, output_dim = check_task(spec.task, data_root=settings.data_root,
                                                 cache_dir=settings.cache_path, dtype=torch_dtype(spec))
            # The model as training builds it (workers.supervised.build): with the learned pieces.
            count = _count_parameters(spec, lambda: attach_for(build_model(
                spec.model, input_shape=input_shape, output_dim=output_dim, allowed_modules=settings.model_allowlist),
                spec))
    except SpecError as exc:  # DatasetError, ModelError, an environment: the field is theirs
        raise InvalidInput(exc.field, exc.detail) from exc
    if count > settings.max_model_parameters:
        size = count * (8 if spec.dtype == "float64" else 4)
        raise InvalidInput("model", f"{count:,} parameters ({size / 2**20:,.0f} MiB in {spec.dtype}, before the "
                           f"optimizer's state) is over the server's limit of {settings.max_model_parameters:,} "
                           "(MAML_MAX_MODEL_PARAMETERS)")
    return spec


def _count_parameters(spec: JobSpec, make: Callable[[], nn.Module]) -> int:
    """``parameter_count(make)``, a user's factory failing on its own being the request's fault."""
    try:
        return parameter_count(make)
    except SpecError as exc:  # ModelError: not allow-listed, refused kwargs, too small an input
        raise InvalidInput(exc.field, exc.detail) from exc
    except Exception as exc:
        if spec.model.factory is None:
            raise
        raise InvalidInput("model.factory", f"{spec.model.factory} failed: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------- data access


def create_job(*, session: Session, tenant: str, spec: JobSpec) -> Job:
    job = Job(tenant=tenant, name=spec.name, spec=spec.model_dump(mode="json"), status="queued",
              total=spec.outer.iterations, iteration=0, metrics={}, attempts=0, cancel_requested=False)
    session.add(job)
    session.commit()
    return job


INT32_MAX = 2**31 - 1  # the largest value of an Integer column (PostgreSQL refuses a larger bound)


def _metrics_filter(statement: Any, job_id: str, since: int | None, after_id: int | None) -> Any:
    statement = statement.where(JobMetric.job_id == job_id)
    # Both columns are 32-bit and no value gets near the limit (outer.iterations <= 10^7): a
    # larger ``since`` or ``after_id`` (a client's Last-Event-ID) still means "nothing after it".
    if since is not None:
        statement = statement.where(JobMetric.iteration > min(since, INT32_MAX))
    if after_id is not None:
        statement = statement.where(JobMetric.id > min(after_id, INT32_MAX))
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


def count_by_status(*, session: Session) -> dict[str, int]:
    counts = Counter(dict.fromkeys(JOB_STATUSES, 0))
    counts.update(dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()))
    return dict(counts)


class ProgressNotRecorded(RuntimeError):
    """A running job's metric points could not be written (the database is down, locked or failing,
    after :func:`service.db.retry_transient`'s tries): none of them was stored, and the job's progress
    is as before, so the caller keeps the points and writes them with the next ones."""

    def __init__(self, job_id: str, points: int, cause: BaseException) -> None:
        super().__init__(f"job {job_id}: {points} metric points not written: {type(cause).__name__}: {cause}")
        self.job_id, self.points = job_id, points


def record_progress(*, session: Session, job_id: str, points: Iterable[tuple[int, dict[str, float]]],
                    eta_s: float | None, replace_from: int | None = None) -> None:
    """Append metric points and move the job's progress to the last one, in one transaction.

    ``replace_from``: the first iteration of a resumed run; points at or after it from the run
    that was interrupted are dropped first, so the series has each iteration once. A transient
    error (lost connection, locked database, deadlock) is tried again; when the write still fails,
    :class:`ProgressNotRecorded` (nothing was written).
    """
    cleaned = [(it, finite_metrics(m)) for it, m in points]  # a list: each try writes them all

    def write() -> None:
        if replace_from is not None:
            session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.iteration >= replace_from))
        if cleaned:
            session.add_all(JobMetric(job_id=job_id, iteration=it, metrics=m) for it, m in cleaned)
            iteration, latest = cleaned[-1]
            session.execute(update(Job).where(Job.id == job_id).values(iteration=iteration, metrics=latest,
                                                                        eta_s=eta_s))
        session.commit()

    try:
        retry_transient(session, write, what=f"job {job_id} progress")
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        with suppress(SQLAlchemyError):  # the session stays usable for the caller's next write
            session.rollback()
        raise ProgressNotRecorded(job_id, len(cleaned), exc) from exc


def finish_job(*, session: Session, job_id: str, status: str, error: str | None = None,
               model_id: str | None = None, iteration: int | None = None,
               metrics: dict[str, float] | None = None) -> None:
    """A job's run ended (:func:`service.runs.finish_run`), with its final progress when given."""
    runs.finish_run(session=session, table=Job, run_id=job_id, status=status, error=error, model_id=model_id,
                    iteration=iteration, metrics=None if metrics is None else finite_metrics(metrics))
