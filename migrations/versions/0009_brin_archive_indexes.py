"""BRIN archive indexes

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 20:00:00.000000

``--archive`` writes every deleted row into the archive in the statement that deletes it: two
btree entries a row took 43% of its time (1M dense rows, see BENCHMARKS.md). ``run_id`` and
``archived_at`` only grow as rows arrive, so a BRIN index (a few pages for millions of rows)
finds a run's rows, or the rows older than a cutoff, for ``restore`` and ``purge-archive``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {"ix_messages_archive_run_id": "run_id", "ix_messages_archive_archived_at": "archived_at"}


def upgrade() -> None:
    for name, column in INDEXES.items():
        op.drop_index(name, table_name="messages_archive")
        op.create_index(name, "messages_archive", [column], postgresql_using="brin",
                        postgresql_with={"autosummarize": "on"})


def downgrade() -> None:
    for name, column in INDEXES.items():
        op.drop_index(name, table_name="messages_archive")
        op.create_index(name, "messages_archive", [column])
