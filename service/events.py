"""Live events for Server-Sent Events, until the job or sweep ends.

The streams poll the database (every ``poll_s``), so they show the same truth as ``GET /jobs/{id}``
and ``GET /sweeps/{id}`` whichever process runs the work. Each event is ``{"event": name, "data": json}``.

A job's stream:

* ``status``: ``{"status", "error", "model_id"}`` when the status changes (first event included);
* ``progress``: ``{"iteration", "total", "eta_s"}`` when the iteration moves;
* ``metrics``: ``{"iteration", "metrics"}`` for every new point of the series, with the point's id
  as the event's ``id``: a client that reconnects with ``Last-Event-ID`` gets the points after it
  instead of the whole series again (the series itself is bounded: ``MAML_MAX_METRIC_POINTS``);
* ``end``: the final job, after which the stream closes.

A sweep's stream:

* ``status``: ``{"status", "error", "model_id"}`` when the status changes (first event included);
* ``trials``: ``{"trials", "counts"}`` (every trial, as in ``GET /sweeps/{id}``) when any trial changes;
* ``end``: the final sweep, after which the stream closes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service import jobs, runs
from service.db import TERMINAL_STATUSES, Job, Sweep
from service.errors import QuotaExceeded
from service.schemas import JobPublic, MetricPoint, SweepPublic

_POINTS_PER_POLL = 1000


def _snapshot(session_factory: sessionmaker[Session], job_id: str,
              after_id: int) -> tuple[JobPublic, list[tuple[int, MetricPoint]]]:
    with session_factory() as session:
        job = runs.get_run(session=session, table=Job, run_id=job_id, scope=None)
        points = jobs.list_metrics(session=session, job_id=job_id, after_id=after_id, limit=_POINTS_PER_POLL,
                                   order_by_id=True)
        return JobPublic.from_row(job), [(p.id, MetricPoint.model_validate(p)) for p in points]


class StreamSlots:
    """The event streams open in this replica, per tenant, at most ``limit`` each
    (``MAML_MAX_STREAMS_PER_TENANT``): one more answers 429 naming the quota ``streams``."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        with self._lock:
            if self._open[tenant] >= self.limit:
                raise QuotaExceeded("streams", limit=self.limit, used=self._open[tenant], requested=1, status=429,
                                    retry_after=self.retry_after_s)
            self._open[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._open[tenant] -= 1
            if self._open[tenant] <= 0:
                del self._open[tenant]

    async def hold(self, tenant: str, events: AsyncIterator[dict[str, str]]) -> AsyncIterator[dict[str, str]]:
        """``events``, the tenant's slot (acquired by the caller) released when the stream ends or its
        client leaves."""
        try:
            async for event in events:
                yield event
        finally:
            self.release(tenant)


def _event(name: str, data: Any, event_id: int | None = None) -> dict[str, str]:
    event = {"event": name, "data": json.dumps(data, allow_nan=False)}
    if event_id is not None:
        event["id"] = str(event_id)
    return event


async def job_events(session_factory: sessionmaker[Session], job_id: str, *, poll_s: float,
                     after_id: int = 0) -> AsyncIterator[dict[str, str]]:
    """Events of one job (already checked to belong to the caller) until it ends; the metrics from
    the point after ``after_id`` (a ``Last-Event-ID``) on."""
    status: str | None = None
    iteration = -1
    while True:
        job, points = await run_in_threadpool(_snapshot, session_factory, job_id, after_id)
        for row_id, point in points:
            after_id = row_id
            yield _event("metrics", point.model_dump(mode="json"), row_id)
        if job.progress.iteration != iteration:
            iteration = job.progress.iteration
            yield _event("progress", job.progress.model_dump(mode="json"))
        if job.status != status:
            status = job.status
            yield _event("status", {"status": status, "error": job.error, "model_id": job.model_id})
        if job.status in TERMINAL_STATUSES and len(points) < _POINTS_PER_POLL:
            yield _event("end", job.model_dump(mode="json"))
            return
        if len(points) < _POINTS_PER_POLL:
            await asyncio.sleep(poll_s)


def _sweep_snapshot(session_factory: sessionmaker[Session], sweep_id: str) -> SweepPublic:
    with session_factory() as session:
        return SweepPublic.from_row(runs.get_run(session=session, table=Sweep, run_id=sweep_id, scope=None))


async def sweep_events(session_factory: sessionmaker[Session], sweep_id: str, *,
                       poll_s: float) -> AsyncIterator[dict[str, str]]:
    """Events of one sweep (already checked to belong to the caller) until it ends."""
    status: str | None = None
    trials: list[dict[str, Any]] | None = None
    while True:
        sweep = await run_in_threadpool(_sweep_snapshot, session_factory, sweep_id)
        now = [t.model_dump(mode="json") for t in sweep.trials]
        if now != trials:
            trials = now
            yield _event("trials", {"trials": now, "counts": sweep.counts})
        if sweep.status != status:
            status = sweep.status
            yield _event("status", {"status": status, "error": sweep.error, "model_id": sweep.model_id})
        if sweep.status in TERMINAL_STATUSES:
            yield _event("end", sweep.model_dump(mode="json"))
            return
        await asyncio.sleep(poll_s)
