"""latency probe

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("app_latency_p50_ms", sa.Float(), nullable=True))
    op.add_column("gc_runs", sa.Column("app_latency_p99_ms", sa.Float(), nullable=True))
    op.add_column("gc_runs", sa.Column("app_probes", sa.Integer(), nullable=True))
    op.add_column("gc_runs", sa.Column("held_back_seconds", sa.Float(), server_default="0", nullable=False))
    op.create_table(
        "gc_probe",
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("node", sa.Text(), server_default="", nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("beats", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("held_back_seconds", sa.Float(), server_default="0", nullable=False),
        sa.Column("rate_share", sa.Float(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("table_name", "node", name=op.f("pk_gc_probe")),
    )


def downgrade() -> None:
    op.drop_table("gc_probe")
    op.drop_column("gc_runs", "held_back_seconds")
    op.drop_column("gc_runs", "app_probes")
    op.drop_column("gc_runs", "app_latency_p99_ms")
    op.drop_column("gc_runs", "app_latency_p50_ms")
