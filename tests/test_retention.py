"""Bounded storage (issue 12), on SQLite and PostgreSQL: a long job's metric series is downsampled
past ``MAML_MAX_METRIC_POINTS``; the SSE stream resumes after ``Last-Event-ID`` instead of
replaying the series; a sweep's unchanged trials are not rewritten; adapted weights expire after
``MAML_ADAPTED_WEIGHTS_TTL_S`` (the route answers 404, the files are deleted)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from fastapi.testclient import TestClient
from helpers import SMALL_SINE, in_process_runner, make_app, submit, wait_for_job
from sqlalchemy import func, select

from service import jobs, registry, sweeps
from service.config import Settings
from service.db import AdaptedWeights, Job, JobMetric, init_db, make_engine, make_session_factory
from service.events import job_events
from service.manager import JobManager, SweepManager, _SweepRun
from service.sweeps import create_sweep
from workers.spec import JobSpec
from workers.sweep_spec import SweepSpec, TrialInfo

API = "/api/v1"


def test_a_long_series_is_downsampled_at_every_evaluation_and_the_end(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_metric_points": 10})
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    factory = make_session_factory(engine)
    manager = JobManager(settings=settings, session_factory=factory, run_fn=in_process_runner)
    manager.start()
    try:
        with factory() as session:  # 65 iterations, at most 10 points: every 7th, the evaluations (30, 60), the last
            job_id = jobs.create_job(session=session, tenant="acme", spec=JobSpec.model_validate(
                {**SMALL_SINE, "outer": {"iterations": 65, "meta_batch_size": 4}})).id
        manager.submit(job_id)
        deadline = time.monotonic() + 60
        while (job := _job(factory, job_id)).status not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        manager.stop()
    assert job.status == "succeeded" and job.iteration == 65
    with factory() as session:
        stored = sorted(session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all())
    assert stored == sorted({*range(7, 66, 7), 30, 60, 65})
    engine.dispose()


def _job(factory, job_id: str) -> Job:
    with factory() as session:
        return session.get(Job, job_id)


def test_the_event_stream_resumes_after_the_last_event_id(settings: Settings) -> None:
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        job_id = jobs.create_job(session=session, tenant="acme", spec=JobSpec.model_validate(SMALL_SINE)).id
        jobs.record_progress(session=session, job_id=job_id, points=[(i, {"meta/loss": 1.0 / i}) for i in range(1, 21)],
                             eta_s=None)
        jobs.finish_job(session=session, job_id=job_id, status="cancelled")

    async def collect(after_id: int) -> list[dict[str, str]]:
        return [event async for event in job_events(factory, job_id, poll_s=0.01, after_id=after_id)]

    everything = asyncio.run(collect(0))
    metrics = [event for event in everything if event["event"] == "metrics"]
    assert len(metrics) == 20 and all("id" in event for event in metrics)
    resumed = asyncio.run(collect(int(metrics[14]["id"])))  # the client saw 15 points, then reconnected
    again = [event for event in resumed if event["event"] == "metrics"]
    assert [event["data"] for event in again] == [event["data"] for event in metrics[15:]]
    assert resumed[-1]["event"] == "end"
    engine.dispose()


def test_unchanged_trials_are_not_rewritten(settings: Settings, monkeypatch) -> None:
    settings = settings.model_copy(update={"metrics_flush_s": 0.0})
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    factory = make_session_factory(engine)
    writes: list[Any] = []
    original = sweeps.record_trials
    monkeypatch.setattr(sweeps, "record_trials", lambda **kwargs: (writes.append(kwargs["trials"]),
                                                                   original(**kwargs)))
    manager = SweepManager(settings=settings, session_factory=factory)
    with factory() as session:
        sweep_id = create_sweep(session=session, tenant="acme", spec=SweepSpec.model_validate(
            {"name": "s", "base": {}, "space": {"inner.lr": {"grid": [0.01, 0.1]}}})).id
    run = _SweepRun(manager, sweep_id, threading.Event())

    def trial(iteration: int, status: str = "running") -> TrialInfo:
        return TrialInfo(trial_id="t1", config={"inner.lr": 0.01}, status=status, iteration=iteration,
                         total_iterations=10)

    run.update([trial(1)])
    run.update([trial(1)])  # the same snapshot again, past the flush interval
    run.should_stop()
    run.update([trial(2)])
    run.update([trial(2, "completed")])
    assert [rows[0]["iteration"] for rows in writes] == [1, 2, 2]
    assert [rows[0]["status"] for rows in writes] == ["running", "running", "completed"]
    engine.dispose()


def test_adapted_weights_expire(settings: Settings) -> None:
    settings = settings.model_copy(update={"adapted_weights_ttl_s": 1.0})
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, outer={"iterations": 4, "meta_batch_size": 2}, eval={"every": 4, "tasks": 2})
        model_id = wait_for_job(client, job["id"], headers)["model_id"]
        body = {"support": {"x": [[0.1], [0.2]], "y": [[0.5], [0.7]]}, "query": {"x": [[0.3]]},
                "return_weights": True}
        first = client.post(f"{API}/models/{model_id}/adapt", json=body, headers=headers).json()["adapted_id"]
        assert client.get(f"{API}/adapted/{first}/weights", headers=headers).status_code == 200
        time.sleep(1.2)
        assert client.get(f"{API}/adapted/{first}", headers=headers).status_code == 404  # expired, not yet purged
        services = client.app.state.services
        services.adapter._last_purge = float("-inf")
        second = client.post(f"{API}/models/{model_id}/adapt", json=body, headers=headers).json()["adapted_id"]
        with services.session_factory() as session:
            left = session.scalars(select(AdaptedWeights.id)).all()
            assert session.scalar(select(func.count()).select_from(AdaptedWeights)) == 1
        assert left == [second]
        files = list(registry.adapted_dir(settings.storage_path).glob("*.safetensors"))
        assert [f.stem for f in files] == [second]


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append(fields)
    return events


def test_streams_resume_after_last_event_id_and_are_capped_per_tenant(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_streams_per_tenant": 2})
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, outer={"iterations": 20, "meta_batch_size": 2}, eval={"every": 20, "tasks": 2})
        wait_for_job(client, job["id"], headers)
        url = f"{API}/jobs/{job['id']}/events"
        everything = [e for e in sse_events(client.get(url, headers=headers).text) if e["event"] == "metrics"]
        assert len(everything) == 20
        resumed = sse_events(client.get(url, headers={**headers, "Last-Event-ID": everything[14]["id"]}).text)
        assert [e["data"] for e in resumed if e["event"] == "metrics"] == [e["data"] for e in everything[15:]]
        assert resumed[-1]["event"] == "end"
        bad = client.get(url, headers={**headers, "Last-Event-ID": "yesterday"})
        assert bad.status_code == 422 and "last-event-id" in bad.text.lower()
        # An id past the 32-bit column (found by the API fuzzer on PostgreSQL): no point after it.
        beyond = sse_events(client.get(url, headers={**headers, "Last-Event-ID": str(2**31)}).text)
        assert not [e for e in beyond if e["event"] == "metrics"] and beyond[-1]["event"] == "end"

        streams = client.app.state.services.streams
        assert streams._open == {}  # every stream above gave its slot back when it ended
        streams.acquire("admin")
        streams.acquire("admin")  # two streams open (say, in other tabs)
        over = client.get(url, headers=headers)
        assert over.status_code == 429 and over.json()["quota"] == "streams" and over.json()["limit"] == 2
        assert "retry-after" in over.headers
        streams.release("admin")
        assert client.get(url, headers=headers).status_code == 200
