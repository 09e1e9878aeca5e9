"""The database layer on SQLite and on PostgreSQL: migrations (a new database, one made before
migrations), URLs, which errors are transient, and progress writes that survive transient errors."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import make_settings
from sqlalchemy import Column, Engine, ForeignKey, Index, MetaData, Table, event, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from service import jobs
from service.config import Settings
from service.db import (
    AdaptedWeights,
    ApiKey,
    Base,
    DatabaseUnavailable,
    Job,
    JobMetric,
    Model,
    Sweep,
    alembic_config,
    init_db,
    is_transient,
    make_engine,
    make_session_factory,
    retry_transient,
)

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture
def engine(tmp_path: Path, database: str | None) -> Iterator[Engine]:
    """The test's database, empty (no table yet): each test that takes it runs on SQLite and on PostgreSQL."""
    engine = make_engine(make_settings(tmp_path))
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match the models."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# ------------------------------------------------------------------------------------------ migrations


def test_a_new_database_is_migrated_to_exactly_the_models(engine: Engine) -> None:
    assert revision(engine) is None
    init_db(engine)
    assert revision(engine) == HEAD
    assert schema_diff(engine) == []
    init_db(engine)  # a second start finds nothing to do
    assert revision(engine) == HEAD and schema_diff(engine) == []


def create_pre_migration_schema(engine: Engine) -> None:
    """The schema as ``create_all`` of the service before migrations left it: ``models`` from
    before sweeps (``job_id`` NOT NULL, no ``sweep_id``), no lease columns, no ``alembic_version``."""
    old = MetaData()
    for table in (Job.__table__, Sweep.__table__, JobMetric.__table__, ApiKey.__table__):
        table.to_metadata(old)  # type: ignore[attr-defined]
    Table("models", old,
          *(Column(c.name, c.type, ForeignKey("jobs.id"), nullable=False) if c.name == "job_id" else c._copy()
            for c in Model.__table__.columns if c.name != "sweep_id"),
          *(Index(index.name, *(c.name for c in index.columns)) for index in Model.__table__.indexes))
    AdaptedWeights.__table__.to_metadata(old)  # type: ignore[attr-defined]
    old.create_all(engine)
    with engine.begin() as conn:
        for table in ("jobs", "sweeps"):
            for column in ("lease_owner", "lease_expires_at"):
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))


def test_a_database_from_before_migrations_is_brought_to_the_baseline_and_stamped(engine: Engine) -> None:
    create_pre_migration_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, tenant, name, spec, status, attempts, cancel_requested, created_at, "
                          "iteration, total, metrics) VALUES ('job-1', 'acme', 'sine', '{}', 'succeeded', 1, "
                          ":no, '2025-01-01 00:00:00', 60, 60, '{}')"), {"no": False})
        conn.execute(text("INSERT INTO models (id, tenant, job_id, name, spec, input_shape, output_dim, loss, "
                          "iteration, eval_metrics, path, created_at) VALUES ('model-1', 'acme', 'job-1', 'sine', "
                          "'{}', '[1]', 1, 'mse', 60, '{}', '/models/model-1', '2025-01-01 00:00:00')"))
        # A row that refers to models: SQLite's rebuild of models must keep it valid.
        conn.execute(text("INSERT INTO adapted_weights (id, tenant, model_id, steps, lr, path, created_at) VALUES "
                          "('w-1', 'acme', 'model-1', 5, 0.01, '/w', '2025-01-01 00:00:00')"))
    assert revision(engine) is None and schema_diff(engine) != []

    init_db(engine)
    assert revision(engine) == HEAD
    assert schema_diff(engine) == []
    columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns("models")}
    assert columns["job_id"] and columns["sweep_id"]
    for table in ("jobs", "sweeps"):
        assert {"lease_owner", "lease_expires_at"} <= {c["name"] for c in inspect(engine).get_columns(table)}
    with make_session_factory(engine)() as session:
        model = session.get(Model, "model-1")
        assert model is not None and (model.job_id, model.sweep_id, model.path) == ("job-1", None, "/models/model-1")
        assert session.get(Job, "job-1").lease_owner is None  # type: ignore[union-attr]
        assert session.scalars(select(AdaptedWeights.model_id)).all() == ["model-1"]
        # A sweep's model now fits.
        session.add(Sweep(id="sweep-1", tenant="acme", name="s", spec={}, trials=[]))
        session.flush()
        session.add(Model(tenant="acme", sweep_id="sweep-1", name="best", spec={}, input_shape=[1], output_dim=1,
                          loss="mse", iteration=4, path="/models/best"))
        session.commit()
    init_db(engine)  # adopted once: the next start finds nothing to do
    assert revision(engine) == HEAD and schema_diff(engine) == []


def test_postgres_urls_use_psycopg_3(tmp_path: Path) -> None:
    for given in ("postgres://u:p@db:5432/maml", "postgresql://u:p@db:5432/maml", "postgresql+psycopg://u:p@db:5432/maml"):
        assert Settings(database_url=given).sqlalchemy_url == "postgresql+psycopg://u:p@db:5432/maml"
    assert Settings(database_url="sqlite:////srv/maml.db").sqlalchemy_url == "sqlite:////srv/maml.db"
    assert Settings(data_dir=tmp_path).sqlalchemy_url == f"sqlite:///{(tmp_path / 'maml.db').resolve()}"
    engine = make_engine(Settings(database_url="postgres://u@db/maml"))
    assert engine.dialect.driver == "psycopg" and engine.pool._pre_ping  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- retries


def wrapped(orig: Exception) -> OperationalError:
    return OperationalError("UPDATE jobs ...", {}, orig)


def test_transient_errors_are_told_from_the_others() -> None:
    assert is_transient(wrapped(sqlite3.OperationalError("database is locked")))
    assert is_transient(wrapped(psycopg.errors.SerializationFailure("could not serialize access")))
    assert is_transient(wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert is_transient(wrapped(psycopg.errors.AdminShutdown("terminating connection")))
    assert is_transient(wrapped(psycopg.OperationalError("connection refused")))
    assert not is_transient(wrapped(sqlite3.OperationalError("no such table: jobs")))
    assert not is_transient(IntegrityError("INSERT ...", {}, psycopg.errors.UniqueViolation("duplicate key")))
    assert not is_transient(ValueError("not a database error"))


def fail_inserts_into(engine: Engine, table: str, errors: list[Exception]) -> list[str]:
    """Make the next ``len(errors)`` INSERTs into ``table`` raise those driver errors (the way a
    locked database or a deadlock surfaces: from the driver's execute). Returns the errors raised."""
    raised: list[Exception] = []

    @event.listens_for(engine, "do_execute")
    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        if statement.startswith(f"INSERT INTO {table}") and errors:
            raised.append(errors.pop(0))
            raise raised[-1]

    return raised


def transient_error(engine: Engine) -> Exception:
    if engine.dialect.name == "sqlite":
        return sqlite3.OperationalError("database is locked")
    return psycopg.errors.DeadlockDetected("deadlock detected")


def a_running_job(engine: Engine) -> str:
    init_db(engine)
    with make_session_factory(engine)() as session:
        job = Job(tenant="acme", name="sine", spec={}, status="running", total=10)
        session.add(job)
        session.commit()
        jobs.record_progress(session=session, job_id=job.id, points=[(1, {"meta/loss": 2.0})], eta_s=9.0)
        return job.id


def progress(engine: Engine, job_id: str) -> tuple[int, list[int]]:
    with make_session_factory(engine)() as session:
        series = [m.iteration for m in jobs.list_metrics(session=session, job_id=job_id)]
        return session.get(Job, job_id).iteration, series  # type: ignore[union-attr]


def test_record_progress_tries_a_transient_error_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.db.RETRY_BACKOFF_S", 0.01)
    job_id = a_running_job(engine)
    raised = fail_inserts_into(engine, "job_metrics", [transient_error(engine), transient_error(engine)])
    with make_session_factory(engine)() as session:
        # A resumed run (replace_from) whose first two tries fail: the third writes everything once.
        jobs.record_progress(session=session, job_id=job_id, points=[(1, {"meta/loss": 1.5}), (2, {"meta/loss": 1.0})],
                             eta_s=5.0, replace_from=1)
    assert len(raised) == 2
    assert progress(engine, job_id) == (2, [1, 2])


def test_record_progress_that_keeps_failing_raises_a_typed_error_and_writes_nothing(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.db.RETRY_BACKOFF_S", 0.01)
    job_id = a_running_job(engine)
    raised = fail_inserts_into(engine, "job_metrics", [transient_error(engine) for _ in range(4)])
    with make_session_factory(engine)() as session:
        with pytest.raises(jobs.ProgressNotRecorded) as failure:
            jobs.record_progress(session=session, job_id=job_id, points=[(2, {"meta/loss": 1.0})], eta_s=5.0,
                                 replace_from=1)
        assert isinstance(failure.value.__cause__, DatabaseUnavailable) and failure.value.points == 1
        assert len(raised) == 4  # service.db.RETRY_ATTEMPTS
        # The session is usable again, and the points can be written later, when the database is back.
        jobs.record_progress(session=session, job_id=job_id, points=[(2, {"meta/loss": 1.0})], eta_s=5.0,
                             replace_from=1)
    assert progress(engine, job_id) == (2, [2])


def test_record_progress_does_not_retry_what_is_not_transient(engine: Engine) -> None:
    job_id = a_running_job(engine)
    raised = fail_inserts_into(engine, "job_metrics", [sqlite3.OperationalError("disk I/O error")
                                                      if engine.dialect.name == "sqlite"
                                                      else psycopg.errors.DiskFull("could not extend file")])
    with make_session_factory(engine)() as session, pytest.raises(jobs.ProgressNotRecorded):
        jobs.record_progress(session=session, job_id=job_id, points=[(2, {"meta/loss": 1.0})], eta_s=5.0)
    assert len(raised) == 1 and progress(engine, job_id) == (1, [1])


@pytest.mark.backends("postgresql")
def test_a_connection_killed_by_the_server_is_replaced_and_the_write_tried_again(engine: Engine,
                                                                                database: str) -> None:
    """PostgreSQL for real: the server terminates the session's connection mid-write (as on a
    failover or a restart); the write goes through on a new connection of the pool."""
    job_id = a_running_job(engine)
    killed: list[int] = []

    @event.listens_for(engine, "do_execute")
    def terminate_first(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        if statement.startswith("INSERT INTO job_metrics") and not killed:
            pid = cursor.connection.info.backend_pid
            with psycopg.connect(database.replace("postgresql+psycopg", "postgresql"), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(pid)

    with make_session_factory(engine)() as session:
        jobs.record_progress(session=session, job_id=job_id, points=[(2, {"meta/loss": 1.0})], eta_s=5.0)
    assert len(killed) == 1
    assert progress(engine, job_id) == (2, [1, 2])


def test_retry_transient_gives_back_what_the_write_returns(engine: Engine) -> None:
    init_db(engine)
    calls: list[int] = []

    def write() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise wrapped(sqlite3.OperationalError("database is locked"))
        return 42

    with make_session_factory(engine)() as session:
        assert retry_transient(session, write, backoff_s=0.0) == 42
    assert len(calls) == 2


def test_sqlite_commits_are_durable_across_a_power_loss(tmp_path: Path) -> None:
    """synchronous=FULL on every connection (WAL's NORMAL survives a crash of the process, not of the
    machine: a revoked key could come back)."""
    engine = make_engine(make_settings(tmp_path, database_url=None))
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()
