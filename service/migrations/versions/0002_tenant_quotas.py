"""Per-tenant quota overrides: the ``tenant_quotas`` table (``service.db.TenantQuota``).

One row per tenant that has overrides or has submitted a run since; a null column is the
setting's default (``MAML_QUOTA_<NAME>``). Written as a frozen copy of the table, as the baseline is.

Revision ID: 0002_tenant_quotas
Revises: 0001_baseline
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_tenant_quotas"
down_revision: str | None = "0001_baseline"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_quotas",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("jobs", sa.Integer()),
        sa.Column("sweeps", sa.Integer()),
        sa.Column("workers", sa.Integer()),
        sa.Column("cpus", sa.Integer()),
        sa.Column("gpus", sa.Integer()),
        sa.Column("iterations", sa.Integer()),
        sa.Column("trials", sa.Integer()),
        sa.Column("models", sa.Integer()),
        sa.Column("model_bytes", sa.BigInteger()),
        sa.Column("adaptations", sa.Integer()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tenant_quotas")
