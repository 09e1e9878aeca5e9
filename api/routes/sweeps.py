"""Sweeps: submit, list, inspect, follow (live trial events) and cancel hyperparameter sweeps."""

from __future__ import annotations

from fastapi import APIRouter
from sse_starlette import EventSourceResponse

from api.deps import CurrentKey, PageLimit, PageOffset, ServicesDep, SessionDep, SettingsDep, SweepManagerDep, check_run
from service import quotas, runs, sweeps
from service.db import Sweep
from service.events import sweep_events
from service.schemas import SweepCreate, SweepPublic, SweepsPublic, SweepStatus

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


@router.post("", status_code=201, response_model=SweepPublic)
def create_sweep(body: SweepCreate, session: SessionDep, key: CurrentKey, settings: SettingsDep,
                 manager: SweepManagerDep) -> SweepPublic:
    """Submit a sweep: 201 with the sweep, queued. A bad search space (empty, an unknown field path,
    low above high, a value the job spec refuses) or a base the server's policy refuses answers 422
    naming the field. A sweep over the tenant's quotas answers 429 (concurrent sweeps, workers, CPUs,
    GPUs: retry later) or 403 (trials, iterations per trial, stored models), naming the quota."""
    demand = quotas.sweep_demand(body)
    quotas.precheck(session=session, settings=settings, tenant=key.tenant, demand=demand)
    spec = sweeps.check_sweep(body, settings)
    quotas.admit(session=session, settings=settings, tenant=key.tenant, demand=demand)  # held to the commit
    sweep = sweeps.create_sweep(session=session, tenant=key.tenant, spec=spec)
    manager.submit(sweep.id)
    return SweepPublic.from_row(sweep)


@router.get("", response_model=SweepsPublic)
def list_sweeps(session: SessionDep, key: CurrentKey, status: SweepStatus | None = None, limit: PageLimit = 100,
                offset: PageOffset = 0) -> SweepsPublic:
    """The caller's sweeps, newest first: ``{"data": [...], "count": N}`` (count over all pages)."""
    rows, count = runs.list_runs(session=session, table=Sweep, scope=key.scope, status=status, limit=limit,
                                 offset=offset)
    return SweepsPublic(data=[SweepPublic.from_row(s) for s in rows], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic)
def get_sweep(sweep_id: str, session: SessionDep, key: CurrentKey) -> SweepPublic:
    """The sweep: its trials (config, status, iterations, metrics, error), the best trial and its model."""
    return SweepPublic.from_row(runs.get_run(session=session, table=Sweep, run_id=sweep_id, scope=key.scope))


@router.get("/{sweep_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "status, trials and end events until the sweep ends"}})
async def get_sweep_events(sweep_id: str, key: CurrentKey, services: ServicesDep,
                           settings: SettingsDep) -> EventSourceResponse:
    """Server-Sent Events of the sweep's trials until it ends (see ``service.events``); at most
    ``MAML_MAX_STREAMS_PER_TENANT`` streams per tenant and replica (429 naming ``streams``)."""
    await check_run(services, Sweep, sweep_id, key)
    assert services.streams is not None
    services.streams.acquire(key.tenant)
    events = sweep_events(services.session_factory, sweep_id, poll_s=settings.events_poll_s)
    return EventSourceResponse(services.streams.hold(key.tenant, events), ping=15)


@router.post("/{sweep_id}/cancel", status_code=202, response_model=SweepPublic)
def cancel_sweep(sweep_id: str, session: SessionDep, key: CurrentKey, manager: SweepManagerDep) -> SweepPublic:
    """Cancel: a queued sweep at once, a running one within a second or so (its running and pending
    trials end as cancelled; status stays running until then). A sweep that already ended answers 409."""
    sweep = runs.request_cancel(session=session, table=Sweep, run_id=sweep_id, scope=key.scope)
    manager.cancel(sweep_id)
    return SweepPublic.from_row(sweep)
