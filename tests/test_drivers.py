"""Drivers on the Ray cluster (``MAML_DRIVERS=ray``, :mod:`service.drivers`), on the session's local
cluster and both databases: a job is driven by a detached actor in another process, not by the
queue's process; a cancel reaches it; a driver that cannot start fails its job with the cause;
stopping the embedded service requeues the job resumably. The topology with an external cluster
and two API processes is in ``test_topology.py``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from helpers import new_job, wait_for_row
from sqlalchemy import func, select

from service import runs
from service.config import Settings
from service.db import Job, JobMetric, Model, init_db, make_engine, make_session_factory
from service.drivers import NAMESPACE, actor_name
from service.manager import JobManager

pytestmark = pytest.mark.ray
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def on_ray(settings: Settings, ray_cluster: None) -> Iterator[tuple[Settings, object]]:
    # A lease of 6 s: long enough that a loaded machine (a worker start of 20 s, SQLite busy) does not
    # lose it while the driver works, short enough for the takeover tests.
    settings = settings.model_copy(update={"drivers": "ray", "lease_ttl_s": 6.0})
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    yield settings, make_session_factory(engine)
    engine.dispose()
    # A stopped service leaves no driver behind on the cluster holding CPUs (the next tests need them).
    import ray

    deadline = time.monotonic() + 30  # a kill takes effect asynchronously
    while left := [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                   if entry["namespace"] == NAMESPACE]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def driver_exists(kind: str, run_id: str) -> bool:
    import ray

    return any(entry["name"] == actor_name(kind, run_id) and entry["namespace"] == NAMESPACE
               for entry in ray.util.list_named_actors(all_namespaces=True))


def test_a_job_is_driven_by_an_actor_on_the_cluster(on_ray) -> None:
    settings, factory = on_ray
    manager = JobManager(settings=settings, session_factory=factory)
    manager.start()
    try:
        job_id = new_job(factory)
        manager.submit(job_id)
        running = wait_for_row(factory, job_id,
                               lambda j: j.status in TERMINAL or (j.status == "running" and j.iteration))
        assert driver_exists("job", job_id)
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL)
        deadline = time.monotonic() + 30
        while driver_exists("job", job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not driver_exists("job", job_id)  # removed once its run ended
    finally:
        manager.stop()
    # The lease was held by the driver, a process of the cluster, not by the queue's process.
    assert running.lease_owner and running.lease_owner != manager.owner
    assert int(running.lease_owner.split(":")[1]) != os.getpid()
    assert manager.running == []
    assert job.status == "succeeded" and job.attempts == 1 and job.error is None and job.model_id
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1
        iterations = session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all()
    assert sorted(iterations) == list(range(1, 61))


@pytest.mark.parametrize("through", ["manager", "database"])
def test_a_cancel_reaches_the_driver(on_ray, through: str) -> None:
    """Through the replica that is told (it also calls the actor), or only by the flag another
    replica set in the database (the driver reads it with its lease)."""
    settings, factory = on_ray
    manager = JobManager(settings=settings, session_factory=factory)
    manager.start()
    try:
        job_id = new_job(factory, outer={"iterations": 1_000_000, "meta_batch_size": 4})
        manager.submit(job_id)
        wait_for_row(factory, job_id, lambda j: j.iteration >= 5)
        start = time.monotonic()
        with factory() as session:
            runs.request_cancel(session=session, table=Job, run_id=job_id, scope=None)
        if through == "manager":
            manager.cancel(job_id)
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        manager.stop()
    assert job.status == "cancelled" and elapsed < 10, (job.status, elapsed)


class UnreachableDatabase(JobManager):
    """A driver whose process cannot reach the database (say, the cluster's network)."""

    @classmethod
    def for_driver(cls, *, settings, session_factory):
        raise ConnectionRefusedError("the database is not reachable from this node")


def test_a_driver_that_cannot_start_fails_its_job_with_the_cause(on_ray) -> None:
    settings, factory = on_ray
    manager = UnreachableDatabase(settings=settings, session_factory=factory)
    manager.start()
    try:
        job_id = new_job(factory)
        manager.submit(job_id)
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL, timeout=60)
    finally:
        manager.stop()
    assert job.status == "failed" and job.attempts == 0
    assert "driver could not start" in job.error and "the database is not reachable from this node" in job.error


def test_stopping_the_embedded_service_requeues_its_jobs_to_resume(on_ray) -> None:
    """The embedded cluster ends with the service: its drivers stop resumably, and the next start
    resumes the job from its checkpoint."""
    settings, factory = on_ray
    job_id = new_job(factory, outer={"iterations": 400, "meta_batch_size": 4}, checkpoint={"every": 10})
    first = JobManager(settings=settings, session_factory=factory)
    first.start()
    try:
        first.submit(job_id)
        wait_for_row(factory, job_id, lambda j: j.iteration >= 30)
    finally:
        first.stop()
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.lease_owner is None, (job.status, job.error)
    second = JobManager(settings=settings, session_factory=factory)
    second.start()
    try:
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL)
    finally:
        second.stop()
    assert job.status == "succeeded" and job.attempts == 2
    with factory() as session:
        iterations = session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all()
    assert sorted(iterations) == list(range(1, 401))  # the resumed iterations replaced, none twice


def test_a_job_the_cluster_has_no_room_for_does_not_hold_up_the_next(on_ray) -> None:
    """One job slot (``MAML_MAX_CONCURRENT_JOBS=1``); the first job asks for 3 CPUs of the cluster's
    2: it waits for room, up to ``MAML_WORKER_START_TIMEOUT_S``, and the job queued behind it is
    driven meanwhile (it used to wait behind it for the whole timeout); then it fails naming the
    CPUs it asked for."""
    settings, factory = on_ray
    settings = settings.model_copy(update={"worker_start_timeout_s": 60.0})
    manager = JobManager(settings=settings, session_factory=factory)
    manager.start()
    try:
        greedy = new_job(factory, resources={"cpus_per_worker": 3})
        manager.submit(greedy)
        small = new_job(factory)
        manager.submit(small)
        job = wait_for_row(factory, small, lambda j: j.status in TERMINAL, timeout=120)
        assert job.status == "succeeded", job.error
        waited = wait_for_row(factory, greedy, lambda j: j.status in TERMINAL, timeout=120)
    finally:
        manager.stop()
    assert job.finished_at < waited.finished_at  # not held up behind it
    assert waited.status == "failed" and waited.attempts == 0
    assert "within 60s (MAML_WORKER_START_TIMEOUT_S); it asks for 3 CPUs" in waited.error, waited.error
    assert "the cluster has 2" in waited.error, waited.error
