"""guard rate

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 09:10:00.000000

The latency guard steers a WAL rate (issue 22, items 1 and 3): ``gc_probe`` carries the rate
granted and written, the checkpoints requested and the probe's p99 before the run, live;
``gc_runs`` keeps the p99 before the run and the guard's time series.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("app_latency_before_p99_ms", sa.Float(), nullable=True))
    op.add_column("gc_runs", sa.Column("guard_series", postgresql.JSONB(), nullable=True))
    op.add_column("gc_probe", sa.Column("rate_bytes_per_s", sa.Float(), nullable=True))
    op.add_column("gc_probe", sa.Column("wal_bytes_per_s", sa.Float(), nullable=True))
    op.add_column("gc_probe", sa.Column("checkpoints_requested", sa.BigInteger(), server_default="0",
                                        nullable=False))
    op.add_column("gc_probe", sa.Column("before_p99_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("gc_probe", "before_p99_ms")
    op.drop_column("gc_probe", "checkpoints_requested")
    op.drop_column("gc_probe", "wal_bytes_per_s")
    op.drop_column("gc_probe", "rate_bytes_per_s")
    op.drop_column("gc_runs", "guard_series")
    op.drop_column("gc_runs", "app_latency_before_p99_ms")
