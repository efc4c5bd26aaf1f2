"""``msggc migrate --archive-for TABLE``: ``gc --archive`` and ``restore --run`` on any table."""

from __future__ import annotations

import pytest

from tests.support import run_cli
from tests.test_cli import assert_one_line_error

UUID_TABLE = """
CREATE SCHEMA app;
CREATE TABLE app.msgs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    message_id text NOT NULL UNIQUE CHECK (message_id <> ''),
    chat_id text NOT NULL,
    payload text NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    size int GENERATED ALWAYS AS (length(payload)) STORED
)
"""
COLUMNS = "id, seq, message_id, chat_id, payload, created_at, processed_at, size"


def make_uuid_table(conn, rows: int = 300) -> None:
    """``rows`` messages with random UUID keys; every third one processed (garbage)."""
    conn.execute(UUID_TABLE)
    conn.execute("INSERT INTO app.msgs (message_id, chat_id, payload, processed_at)"
                 " SELECT 'wamid.' || i, 'chat' || i %% 7, repeat('p', i %% 50),"
                 " CASE WHEN i %% 3 = 0 THEN now() - interval '1 day' END FROM generate_series(1, %s) i",
                 (rows,))
    conn.execute("ANALYZE app.msgs")


def rows_of(conn, table: str, where: str = "true") -> list[tuple]:
    return conn.execute(f"SELECT {COLUMNS} FROM {table} WHERE {where} ORDER BY id").fetchall()


def migrate_archive(dsn: str, *tables: str):
    args = [arg for table in tables for arg in ("--archive-for", table)]
    proc = run_cli("migrate", "--dsn", dsn, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_archive_for_a_uuid_table_in_another_schema_takes_gc_rows_and_restore_puts_them_back(conn, dsn):
    make_uuid_table(conn)
    garbage = rows_of(conn, "app.msgs", "processed_at IS NOT NULL")
    live = rows_of(conn, "app.msgs", "processed_at IS NULL")
    assert "archive table app.msgs_archive created for app.msgs" in migrate_archive(dsn, "app.msgs").stdout

    gc = run_cli("gc", "--dsn", dsn, "--table", "app.msgs", "--archive", "--batch-size", "40")
    assert gc.returncode == 0, gc.stderr
    run_id = conn.execute("SELECT max(id) FROM gc_runs").fetchone()[0]

    assert rows_of(conn, "app.msgs") == live
    assert rows_of(conn, "app.msgs_archive") == garbage
    assert conn.execute("SELECT array_agg(DISTINCT run_id) FROM app.msgs_archive").fetchone()[0] == [run_id]

    restore = run_cli("restore", "--dsn", dsn, "--table", "app.msgs", "--run", str(run_id))
    assert restore.returncode == 0, restore.stderr
    assert f"restored {len(garbage)} rows of run {run_id} into app.msgs" in restore.stdout
    assert rows_of(conn, "app.msgs") == sorted(garbage + live)
    assert conn.execute("SELECT count(*) FROM app.msgs_archive").fetchone()[0] == 0


def test_gc_archive_without_the_archive_table_names_the_command_that_makes_it(conn, dsn):
    make_uuid_table(conn, rows=30)
    proc = run_cli("gc", "--dsn", dsn, "--table", "app.msgs", "--archive")
    assert_one_line_error(proc, "archive table app.msgs_archive does not exist:"
                                " run `msggc migrate --archive-for app.msgs` first")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM app.msgs").fetchone()[0] == 30
    purge = run_cli("purge-archive", "--dsn", dsn, "--table", "app.msgs", "--older-than", "1d")
    assert_one_line_error(purge, "run `msggc migrate --archive-for app.msgs` first")


def test_migrate_archive_for_is_idempotent_and_keeps_what_is_archived(conn, dsn):
    make_uuid_table(conn, rows=30)
    migrate_archive(dsn, "app.msgs")
    assert run_cli("gc", "--dsn", dsn, "--table", "app.msgs", "--archive").returncode == 0

    again = migrate_archive(dsn, "app.msgs", "messages")

    assert "schema already at revision" in again.stdout
    assert "archive table app.msgs_archive already exists for app.msgs" in again.stdout
    assert "archive table public.messages_archive already exists for messages" in again.stdout
    assert conn.execute("SELECT count(*) FROM app.msgs_archive").fetchone()[0] == 10


def test_the_archive_has_the_columns_and_types_but_no_key_constraint_identity_or_default(conn, dsn):
    make_uuid_table(conn, rows=0)
    migrate_archive(dsn, "app.msgs")

    columns = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull, attidentity, attgenerated,"
        " pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d"
        " ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE attrelid = 'app.msgs_archive'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    ).fetchall()
    assert columns == [
        ("id", "uuid", False, "", "", None), ("seq", "bigint", False, "", "", None),
        ("message_id", "text", False, "", "", None), ("chat_id", "text", False, "", "", None),
        ("payload", "text", False, "", "", None),
        ("created_at", "timestamp with time zone", False, "", "", None),
        ("processed_at", "timestamp with time zone", False, "", "", None),
        ("size", "integer", False, "", "", None),
        ("archived_at", "timestamp with time zone", True, "", "", "now()"),
        ("run_id", "bigint", True, "", "", None),
    ]
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = 'app.msgs_archive'::regclass"
                        " AND contype <> 'n'").fetchone()[0] == 0
    indexes = conn.execute("SELECT pg_get_indexdef(indexrelid) FROM pg_index"
                           " WHERE indrelid = 'app.msgs_archive'::regclass").fetchall()
    assert sorted(row[0].split(" USING ")[1] for row in indexes) == [
        "brin (archived_at) WITH (autosummarize='on')", "brin (run_id) WITH (autosummarize='on')"]


def test_the_same_key_and_unique_values_may_be_archived_twice(conn, dsn):
    make_uuid_table(conn, rows=6)
    migrate_archive(dsn, "app.msgs")
    first = rows_of(conn, "app.msgs", "processed_at IS NOT NULL")
    assert run_cli("gc", "--dsn", dsn, "--table", "app.msgs", "--archive").returncode == 0
    conn.execute("INSERT INTO app.msgs (id, message_id, chat_id, payload, processed_at)"
                 " SELECT id, message_id, chat_id, 'again', now() FROM app.msgs_archive")

    assert run_cli("gc", "--dsn", dsn, "--table", "app.msgs", "--archive").returncode == 0

    twice = conn.execute("SELECT id, count(*) FROM app.msgs_archive GROUP BY id ORDER BY id").fetchall()
    assert twice == [(row[0], 2) for row in first]


def test_restore_of_a_table_without_primary_key_takes_key(conn, dsn):
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE TABLE app.events (ref uuid NOT NULL DEFAULT gen_random_uuid(), body text,"
                 " processed_at timestamptz)")
    conn.execute("CREATE UNIQUE INDEX ON app.events (ref)")
    conn.execute("INSERT INTO app.events (body, processed_at) SELECT 'e' || i,"
                 " CASE WHEN i % 2 = 0 THEN now() END FROM generate_series(1, 20) i")
    before = conn.execute("SELECT ref, body FROM app.events ORDER BY ref").fetchall()
    migrate_archive(dsn, "app.events")
    assert run_cli("gc", "--dsn", dsn, "--table", "app.events", "--archive").returncode == 0
    run_id = conn.execute("SELECT max(id) FROM gc_runs").fetchone()[0]

    proc = run_cli("restore", "--dsn", dsn, "--table", "app.events", "--key", "ref", "--run", str(run_id))

    assert proc.returncode == 0, proc.stderr
    assert "restored 10 rows" in proc.stdout
    assert conn.execute("SELECT ref, body FROM app.events ORDER BY ref").fetchall() == before


def test_an_existing_archive_lacking_columns_is_refused_on_one_line(conn, dsn):
    make_uuid_table(conn, rows=0)
    conn.execute("CREATE TABLE app.msgs_archive (id uuid, message_id text, archived_at timestamptz,"
                 " run_id bigint)")
    proc = run_cli("migrate", "--dsn", dsn, "--archive-for", "app.msgs")
    assert_one_line_error(proc, "archive table app.msgs_archive exists but lacks columns"
                                " ['seq', 'chat_id', 'payload', 'created_at', 'processed_at', 'size']")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_an_existing_archive_with_another_type_is_refused(conn, dsn):
    make_uuid_table(conn, rows=0)
    migrate_archive(dsn, "app.msgs")
    conn.execute("ALTER TABLE app.msgs_archive ALTER COLUMN id TYPE text")
    proc = run_cli("migrate", "--dsn", dsn, "--archive-for", "app.msgs")
    assert_one_line_error(proc, "its column 'id' is text, where app.msgs has uuid")


@pytest.mark.parametrize(("setup", "table", "fragment"), [
    ("", "app.nothing", "table app.nothing does not exist: check --archive-for"),
    ("CREATE TABLE app.jobs (id bigint PRIMARY KEY, run_id bigint, processed_at timestamptz)", "app.jobs",
     "table app.jobs has a column named 'run_id'"),
    ("CREATE VIEW app.recent AS SELECT 1 AS id", "app.recent", "app.recent is a view, not a table"),
])
def test_migrate_archive_for_refuses_what_it_cannot_archive(conn, dsn, setup, table, fragment):
    conn.execute("CREATE SCHEMA app")
    if setup:
        conn.execute(setup)
    proc = run_cli("migrate", "--dsn", dsn, "--archive-for", table)
    assert_one_line_error(proc, fragment)
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%%archive'"
                        " AND schemaname = 'app'").fetchone()[0] == 0


PARTITIONED = """
CREATE TABLE pm (id bigint NOT NULL, day date NOT NULL, payload text, processed_at timestamptz,
                 PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE pm_d1 PARTITION OF pm FOR VALUES FROM ('2026-01-01') TO ('2026-01-02');
CREATE TABLE pm_d2 PARTITION OF pm FOR VALUES FROM ('2026-01-02') TO ('2026-01-03');
CREATE TABLE pm_d3 (payload text, processed_at timestamptz, day date NOT NULL, id bigint NOT NULL);
ALTER TABLE pm ATTACH PARTITION pm_d3 FOR VALUES FROM ('2026-01-03') TO ('2026-01-04');
INSERT INTO pm SELECT i, date '2026-01-01' + (i % 3), 'row ' || i,
       CASE WHEN i % 3 = 0 OR i % 2 = 0 THEN now() END FROM generate_series(1, 900) i;
"""


def rows_by_leaf(conn) -> list[tuple[str, str]]:
    return conn.execute("SELECT tableoid::regclass::text, p::text FROM pm p ORDER BY 2").fetchall()


def test_archive_of_a_partitioned_table_takes_every_leafs_rows_and_restore_run_puts_them_back(conn, dsn):
    """One archive for the parent (a plain table of its columns): gc --archive moves the garbage
    of every leaf there (pm_d1 wholly garbage: moved, not dropped; pm_d3's columns in another
    order), and restore --run puts each row back through the parent into its leaf."""
    conn.execute(PARTITIONED)
    everything = rows_by_leaf(conn)
    garbage = [row for (_, row) in conn.execute(
        "SELECT tableoid, p::text FROM pm p WHERE processed_at IS NOT NULL ORDER BY 2")]
    assert "archive table public.pm_archive created for pm" in migrate_archive(dsn, "pm").stdout

    gc = run_cli("gc", "--dsn", dsn, "--table", "pm", "--archive", "--batch-size", "50")
    assert gc.returncode == 0, gc.stderr
    run_id = conn.execute("SELECT max(id) FROM gc_runs").fetchone()[0]

    assert conn.execute("SELECT count(*) FROM pm WHERE processed_at IS NOT NULL").fetchone()[0] == 0
    archived = [row for (row,) in conn.execute(
        "SELECT (id, day, payload, processed_at)::text FROM pm_archive ORDER BY 1")]
    assert archived == garbage
    leaves = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'pm'::regclass").fetchone()[0]
    assert leaves == 3  # none dropped

    back = run_cli("restore", "--dsn", dsn, "--table", "pm", "--run", str(run_id))
    assert back.returncode == 0, back.stderr
    assert f"restored {len(garbage):,} rows of run {run_id} into pm" in back.stdout
    assert rows_by_leaf(conn) == everything
    assert conn.execute("SELECT count(*) FROM pm_archive").fetchone()[0] == 0
