"""messages archive

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 23:56:04.445534
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "messages_archive",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("direction", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_messages_archive_archived_at", "messages_archive", ["archived_at"], unique=False)
    op.create_index("ix_messages_archive_run_id", "messages_archive", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_messages_archive_run_id", table_name="messages_archive")
    op.drop_index("ix_messages_archive_archived_at", table_name="messages_archive")
    op.drop_table("messages_archive")
