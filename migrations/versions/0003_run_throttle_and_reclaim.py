"""run throttle and reclaim

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 23:57:20.849460
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("throttle_pauses", sa.Integer(), server_default="0", nullable=False))
    op.add_column("gc_runs", sa.Column("throttled_seconds", sa.Float(), server_default="0", nullable=False))
    op.add_column("gc_runs", sa.Column("reclaim", postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column("gc_runs", "reclaim")
    op.drop_column("gc_runs", "throttled_seconds")
    op.drop_column("gc_runs", "throttle_pauses")
