"""Persistence: SQLAlchemy 2 tables for jobs, metric series, sweeps, models, adapted weights and API keys.

SQLite (the default, a file under ``data_dir``) runs in WAL mode so the API reads while the job
manager writes; any other ``DATABASE_URL`` (PostgreSQL) works unchanged. The engine is built by
:func:`make_engine` from settings, never at import time.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, declared_attr, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex, CreateTable

from service.config import Settings

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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; NORMAL sync is durable across process crashes in WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")  # ms: wait for the writer instead of failing
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    """The engine of the configured database (SQLite WAL file by default)."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                               pool_size=16, max_overflow=16, pool_pre_ping=False)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def init_db(engine: Engine) -> None:
    """Create the tables that do not exist yet, and bring older ones up to date."""
    Base.metadata.create_all(engine)
    _upgrade_models(engine)


def _upgrade_models(engine: Engine) -> None:
    """A ``models`` table from before sweeps: add ``sweep_id`` and let ``job_id`` be null.

    PostgreSQL alters the column in place. SQLite cannot drop a NOT NULL, so the table is rebuilt
    (SQLite's documented procedure: new table, copy, drop, rename, with foreign keys off).
    """
    columns = {c["name"]: c for c in inspect(engine).get_columns("models")}
    if "sweep_id" in columns and columns["job_id"]["nullable"]:
        return
    table = Model.__table__
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            if "sweep_id" not in columns:
                conn.execute(text("ALTER TABLE models ADD COLUMN sweep_id VARCHAR(36) REFERENCES sweeps (id)"))
            conn.execute(text("ALTER TABLE models ALTER COLUMN job_id DROP NOT NULL"))
        return

    scratch = MetaData()  # the tables models refers to, so its foreign keys compile
    for referred in (Job.__table__, Sweep.__table__):
        referred.to_metadata(scratch)  # type: ignore[attr-defined]
    new = table.to_metadata(scratch, name="models_upgrade")  # type: ignore[attr-defined]
    new.indexes.clear()  # the old table's index names are taken until it is dropped
    kept = ", ".join(c for c in columns if c in table.c)
    statements = [
        str(CreateTable(new).compile(dialect=engine.dialect)),
        f"INSERT INTO models_upgrade ({kept}) SELECT {kept} FROM models",
        "DROP TABLE models",
        "ALTER TABLE models_upgrade RENAME TO models",
        *(str(CreateIndex(index).compile(dialect=engine.dialect)) for index in table.indexes),  # type: ignore[attr-defined]
    ]
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert driver is not None
        driver.isolation_level = None  # explicit BEGIN/COMMIT: pysqlite would commit before each DDL
        cursor = driver.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")  # outside the transaction, or SQLite ignores it
        try:
            cursor.execute("BEGIN")
            for statement in statements:
                cursor.execute(statement)
            problems = cursor.execute("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"upgrading the models table broke foreign keys: {problems}")
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.execute("PRAGMA foreign_keys=ON")
            driver.isolation_level = ""
    finally:
        raw.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after commit (routes return them afterwards).
    return sessionmaker(engine, expire_on_commit=False)
