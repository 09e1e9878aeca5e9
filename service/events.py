"""Live job events for Server-Sent Events: progress, new metric points and status, until the job ends.

The stream polls the database (every ``poll_s``), so it shows the same truth as ``GET /jobs/{id}``
whichever process runs the job. Each event is ``{"event": name, "data": json}``:

* ``status``: ``{"status", "error", "model_id"}`` when the status changes (first event included);
* ``progress``: ``{"iteration", "total", "eta_s"}`` when the iteration moves;
* ``metrics``: ``{"iteration", "metrics"}`` for every new point of the series;
* ``end``: the final job, after which the stream closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.db import TERMINAL_STATUSES
from service.schemas import JobPublic, MetricPoint

_POINTS_PER_POLL = 1000


def _snapshot(session_factory: sessionmaker[Session], job_id: str,
              after_id: int) -> tuple[JobPublic, list[tuple[int, MetricPoint]]]:
    with session_factory() as session:
        job = jobs.get_job(session=session, job_id=job_id, scope=None)
        points = jobs.list_metrics(session=session, job_id=job_id, after_id=after_id, limit=_POINTS_PER_POLL,
                                   order_by_id=True)
        return JobPublic.from_row(job), [(p.id, MetricPoint.model_validate(p)) for p in points]


def _event(name: str, data: Any) -> dict[str, str]:
    return {"event": name, "data": json.dumps(data, allow_nan=False)}


async def job_events(session_factory: sessionmaker[Session], job_id: str, *,
                     poll_s: float) -> AsyncIterator[dict[str, str]]:
    """Events of one job (already checked to belong to the caller) until it ends."""
    status: str | None = None
    iteration = -1
    after_id = 0
    while True:
        job, points = await run_in_threadpool(_snapshot, session_factory, job_id, after_id)
        for row_id, point in points:
            after_id = row_id
            yield _event("metrics", point.model_dump(mode="json"))
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
