"""Jobs: submit, list, inspect, follow (metrics, live events) and cancel meta-training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse

from api.deps import CurrentKey, ManagerDep, PageLimit, PageOffset, ServicesDep, SessionDep, SettingsDep, check_run
from service import jobs, quotas, runs
from service.db import Job
from service.events import job_events
from service.schemas import JobCreate, JobPublic, JobsPublic, JobStatus, MetricPoint, MetricsPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, key: CurrentKey, settings: SettingsDep,
               manager: ManagerDep) -> JobPublic:
    """Submit a job: 201 with the job, queued. A spec the server's policy refuses answers 422; one over
    the tenant's quotas, 429 (concurrent jobs, workers, CPUs, GPUs: retry later) or 403 (iterations,
    stored models), naming the quota, its limit and the use."""
    demand = quotas.job_demand(body)
    # Before the policy's checks, which build the model: a tenant over its quota costs no more than this.
    quotas.precheck(session=session, settings=settings, tenant=key.tenant, demand=demand)
    spec = jobs.check_spec(body, settings)
    # Locks the tenant's quotas until create_job commits: concurrent submissions never go over together.
    quotas.admit(session=session, settings=settings, tenant=key.tenant, demand=demand)
    job = jobs.create_job(session=session, tenant=key.tenant, spec=spec)
    manager.submit(job.id)
    return JobPublic.from_row(job)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, key: CurrentKey, status: JobStatus | None = None, limit: PageLimit = 100,
              offset: PageOffset = 0) -> JobsPublic:
    """The caller's jobs, newest first: ``{"data": [...], "count": N}`` (count over all pages)."""
    rows, count = runs.list_runs(session=session, table=Job, scope=key.scope, status=status, limit=limit,
                                 offset=offset)
    return JobsPublic(data=[JobPublic.from_row(job) for job in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, key: CurrentKey) -> JobPublic:
    return JobPublic.from_row(runs.get_run(session=session, table=Job, run_id=job_id, scope=key.scope))


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_job_metrics(job_id: str, session: SessionDep, key: CurrentKey,
                    since: Annotated[int | None, Query(ge=-1, le=2**62, description="iterations after this")] = None,
                    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> MetricsPublic:
    """The metric series by iteration; ``count`` is the number of points after ``since``."""
    runs.get_run(session=session, table=Job, run_id=job_id, scope=key.scope)
    points = jobs.list_metrics(session=session, job_id=job_id, since=since, limit=limit)
    return MetricsPublic(data=[MetricPoint.model_validate(p) for p in points],
                         count=jobs.count_metrics(session=session, job_id=job_id, since=since))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "status, progress, metrics and end events until the job ends"}})
async def get_job_events(job_id: str, key: CurrentKey, services: ServicesDep, settings: SettingsDep,
                         last_event_id: Annotated[int | None, Header(ge=0, description=(
                             "resume: the metrics after this event's (a point's) id"))] = None) -> EventSourceResponse:
    """Server-Sent Events of the job until it ends (see ``service.events``); a reconnecting client sends
    ``Last-Event-ID`` and gets the metrics after it. At most ``MAML_MAX_STREAMS_PER_TENANT`` streams
    per tenant and replica (429 naming ``streams``)."""
    await check_run(services, Job, job_id, key)
    events = job_events(services.session_factory, job_id, poll_s=settings.events_poll_s, after_id=last_event_id or 0)
    assert services.streams is not None
    services.streams.acquire(key.tenant)
    return EventSourceResponse(services.streams.hold(key.tenant, events), ping=15)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, key: CurrentKey, manager: ManagerDep) -> JobPublic:
    """Cancel: a queued job at once, a running one within an iteration (status stays running until
    it stops). A job that already ended answers 409."""
    job = runs.request_cancel(session=session, table=Job, run_id=job_id, scope=key.scope)
    manager.cancel(job_id)
    return JobPublic.from_row(job)
