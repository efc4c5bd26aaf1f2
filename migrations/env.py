"""Alembic environment: the target metadata is engine.schema's, the DSN comes from msggc."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa
from alembic import context

from engine.schema import metadata

config = context.config


def _engine() -> sa.Engine:
    dsn = config.attributes.get("dsn") or config.get_main_option("sqlalchemy.url")
    if not dsn:
        raise RuntimeError("no DSN: run migrations through `msggc migrate`")
    return sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=sa.NullPool
    )


def run_migrations_offline() -> None:
    context.configure(url="postgresql+psycopg://", target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
