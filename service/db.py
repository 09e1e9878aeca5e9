"""Persistence: SQLAlchemy 2 tables for jobs, metric series, sweeps, models, adapted weights, API keys and
per-tenant quota overrides.

SQLite (the default, a file under ``data_dir``) runs in WAL mode so the API reads while the job
manager writes; PostgreSQL (``MAML_DATABASE_URL=postgresql+psycopg://...``) runs on psycopg 3 with a
connection pool. The engine is built by :func:`make_engine` from settings, never at import time.
The schema is Alembic's (``service/migrations``): :func:`init_db` migrates to the newest revision.
Writes that may meet a lost connection, a locked database or a deadlock go through
:func:`retry_transient`.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, declared_attr, mapped_column, sessionmaker

from service.config import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite forgets the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON, datetime: UTCDateTime}


class RunState:
    """The columns of a run, a job or a sweep: who owns it, its spec and where its run stands.

    ``kind`` names the run in errors and logs; ``run_only`` are columns that only mean something
    while it runs (cleared when a run starts, ends or is requeued). The indexes serve the list
    endpoint's pages: newest first, per tenant, optionally by status. Each ends with id, the page
    order's tie-breaker, so a page is read off the index in order.
    """

    kind: ClassVar[str]
    run_only: ClassVar[tuple[str, ...]] = ()

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="queued")  # JOB_STATUSES
    error: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(36))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # starts, restarts (resumes) included
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The lease of the replica driving a running run: it renews lease_expires_at while it drives it;
    # once that has passed, another replica may claim the run (service.runs).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Index, ...]:
        table = cls.__tablename__  # type: ignore[attr-defined]
        return (Index(f"ix_{table}_tenant_created", "tenant", "created_at", "id"),
                Index(f"ix_{table}_tenant_status_created", "tenant", "status", "created_at", "id"),
                Index(f"ix_{table}_status_created", "status", "created_at", "id"),
                Index(f"ix_{table}_created", "created_at", "id"))


class Job(RunState, Base):
    """A meta-training job: its progress, latest metrics and (``JobMetric``) series."""

    __tablename__ = "jobs"
    kind = "job"
    run_only = ("eta_s",)

    iteration: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the latest report


class JobMetric(Base):
    """One report of a job: the flat namespaced metrics dict at an iteration."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_job_metrics_job_iteration", "job_id", "iteration"),)


class Sweep(RunState, Base):
    """A hyperparameter sweep: its spec (``workers.sweep_spec.SweepSpec``) and the latest trial snapshot.

    Tune's own state (what a resume restores from) lives in ``storage/sweeps/<id>/tune``.
    """

    __tablename__ = "sweeps"
    kind = "sweep"

    trials: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # workers.sweep_spec.TrialInfo dumps
    best_trial_id: Mapped[str | None] = mapped_column(String(64))


class Model(Base):
    """A trained model in the registry: its spec, shapes and meta-test metrics; weights on disk.

    Its source is the job that trained it (``job_id``) or the sweep whose best trial it is (``sweep_id``).
    """

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("jobs.id"))
    sweep_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("sweeps.id"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    input_shape: Mapped[list[int]]
    output_dim: Mapped[int] = mapped_column(Integer)
    loss: Mapped[str] = mapped_column(String(32))
    iteration: Mapped[int] = mapped_column(Integer)
    eval_metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    path: Mapped[str] = mapped_column(Text)  # folder with model.safetensors and model.json
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_models_tenant_created", "tenant", "created_at", "id"),
                      Index("ix_models_created", "created_at", "id"))


class AdaptedWeights(Base):
    """Parameters adapted by one adaptation query (``return_weights``), kept for download."""

    __tablename__ = "adapted_weights"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(36), ForeignKey("models.id"), index=True)
    steps: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's bearer key: only the SHA-256 of the secret is kept; ``prefix`` finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    hashed_secret: Mapped[str] = mapped_column(String(64))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class TenantQuota(Base):
    """A tenant's quota overrides (``service.quotas``): a null column is the setting's default.

    The row is also what a submission locks (``SELECT ... FOR UPDATE``) while it checks the
    tenant's use and inserts its run, so concurrent submissions of one tenant take turns; a tenant
    without overrides gets an all-null row the first time it submits.
    """

    __tablename__ = "tenant_quotas"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    jobs: Mapped[int | None] = mapped_column(Integer)
    sweeps: Mapped[int | None] = mapped_column(Integer)
    workers: Mapped[int | None] = mapped_column(Integer)
    cpus: Mapped[int | None] = mapped_column(Integer)
    gpus: Mapped[int | None] = mapped_column(Integer)
    iterations: Mapped[int | None] = mapped_column(Integer)
    trials: Mapped[int | None] = mapped_column(Integer)
    models: Mapped[int | None] = mapped_column(Integer)
    model_bytes: Mapped[int | None] = mapped_column(BigInteger)
    adaptations: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. FULL: every commit is on disk before it returns, so a key
    # revocation (or a job's outcome) survives a power loss, not only a process crash (NORMAL's
    # guarantee in WAL). It costs an fsync per commit; the hot writes (metrics) are batched.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")  # ms: wait for the writer instead of failing
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    """The engine of the configured database: a SQLite WAL file by default, or PostgreSQL on psycopg 3.

    PostgreSQL connections are pooled (SQLAlchemy's QueuePool); pre-ping replaces a connection that
    the server closed (a restart, an idle timeout) before it is used, and connections are recycled
    after half an hour so none outlives a proxy's idle limit.
    """
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                               pool_size=16, max_overflow=16, pool_pre_ping=False)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800,
                         connect_args=connect_args)


# ------------------------------------------------------------------------------------------ migrations

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x6D616D6C  # "maml": the PostgreSQL advisory lock that replicas migrate under, one at a time


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's configuration for the migrations that ship in this package (no ini file needed);
    ``connection``: the one ``env.py`` migrates, in the transaction its caller holds."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def init_db(engine: Engine) -> None:
    """Migrate the database to the newest revision (``alembic upgrade head``), all of it in one transaction.

    A new database gets every table; one made before migrations (tables, no ``alembic_version``) is
    adopted by the baseline revision and stamped; an up-to-date one is left alone. Several processes
    starting at once migrate one after the other (PostgreSQL: an advisory lock; SQLite: the write lock).
    """
    with migrating(engine) as connection:
        command.upgrade(alembic_config(connection), "head")


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that migrations run in (``init_db``, Alembic's command line);
    committed when they succeed, rolled back otherwise."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            yield connection
        return
    # SQLite rebuilds a table to alter it (drop, rename), which foreign keys would refuse or cascade
    # through: they go off first, outside the transaction (inside one SQLite ignores the pragma), and
    # are checked before the commit. pysqlite commits before each DDL statement unless it is told
    # to leave the transaction to us (isolation_level None, explicit BEGIN/COMMIT).
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None
        foreign_keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        isolation, driver.isolation_level = driver.isolation_level, None
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now: one migrating process at a time
            try:
                yield connection
                problems = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if problems:
                    raise RuntimeError(f"the migration broke foreign keys: {problems}")
                connection.exec_driver_sql("COMMIT")
            except BaseException:
                connection.exec_driver_sql("ROLLBACK")
                raise
        finally:
            driver.isolation_level = isolation
            connection.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")


# ------------------------------------------------------------------------------------------- retries

RETRY_ATTEMPTS = 4  # tries of a write in all
RETRY_BACKOFF_S = 0.1  # before the second try; doubles each time, with jitter (so deadlocked writers part)
# SQLSTATEs worth another try: serialization failure, deadlock; and the classes of a lost or refused
# connection (08: connection exception; 57P: the server shutting down, crashing or starting up).
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57P")


class DatabaseUnavailable(RuntimeError):
    """A write that failed with a transient error (connection lost, database locked, serialization
    failure, deadlock) at every one of its tries; ``__cause__`` is the last error."""


def is_transient(exc: BaseException) -> bool:
    """Whether the same write may succeed if tried again: a lost connection, a locked SQLite
    database, a PostgreSQL serialization failure or deadlock. Constraint violations and bugs are not."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy saw a disconnect; the pool drops the connection
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return "locked" in message or "busy" in message
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg's errors carry the server's code
    if sqlstate:
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    # psycopg's OperationalError without a code: the server could not be reached or went away.
    return isinstance(exc, OperationalError)


def retry_transient(session: Session, write: Callable[[], T], *, what: str = "write",
                    attempts: int | None = None, backoff_s: float | None = None) -> T:
    """``write()`` (which writes through ``session`` and commits), tried again after a transient error.

    After a failure the session is rolled back, which forgets what the try added to it: ``write``
    must do all its work again each time. A non-transient error is raised as it is; a transient one
    that outlasts ``attempts`` tries (default ``RETRY_ATTEMPTS``) is raised as :class:`DatabaseUnavailable`.

    >>> retry_transient(session, lambda: _store(session, rows), what="job 42 progress")
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except DBAPIError as exc:
            with suppress(DBAPIError):  # a dead connection may refuse the rollback too; the pool replaces it
                session.rollback()
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise DatabaseUnavailable(f"{what}: failed {attempts} times, last: {exc.orig!r}") from exc
            delay = backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            logger.warning("%s: transient database error (try %d of %d), again in %.2fs: %s",
                           what, attempt, attempts, delay, exc.orig)
            time.sleep(delay)
    raise AssertionError("unreachable")  # attempts >= 1: every path above returns or raises


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after commit (routes return them afterwards).
    return sessionmaker(engine, expire_on_commit=False)
