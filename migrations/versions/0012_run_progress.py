"""run progress

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 11:30:00.000000

The status page (issue 24 item 1) draws a run as it goes: ``gc_runs.progress`` holds the plan's
garbage estimate and reason, the live throttle figures and a short series of samples (seconds,
rows deleted, the server's WAL position) written with the batches' checkpoints.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("gc_runs", sa.Column("progress", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("gc_runs", "progress")
