"""``msggc migrate``: Alembic upgrade to head on any DSN, embedded server included."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from engine.db import connect

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["dsn"] = dsn
    return config


def head() -> str:
    head_revision = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head_revision is not None
    return head_revision


def current(dsn: str) -> str | None:
    import sqlalchemy as sa

    with connect(dsn) as conn:
        engine = sa.create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=sa.NullPool)
        with engine.connect() as sa_conn:
            return MigrationContext.configure(sa_conn).get_current_revision()


def upgrade(dsn: str) -> tuple[str | None, str]:
    """Upgrade to head (idempotent); returns the revisions before and after."""
    before = current(dsn)
    command.upgrade(alembic_config(dsn), "head")
    return before, head()
