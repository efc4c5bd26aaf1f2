"""Alembic's migrations and engine.schema describe the same database."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine.migrate import head, upgrade
from engine.schema import metadata


def test_migrated_database_matches_the_metadata(dsn):
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn),
                              poolclass=sa.NullPool)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert diff == []


def test_upgrade_twice_is_a_no_op(dsn):
    assert upgrade(dsn) == (head(), head())


def test_migrate_keeps_an_existing_messages_table(scratch_dsn):
    """An application's own messages table is left as it is; msggc adds its bookkeeping."""
    with psycopg.connect(scratch_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE messages (id bigserial primary key, processed_at timestamptz)")
        conn.execute("INSERT INTO messages (processed_at) VALUES (now()), (NULL)")
        upgrade(scratch_dsn)
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
        assert conn.execute("SELECT to_regclass('gc_runs') IS NOT NULL").fetchone()[0]
