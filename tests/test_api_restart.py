"""Restarts: stop the service mid-job, start a new app on the same data dir, the job completes.

Both ways a service goes down: a clean stop (the runner checkpoints and the job is left queued)
and a crash (the job is left "running" with progress past its last checkpoint; the next start
requeues it, it resumes from that checkpoint and the metric series keeps each iteration once).
"""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient
from helpers import in_process_runner, make_app, make_settings, submit, wait_for_job
from sqlalchemy import update

from service.db import Job, make_engine, make_session_factory

API = "/api/v1"
pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL
SPEC = {"outer": {"iterations": 120, "meta_batch_size": 2}, "eval": {"every": 120, "tasks": 2},
        "checkpoint": {"every": 10, "keep": 3}}


def slow_runner(spec, **kwargs):
    """Training at a pace a test can interrupt: 20 ms per reported iteration."""
    reporter = kwargs.pop("reporter")

    def report(iteration, metrics):
        time.sleep(0.02)
        reporter(iteration, metrics)

    return in_process_runner(spec, reporter=report, **kwargs)


def start_and_interrupt(settings, headers) -> dict:
    """Submit a job, stop the app (cleanly) once it is a few checkpoints in; the job as left."""
    with TestClient(make_app(settings, slow_runner)) as client:
        job = submit(client, headers, **SPEC)
        wait_for_job(client, job["id"], headers, until=lambda j: j["progress"]["iteration"] >= 25, timeout=30)
    return job


def test_clean_stop_leaves_the_job_queued_and_the_next_start_finishes_it(tmp_path, admin_headers) -> None:
    settings = make_settings(tmp_path)
    job = start_and_interrupt(settings, admin_headers)
    with TestClient(make_app(settings)) as client:
        stopped_at = client.get(f"{API}/jobs/{job['id']}", headers=admin_headers).json()
        done = wait_for_job(client, job["id"], admin_headers)
        series = client.get(f"{API}/jobs/{job['id']}/metrics", headers=admin_headers).json()["data"]
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["progress"]["iteration"] == 120 and done["model_id"]
    assert stopped_at["attempts"] >= 1 and stopped_at["progress"]["iteration"] >= 25
    assert [p["iteration"] for p in series] == list(range(1, 121))


def test_crash_mid_job_is_recovered_from_the_last_checkpoint(tmp_path, admin_headers) -> None:
    settings = make_settings(tmp_path)
    job = start_and_interrupt(settings, admin_headers)
    # What a crash leaves: the row still "running", and no checkpoint written at the stop (the
    # newest one here), so the last checkpoint is behind the last reported iteration.
    checkpoints = sorted((settings.storage_path / "jobs" / job["id"] / "checkpoints").glob("iter_*"))
    shutil.rmtree(checkpoints[-1])
    resume_from = int(checkpoints[-2].name.removeprefix("iter_"))
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running"))
        session.commit()
        reported = session.get(Job, job["id"]).iteration
    engine.dispose()
    assert reported > resume_from

    with TestClient(make_app(settings)) as client:
        done = wait_for_job(client, job["id"], admin_headers)
        series = client.get(f"{API}/jobs/{job['id']}/metrics", headers=admin_headers).json()["data"]
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["progress"]["iteration"] == 120
    assert [p["iteration"] for p in series] == list(range(1, 121))  # the replayed iterations once each


def test_a_job_interrupted_too_often_fails_with_the_reason(tmp_path, admin_headers) -> None:
    settings = make_settings(tmp_path, max_job_attempts=2)
    job = start_and_interrupt(settings, admin_headers)
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running", attempts=2))
        session.commit()
    engine.dispose()
    with TestClient(make_app(settings)) as client:
        failed = client.get(f"{API}/jobs/{job['id']}", headers=admin_headers).json()
    assert failed["status"] == "failed" and "Interrupted" in failed["error"] and "2 times" in failed["error"]


def test_a_cancel_requested_before_a_crash_is_honoured(tmp_path, admin_headers) -> None:
    settings = make_settings(tmp_path)
    job = start_and_interrupt(settings, admin_headers)
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running", cancel_requested=True))
        session.commit()
    engine.dispose()
    with TestClient(make_app(settings)) as client:
        assert client.get(f"{API}/jobs/{job['id']}", headers=admin_headers).json()["status"] == "cancelled"
