"""restored batches

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 08:30:00.000000

``msggc restore --file`` records each batch it puts back (issue 21, item 7), so that running it
again on a table without a key restores nothing twice.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gc_restored",
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("batch_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("rows", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("file", sa.Text(), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("restored_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("table_name", "batch_sha256", name=op.f("pk_gc_restored")),
    )


def downgrade() -> None:
    op.drop_table("gc_restored")
