"""Jobs: submit, list, inspect, follow (metrics, live events) and cancel meta-training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from api.deps import CurrentKey, ManagerDep, ServicesDep, SessionDep, SettingsDep
from service import jobs
from service.events import job_events
from service.schemas import JobCreate, JobPublic, JobsPublic, JobStatus, MetricPoint, MetricsPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, key: CurrentKey, settings: SettingsDep,
               manager: ManagerDep) -> JobPublic:
    """Submit a job: 201 with the job, queued. A spec the server's policy refuses answers 422."""
    spec = jobs.check_spec(body, settings)
    job = jobs.create_job(session=session, tenant=key.tenant, spec=spec)
    manager.submit(job.id)
    return JobPublic.from_row(job)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, key: CurrentKey, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobsPublic:
    """The caller's jobs, newest first: ``{"data": [...], "count": N}`` (count over all pages)."""
    rows, count = jobs.list_jobs(session=session, scope=key.scope, status=status, limit=limit, offset=offset)
    return JobsPublic(data=[JobPublic.from_row(job) for job in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, key: CurrentKey) -> JobPublic:
    return JobPublic.from_row(jobs.get_job(session=session, job_id=job_id, scope=key.scope))


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_job_metrics(job_id: str, session: SessionDep, key: CurrentKey,
                    since: Annotated[int | None, Query(ge=-1, le=2**62, description="iterations after this")] = None,
                    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> MetricsPublic:
    """The metric series by iteration; ``count`` is the number of points after ``since``."""
    jobs.get_job(session=session, job_id=job_id, scope=key.scope)
    points = jobs.list_metrics(session=session, job_id=job_id, since=since, limit=limit)
    return MetricsPublic(data=[MetricPoint.model_validate(p) for p in points],
                         count=jobs.count_metrics(session=session, job_id=job_id, since=since))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "status, progress, metrics and end events until the job ends"}})
async def get_job_events(job_id: str, key: CurrentKey, services: ServicesDep,
                         settings: SettingsDep) -> EventSourceResponse:
    """Server-Sent Events of the job until it ends (see ``service.events``)."""

    def check() -> None:
        with services.session_factory() as session:
            jobs.get_job(session=session, job_id=job_id, scope=key.scope)

    await run_in_threadpool(check)
    return EventSourceResponse(job_events(services.session_factory, job_id, poll_s=settings.events_poll_s), ping=15)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, key: CurrentKey, manager: ManagerDep) -> JobPublic:
    """Cancel: a queued job at once, a running one within an iteration (status stays running until
    it stops). A job that already ended answers 409."""
    job = jobs.request_cancel(session=session, job_id=job_id, scope=key.scope)
    manager.cancel(job_id)
    return JobPublic.from_row(job)
