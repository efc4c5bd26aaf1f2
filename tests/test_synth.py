"""Synthetic seeding against a real PostgreSQL: shapes, exact counts, schema kept intact."""

from __future__ import annotations

import psycopg
import pytest

from engine.errors import DatabaseUnreachable, SchemaMissing, TargetTableError, UsageError
from engine.tools import synth


def one(dsn: str, query: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row


def schema_snapshot(dsn: str, table: str = "messages") -> dict[str, object]:
    """Everything a seed could lose: indexes, constraints, NOT NULLs, replica identity."""
    with psycopg.connect(dsn) as conn:
        oid = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0]  # type: ignore[index]
        indexes = conn.execute(
            "SELECT pg_get_indexdef(indexrelid), indisprimary, indisunique, indisclustered,"
            " indisreplident FROM pg_index WHERE indrelid = %s ORDER BY 1",
            (oid,),
        ).fetchall()
        constraints = conn.execute(
            "SELECT conname, contype, pg_get_constraintdef(oid), conindid::regclass::text"
            " FROM pg_constraint WHERE conrelid = %s ORDER BY 1",
            (oid,),
        ).fetchall()
        not_null = conn.execute(
            "SELECT attname, attnotnull, attidentity FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 ORDER BY attnum",
            (oid,),
        ).fetchall()
        replident = conn.execute("SELECT relreplident FROM pg_class WHERE oid = %s", (oid,))
    return {
        "indexes": indexes,
        "constraints": constraints,
        "not_null": not_null,
        "replident": replident.fetchone(),
    }


def test_dense_seed_has_exact_garbage_count_spread_evenly(dsn: str) -> None:
    report = synth.seed(dsn, 20_000, "dense")

    assert report.rows == 20_000
    assert report.garbage_rows == 16_000
    assert one(dsn, "SELECT count(*), count(processed_at) FROM messages") == (20_000, 16_000)
    # Every block of 100 consecutive ids holds exactly 80 garbage rows.
    per_window = one(
        dsn,
        "SELECT min(c), max(c) FROM (SELECT count(processed_at) AS c FROM messages"
        " GROUP BY (id - 1) / 100) AS w",
    )
    assert per_window == (80, 80)


def test_sparse_seed_defaults_to_one_percent_garbage_at_regular_gaps(dsn: str) -> None:
    report = synth.seed(dsn, 20_000, "sparse")

    assert report.garbage_rows == 200
    assert one(dsn, "SELECT count(processed_at) FROM messages") == (200,)
    gaps = one(
        dsn,
        "SELECT min(gap), max(gap) FROM (SELECT id - lag(id) OVER (ORDER BY id) AS gap"
        " FROM messages WHERE processed_at IS NOT NULL) AS g",
    )
    assert gaps == (100, 100)


@pytest.mark.parametrize(
    ("rows", "fraction", "expected"),
    [(9_999, 0.333, 3_330), (7, 0.5, 4), (1, 1.0, 1), (1_000, 0.0, 0), (1_000, 1.0, 1_000)],
)
def test_garbage_count_is_exact_for_any_fraction(dsn: str, rows: int, fraction: float, expected: int) -> None:
    report = synth.seed(dsn, rows, "dense", fraction)

    assert report.garbage_rows == expected
    assert one(dsn, "SELECT count(*), count(processed_at) FROM messages") == (rows, expected)


def test_aged_seed_puts_garbage_in_oldest_rows(dsn: str) -> None:
    report = synth.seed(dsn, 20_000, "aged")

    assert report.garbage_rows == 16_000
    garbage_max_id, garbage_max_created = one(
        dsn, "SELECT max(id), max(created_at) FROM messages WHERE processed_at IS NOT NULL"
    )
    live_min_id, live_min_created, live = one(
        dsn, "SELECT min(id), min(created_at), count(*) FROM messages WHERE processed_at IS NULL"
    )
    assert live == 4_000
    assert garbage_max_id < live_min_id
    assert garbage_max_created < live_min_created


def test_created_at_grows_with_id_and_processed_at_follows_it(dsn: str) -> None:
    synth.seed(dsn, 5_000, "dense")

    out_of_order = one(
        dsn,
        "SELECT count(*) FROM (SELECT created_at, lag(created_at) OVER (ORDER BY id) AS prev"
        " FROM messages) AS m WHERE created_at <= prev",
    )
    assert out_of_order == (0,)
    bad_processed = one(
        dsn,
        "SELECT count(*) FROM messages WHERE processed_at <= created_at OR processed_at > now()",
    )
    assert bad_processed == (0,)
    span_days = one(dsn, "SELECT extract(day FROM max(created_at) - min(created_at)) FROM messages")
    assert span_days[0] >= 29


def test_seed_restores_every_index_of_the_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Beyond the schema: the seed must keep whatever indexes and flags it finds.
        conn.execute("CREATE INDEX ix_extra ON messages (chat_id, created_at DESC) WHERE direction = 1")
        conn.execute("ALTER TABLE messages REPLICA IDENTITY USING INDEX uq_messages_message_id")
        conn.execute("CREATE INDEX ix_created ON messages (created_at) INCLUDE (status)")
        conn.execute("ALTER TABLE messages CLUSTER ON ix_created")
    before = schema_snapshot(dsn)

    report = synth.seed(dsn, 2_000, "dense")

    assert schema_snapshot(dsn) == before
    assert set(report.index_seconds) == {
        "pk_messages",
        "uq_messages_message_id",
        "ix_messages_garbage",
        "ix_extra",
        "ix_created",
    }


def test_seed_appends_after_existing_rows_and_identity_continues(dsn: str) -> None:
    synth.seed(dsn, 1_000, "aged", 0.5)
    synth.seed(dsn, 500, "dense")

    assert one(dsn, "SELECT count(*), min(id), max(id) FROM messages") == (1_500, 1, 1_500)
    out_of_order = one(
        dsn,
        "SELECT count(*) FROM (SELECT created_at, lag(created_at) OVER (ORDER BY id) AS prev"
        " FROM messages) AS m WHERE created_at <= prev",
    )
    assert out_of_order == (0,)
    with psycopg.connect(dsn) as conn:
        new_id = conn.execute(
            "INSERT INTO messages (message_id, chat_id, direction, status, payload)"
            " VALUES ('app-1', 'c', 0, 0, 'p') RETURNING id"
        ).fetchone()
    assert new_id == (1_501,)


def test_failed_seed_rolls_back_and_keeps_the_indexes(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        # The seeded row with id 2 would get message_id 'wamid.2': the unique rebuild fails.
        conn.execute(
            "INSERT INTO messages (id, message_id, chat_id, direction, status, payload)"
            " VALUES (1, 'wamid.2', 'c', 0, 0, 'p')"
        )
    before = schema_snapshot(dsn)

    with pytest.raises(TargetTableError, match="rolled back"):
        synth.seed(dsn, 100, "dense")

    assert schema_snapshot(dsn) == before
    assert one(dsn, "SELECT count(*) FROM messages") == (1,)


def test_seed_reports_progress_for_every_phase(dsn: str) -> None:
    calls: list[tuple[str, float]] = []

    report = synth.seed(dsn, 250_000, "sparse", on_progress=lambda p, f: calls.append((p, f)))

    phases = list(dict.fromkeys(phase for phase, _ in calls))
    assert phases == ["insert", *(f"index {name}" for name in report.index_seconds), "vacuum analyze"]
    inserts = [f for phase, f in calls if phase == "insert"]
    assert inserts == sorted(inserts)
    assert inserts[0] == 0.0
    assert inserts[-1] == 1.0
    assert len(inserts) > 2
    assert all(0.0 <= f <= 1.0 for _, f in calls)


def test_seed_leaves_fresh_statistics(dsn: str) -> None:
    synth.seed(dsn, 3_000, "dense")

    assert one(dsn, "SELECT reltuples::bigint FROM pg_class WHERE oid = 'messages'::regclass") == (3_000,)


def test_seed_accepts_a_schema_qualified_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA archive")
        conn.execute("CREATE TABLE archive.inbox (LIKE public.messages INCLUDING ALL)")

    report = synth.seed(dsn, 1_000, "aged", table="archive.inbox")

    assert report.garbage_rows == 800
    assert one(dsn, "SELECT count(*) FROM archive.inbox") == (1_000,)
    assert one(dsn, "SELECT count(*) FROM messages") == (0,)


def test_missing_messages_table_asks_for_migrate(scratch_dsn: str) -> None:
    with pytest.raises(SchemaMissing, match="run `msggc migrate` first"):
        synth.seed(scratch_dsn, 10, "dense")


def test_missing_custom_table_is_a_target_table_error(dsn: str) -> None:
    with pytest.raises(TargetTableError, match="does not exist"):
        synth.seed(dsn, 10, "dense", table="nope")


def test_table_without_the_message_columns_is_rejected(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE thin (id bigint PRIMARY KEY, payload text)")

    with pytest.raises(TargetTableError, match="lacks the columns"):
        synth.seed(dsn, 10, "dense", table="thin")


@pytest.mark.parametrize(
    ("rows", "shape", "fraction"),
    [
        (0, "dense", None),
        (-5, "dense", None),
        (10, "weird", None),
        (10, "dense", 1.5),
        (10, "aged", -0.1),
        (True, "dense", None),
    ],
)
def test_invalid_arguments_are_rejected_before_connecting(
    rows: int, shape: str, fraction: float | None
) -> None:
    with pytest.raises(UsageError):
        synth.seed("host=/nonexistent dbname=x", rows, shape, fraction)  # type: ignore[arg-type]


def test_unreachable_database_is_reported() -> None:
    with pytest.raises(DatabaseUnreachable):
        synth.seed("postgresql://postgres@127.0.0.1:1/x?connect_timeout=2", 10, "dense")
