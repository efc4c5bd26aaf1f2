"""run archive file

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 03:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("archive_file", sa.Text(), nullable=True))
    op.add_column("gc_runs", sa.Column("archive_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("gc_runs", "archive_bytes")
    op.drop_column("gc_runs", "archive_file")
