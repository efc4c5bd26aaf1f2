"""run foreign keys

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 14:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("foreign_keys", postgresql.JSONB(), nullable=True))
    op.add_column("gc_runs", sa.Column("garbage", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("gc_runs", "garbage")
    op.drop_column("gc_runs", "foreign_keys")
