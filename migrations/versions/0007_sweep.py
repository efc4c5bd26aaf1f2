"""sweep

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gc_sweep",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("leaf", sa.Text(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("key", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["gc_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "leaf", "n"),
    )


def downgrade() -> None:
    op.drop_table("gc_sweep")
