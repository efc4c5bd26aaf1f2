"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 23:49:43.942895
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gc_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("node", sa.Text(), server_default="", nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("strategy", sa.Text(), nullable=True),
        sa.Column("cursor", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "options",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("messages_deleted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("rows_skipped_locked", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("batches", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "requested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("resumed_from", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'stopped', 'complete', 'failed', 'superseded')",
            name=op.f("ck_gc_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["resumed_from"], ["gc_runs.id"], name=op.f("fk_gc_runs_resumed_from_gc_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gc_runs")),
    )
    op.create_index(
        "ix_gc_runs_table_name_node_status", "gc_runs", ["table_name", "node", "status"], unique=False
    )
    # An application may already own `messages`: msggc then leaves it as it is and plans
    # with the indexes it has (see engine.planner).
    if not sa.inspect(op.get_bind()).has_table("messages"):
        _create_messages()
    op.create_table(
        "gc_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("target_url", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["gc_runs.id"], name=op.f("fk_gc_outbox_run_id_gc_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gc_outbox")),
    )
    op.create_index(
        "ix_gc_outbox_pending",
        "gc_outbox",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("delivered_at IS NULL"),
    )


def _create_messages() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("direction", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("message_id", name=op.f("uq_messages_message_id")),
    )
    op.create_index(
        "ix_messages_garbage",
        "messages",
        ["id"],
        unique=False,
        postgresql_where=sa.text("processed_at IS NOT NULL"),
    )


def downgrade() -> None:
    # `messages` holds the application's data: a downgrade never drops it.
    op.drop_index(
        "ix_gc_outbox_pending", table_name="gc_outbox", postgresql_where=sa.text("delivered_at IS NULL")
    )
    op.drop_table("gc_outbox")
    op.drop_index("ix_gc_runs_table_name_node_status", table_name="gc_runs")
    op.drop_table("gc_runs")
