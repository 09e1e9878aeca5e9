"""Replicas sharing one database, and the bookkeeping of a queue: a run is owned through a lease,
so it is driven once; a failed metrics write never fails a job.

Two job queues (what two ``maml serve`` replicas run) on the same database, in this process, with
the real engine training in process: a job both are told about is trained once; when the replica
driving a job dies (its lease is no longer renewed), the other requeues it once the lease expires
and finishes it from its checkpoint, and the dead one's late outcome is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from helpers import in_process_runner, new_job, wait_for_row
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from service import jobs, runs
from service.config import Settings
from service.db import Job, JobMetric, Model, init_db, make_engine, make_session_factory
from service.manager import JobManager

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def shared(settings: Settings) -> Iterator[tuple[Settings, object]]:
    """Settings with a 1 s lease, and a session factory on their (fresh) database."""
    settings = settings.model_copy(update={"lease_ttl_s": 1.0})
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    yield settings, make_session_factory(engine)
    engine.dispose()


def run_to_the_end(settings: Settings, factory, run_fn, job_id: str) -> Job:
    """One replica's manager runs the stored job ``job_id`` with ``run_fn``: its row once it has ended."""
    manager = JobManager(settings=settings, session_factory=factory, run_fn=run_fn)
    manager.start()
    try:
        manager.submit(job_id)
        return wait_for_row(factory, job_id, lambda j: j.status in TERMINAL)
    finally:
        manager.stop()


def test_a_job_two_replicas_are_told_about_is_trained_once(shared) -> None:
    settings, factory = shared
    calls: list[str] = []

    def counting(spec, **kwargs):
        calls.append(kwargs["run_dir"].name)
        return in_process_runner(spec, **kwargs)

    replicas = [JobManager(settings=settings, session_factory=factory, run_fn=counting) for _ in range(2)]
    for replica in replicas:
        replica.start()
    try:
        job_id = new_job(factory)
        for replica in replicas:
            replica.submit(job_id)
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL)
    finally:
        for replica in replicas:
            replica.stop()
    assert job.status == "succeeded" and job.attempts == 1 and job.lease_owner is None
    assert calls == [job_id]
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1
        iterations = session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all()
    assert sorted(iterations) == list(range(1, 61))


def test_a_dead_replicas_job_is_taken_over_after_its_lease_expires(shared) -> None:
    settings, factory = shared
    release = threading.Event()

    def dies_mid_job(spec, *, reporter, **kwargs):
        """Trains 30 iterations (checkpointing every 20), then hangs as a dead process would."""
        def report(iteration, metrics):
            reporter(iteration, metrics)
            if iteration == 30:
                release.wait(60)
                raise RuntimeError("the process is gone")
        return in_process_runner(spec, reporter=report, **kwargs)

    class DeadReplica(JobManager):
        def _keep_lease(self, run_id, cancel, done):
            """Renews the lease until the replica "dies" (``_stopping``), then never again."""
            while not done.wait(self.settings.lease_ttl_s / 4) and not self.stopping:
                with self.session_factory() as session:
                    runs.renew_leases(session=session, table=Job, owner=self.owner, run_ids=[run_id],
                                      ttl_s=self.settings.lease_ttl_s)

    dead = DeadReplica(settings=settings, session_factory=factory, run_fn=dies_mid_job)
    dead.start()
    job_id = new_job(factory)
    dead.submit(job_id)
    wait_for_row(factory, job_id, lambda j: j.iteration >= 21)  # past the checkpoint at 20
    owner = dead.owner
    dead._stopping.set()  # its lease is no longer renewed: what kill -9 leaves behind
    with factory() as session:
        assert session.get(Job, job_id).lease_owner == owner

    survivor = JobManager(settings=settings, session_factory=factory, run_fn=in_process_runner)
    survivor.start()
    try:
        start = time.monotonic()
        taken = wait_for_row(factory, job_id, lambda j: j.lease_owner == survivor.owner or j.status in TERMINAL)
        takeover_s = time.monotonic() - start
        release.set()  # the dead replica's thread wakes up: its outcome must not be written
        job = wait_for_row(factory, job_id, lambda j: j.status in TERMINAL)
        time.sleep(0.5)
    finally:
        survivor.stop()
    assert taken.attempts == 2 and takeover_s < 5 * settings.lease_ttl_s
    with factory() as session:
        job = session.get(Job, job_id)
        assert session.scalar(select(func.count()).select_from(Model)) == 1
        iterations = session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all()
    assert job.status == "succeeded" and job.error is None and job.model_id
    assert sorted(iterations) == list(range(1, 61))  # each iteration once, the replayed ones too


def test_transitions_are_conditional_on_the_lease(shared) -> None:
    settings, factory = shared
    job_id = new_job(factory)
    with factory() as session:
        assert runs.claim_run(session=session, table=Job, run_id=job_id, owner="a", ttl_s=60) is not None
        assert runs.claim_run(session=session, table=Job, run_id=job_id, owner="b", ttl_s=60) is None
        # A live lease is not recovered; only its owner renews or finishes the run.
        assert job_id not in runs.recover_runs(session=session, table=Job, max_attempts=3)
        assert session.get(Job, job_id, populate_existing=True).status == "running"
        assert runs.renew_leases(session=session, table=Job, owner="b", run_ids=[job_id], ttl_s=60) == set()
        assert runs.renew_leases(session=session, table=Job, owner="a", run_ids=[job_id], ttl_s=60) == {job_id}
        assert not runs.finish_run(session=session, table=Job, run_id=job_id, status="failed", owner="b")
        # Expired: requeued for anyone to claim, and the old owner can no longer finish it.
        assert runs.renew_leases(session=session, table=Job, owner="a", run_ids=[job_id], ttl_s=-1) == {job_id}
        assert runs.recover_runs(session=session, table=Job, max_attempts=3) == [job_id]
        assert not runs.finish_run(session=session, table=Job, run_id=job_id, status="succeeded", owner="a")
        assert runs.claim_run(session=session, table=Job, run_id=job_id, owner="b", ttl_s=60).attempts == 2
        assert runs.finish_run(session=session, table=Job, run_id=job_id, status="succeeded", owner="b")
        job = session.get(Job, job_id, populate_existing=True)
    assert job.status == "succeeded" and job.lease_owner is None and job.lease_expires_at is None


def test_a_failed_metrics_write_keeps_the_points_and_the_job_succeeds(shared, monkeypatch) -> None:
    settings, factory = shared
    real = jobs.record_progress
    failures = {"left": 3}

    def flaky(**kwargs):
        if failures["left"]:
            failures["left"] -= 1
            locked = OperationalError("UPDATE jobs", {}, Exception("database is locked"))
            raise jobs.ProgressNotRecorded(kwargs["job_id"], 1, locked)
        return real(**kwargs)

    monkeypatch.setattr(jobs, "record_progress", flaky)
    job_id = new_job(factory)
    job = run_to_the_end(settings, factory, in_process_runner, job_id)
    assert failures["left"] == 0
    assert job.status == "succeeded" and job.error is None and job.iteration == 60
    with factory() as session:
        iterations = session.scalars(select(JobMetric.iteration).where(JobMetric.job_id == job_id)).all()
    assert sorted(iterations) == list(range(1, 61))  # the points of the failed writes were written later


def test_iterations_replayed_after_a_worker_group_restart_are_stored_once(shared) -> None:
    """A restarted worker group resumes from the checkpoint and reports those iterations again:
    the series keeps the replayed points, each iteration once."""
    settings, factory = shared

    def restarts_at_30(spec, *, reporter, **kwargs):
        def report(iteration, metrics):
            reporter(iteration, metrics)
            if iteration == 30 and not replayed:
                replayed.append(True)
                for again in range(21, 31):  # what run_training's restart from the checkpoint at 20 does
                    reporter(again, {**metrics, "meta/loss": -float(again)})
        return in_process_runner(spec, reporter=report, **kwargs)

    replayed: list[bool] = []
    job_id = new_job(factory)
    job = run_to_the_end(settings, factory, restarts_at_30, job_id)
    assert job.status == "succeeded"
    with factory() as session:
        points = session.execute(select(JobMetric.iteration, JobMetric.metrics)
                                 .where(JobMetric.job_id == job_id)).all()
    assert sorted(iteration for iteration, _ in points) == list(range(1, 61))
    assert all(metrics["meta/loss"] == -iteration for iteration, metrics in points if 21 <= iteration <= 30)


def test_every_point_up_to_a_checkpoint_is_stored_before_the_checkpoint(shared) -> None:
    """A driver that dies right after a checkpoint must not lose the points before it: a resume from
    that checkpoint does not report them again (seen in the GCS fault test before this was so)."""
    settings, factory = shared
    settings = settings.model_copy(update={"metrics_flush_s": 60.0})  # only a checkpoint makes a flush due
    stored_at_checkpoints: list[int] = []

    def watching(spec, *, reporter, **kwargs):
        def report(iteration, metrics):
            reporter(iteration, metrics)
            if iteration % spec.checkpoint.every == 0:  # the trainer writes its checkpoint next
                with factory() as session:
                    stored_at_checkpoints.append(session.scalar(
                        select(func.count()).select_from(JobMetric).where(JobMetric.job_id == job_id)))
        return in_process_runner(spec, reporter=report, **kwargs)

    job_id = new_job(factory)
    job = run_to_the_end(settings, factory, watching, job_id)
    assert job.status == "succeeded"
    assert stored_at_checkpoints == [20, 40, 60]
