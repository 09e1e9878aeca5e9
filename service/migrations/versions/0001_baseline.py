"""Baseline: the schema as it was when migrations came in (jobs and sweeps with their leases).

Generated from the models by ``alembic revision --autogenerate``, then written as a frozen copy of
the tables (a migration must not follow the models as they change later). Datetimes are
``DateTime(timezone=True)``: ``service.db.UTCDateTime`` only converts values in Python.

It also adopts a database made before migrations, by ``create_all`` of an older service (tables
there, no ``alembic_version``): tables it lacks are created; ``models`` from before sweeps gets
``sweep_id`` and a nullable ``job_id`` (SQLite rebuilds the table: batch mode); ``jobs`` and
``sweeps`` get the lease columns; indexes that are missing are created. Alembic stamps the result.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import SchemaItem

revision: str = "0001_baseline"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

logger = logging.getLogger(__name__)

metadata = sa.MetaData()


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _run_state(table: str) -> list[SchemaItem]:
    """The columns and page indexes that jobs and sweeps share (``service.db.RunState``)."""
    return [
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("model_id", sa.String(36)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("started_at", _when()),
        sa.Column("finished_at", _when()),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", _when()),
        sa.Index(f"ix_{table}_tenant_created", "tenant", "created_at", "id"),
        sa.Index(f"ix_{table}_tenant_status_created", "tenant", "status", "created_at", "id"),
        sa.Index(f"ix_{table}_status_created", "status", "created_at", "id"),
        sa.Index(f"ix_{table}_created", "created_at", "id"),
    ]


# In creation order: a table comes after those it refers to.
TABLES = (
    sa.Table(
        "api_keys", metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("hashed_secret", sa.String(64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("revoked_at", _when()),
        sa.Index("ix_api_keys_prefix", "prefix"),
    ),
    sa.Table(
        "jobs", metadata,
        *_run_state("jobs"),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("eta_s", sa.Float()),
        sa.Column("metrics", sa.JSON(), nullable=False),
    ),
    sa.Table(
        "sweeps", metadata,
        *_run_state("sweeps"),
        sa.Column("trials", sa.JSON(), nullable=False),
        sa.Column("best_trial_id", sa.String(64)),
    ),
    sa.Table(
        "job_metrics", metadata,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Index("ix_job_metrics_job_iteration", "job_id", "iteration"),
    ),
    sa.Table(
        "models", metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id")),
        sa.Column("sweep_id", sa.String(36), sa.ForeignKey("sweeps.id")),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=False),
        sa.Column("output_dim", sa.Integer(), nullable=False),
        sa.Column("loss", sa.String(32), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("eval_metrics", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Index("ix_models_tenant_created", "tenant", "created_at", "id"),
        sa.Index("ix_models_created", "created_at", "id"),
    ),
    sa.Table(
        "adapted_weights", metadata,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(36), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Index("ix_adapted_weights_model_id", "model_id"),
    ),
)


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    adopted = [table for table in TABLES if table.name in existing]
    for table in TABLES:
        if table.name not in existing:
            table.create(bind)  # with its indexes
    if adopted:
        logger.info("adopting a database made before migrations (tables: %s)", ", ".join(t.name for t in adopted))
        _adopt(bind, adopted)


def _adopt(bind: sa.Connection, tables: list[sa.Table]) -> None:
    """Bring tables made by ``create_all`` of an older service to this revision."""
    inspector = sa.inspect(bind)
    columns = {table.name: {c["name"]: c for c in inspector.get_columns(table.name)} for table in tables}

    for name in ("jobs", "sweeps"):  # the leases came after create_all
        if name in columns and "lease_owner" not in columns[name]:
            op.add_column(name, sa.Column("lease_owner", sa.String(128)))
        if name in columns and "lease_expires_at" not in columns[name]:
            op.add_column(name, sa.Column("lease_expires_at", _when()))

    models = columns.get("models")
    if models is not None and ("sweep_id" not in models or not models["job_id"]["nullable"]):
        # Models from before sweeps: a model's source may be a sweep. SQLite cannot drop a NOT NULL
        # in place, so batch mode rebuilds the table (new table, copy, drop, rename), indexes included.
        with op.batch_alter_table("models") as batch:
            if "sweep_id" not in models:
                batch.add_column(sa.Column("sweep_id", sa.String(36)))
                # Batch mode wants a name: PostgreSQL's own, as create_all's table got there.
                batch.create_foreign_key("models_sweep_id_fkey", "sweeps", ["sweep_id"], ["id"])
            if not models["job_id"]["nullable"]:
                batch.alter_column("job_id", existing_type=sa.String(36), nullable=True)

    inspector = sa.inspect(bind)  # fresh: the steps above changed the tables
    for table in tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes and all(c.name in present for c in index.columns):
                index.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(TABLES):
        table.drop(bind)
