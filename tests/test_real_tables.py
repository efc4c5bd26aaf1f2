"""Real tables, not msggc's ``messages``: uuid, text, timestamp and composite keys, no key at all,
a renamed processed column, garbage defined by ``--where`` alone, hostile filters.

Every case is exact: the garbage rows are gone, every other row is byte-identical (a digest of the
survivors' whole rows, taken before the run, equals the table's digest after it), and the rows the
runs say they deleted (each result and the sum over ``gc_runs``) equal the rows gone.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from engine import GcResult, Progress, collect
from engine.config import GcOptions, StrategyName, TableSpec
from engine.db import APPLICATION_NAME
from engine.errors import UsageError
from tests.faults.helpers import one_line_error
from tests.polling import wait_until
from tests.support import run_cli

Conn = psycopg.Connection[Any]

# --- what the table holds, before and after -----------------------------------------------------


def rows_digest(conn: Conn, table: str, where: str = "true") -> str:
    """md5 of the whole rows (their text form, in that order) that pass ``where``."""
    return conn.execute(sql.SQL(
        "SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY t::text COLLATE \"C\")), '')"
        " FROM {} t WHERE {}").format(sql.Identifier(table), sql.SQL(where))).fetchone()[0]


def count(conn: Conn, table: str, where: str = "true") -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(
        sql.Identifier(table), sql.SQL(where))).fetchone()[0]


def counted(conn: Conn) -> int:
    return conn.execute("SELECT coalesce(sum(messages_deleted), 0)::bigint FROM gc_runs").fetchone()[0]


def gc_run_count(conn: Conn) -> int:
    return conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0]


def relations(conn: Conn) -> list[tuple[str, str]]:
    return conn.execute("SELECT c.oid::regclass::text, c.relkind::text FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
                        " ORDER BY 1").fetchall()


@dataclass(frozen=True)
class Expected:
    """The table before the run, and what must be left of it: the rows that are not garbage."""

    table: str
    rows: int
    garbage: int
    survivors: str

    @classmethod
    def take(cls, conn: Conn, table: str, garbage: str) -> Expected:
        keep = f"NOT coalesce(({garbage}), false)"
        expected = cls(table, count(conn, table), count(conn, table, f"coalesce(({garbage}), false)"),
                       rows_digest(conn, table, keep))
        assert 0 < expected.garbage < expected.rows, "a case needs garbage and survivors"
        return expected

    def check(self, conn: Conn, deleted: list[int], statuses: list[str]) -> None:
        assert statuses[-1] == "complete", statuses
        assert count(conn, self.table) == self.rows - self.garbage
        assert rows_digest(conn, self.table) == self.survivors
        assert sum(deleted) == self.garbage
        assert counted(conn) == self.garbage

    def check_results(self, conn: Conn, *results: GcResult) -> None:
        assert results[-1].status == "complete", (results[-1].status, results[-1].error)
        self.check(conn, [r.messages_deleted for r in results], [r.status for r in results])


def whole_digest(conn: Conn, table: str) -> tuple[int, str]:
    return count(conn, table), rows_digest(conn, table)


def options(table: str, **settings: Any) -> GcOptions:
    spec = TableSpec(name=table, schema="public", key=tuple(settings.pop("key", ())),
                     processed_column=settings.pop("processed_column", None),
                     where=settings.pop("where", None))
    return GcOptions(table=spec, **settings)


def gc_json(dsn: str, *args: str) -> dict[str, Any]:
    done = run_cli("gc", "--dsn", dsn, "--json", *args)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


def refused(dsn: str, *args: str) -> str:
    """A gc the CLI refuses: exit 2 and its one error line (no traceback)."""
    done = run_cli("gc", "--dsn", dsn, *args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    return one_line_error(done.stderr)


# --- tables -----------------------------------------------------------------------------------

DENSE = "g % 5 <> 0"  # 80 % garbage
SPARSE = "g % 100 = 0"  # 1 %
PROCESSED = "processed_at IS NOT NULL"


def uuid_table(conn: Conn, name: str, rows: int, garbage: str, partial_index: bool = False) -> None:
    conn.execute(sql.SQL(
        "CREATE TABLE {t} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), chat_id text NOT NULL,"
        " status text NOT NULL, payload text NOT NULL, processed_at timestamptz)"
    ).format(t=sql.Identifier(name)))
    conn.execute(sql.SQL(
        "INSERT INTO {t} (chat_id, status, payload, processed_at)"
        " SELECT 'chat' || g % 7, CASE WHEN g % 3 = 0 THEN 'new' ELSE 'read' END, repeat(md5(g::text), 3),"
        " CASE WHEN {garbage} THEN now() - make_interval(days => g % 60) END"
        " FROM generate_series(1, {n}) g").format(t=sql.Identifier(name), garbage=sql.SQL(garbage),
                                                 n=sql.Literal(rows)))
    if partial_index:
        conn.execute(sql.SQL("CREATE INDEX ON {t} (id) WHERE processed_at IS NOT NULL").format(
            t=sql.Identifier(name)))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))


# --- uuid primary key -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("strategy", "chosen"), [("auto", "physical"), ("physical", "physical"),
                                                  ("index", "index")])
def test_uuid_key_dense(conn, dsn, strategy, chosen, workers):
    uuid_table(conn, "events", 3000, DENSE)
    expected = Expected.take(conn, "events", PROCESSED)
    result = collect(dsn, options("events", strategy=strategy, workers=workers, batch_size=200))
    assert result.strategy == chosen
    expected.check_results(conn, result)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("strategy", "chosen"), [("auto", "index"), ("physical", "physical"),
                                                  ("index", "index")])
def test_uuid_key_sparse_with_a_partial_index(conn, dsn, strategy, chosen, workers):
    uuid_table(conn, "events", 6000, SPARSE, partial_index=True)
    expected = Expected.take(conn, "events", PROCESSED)
    result = collect(dsn, options("events", strategy=strategy, workers=workers, batch_size=7))
    assert result.strategy == chosen, result.reason
    expected.check_results(conn, result)


def test_uuid_key_refuses_the_key_walk_in_one_line_and_changes_nothing(conn, dsn):
    uuid_table(conn, "events", 500, DENSE)
    before, rels = whole_digest(conn, "events"), relations(conn)
    line = refused(dsn, "--table", "public.events", "--strategy", "key")
    assert "strategy key cannot walk this table" in line and "integer" in line, line
    assert whole_digest(conn, "events") == before
    assert relations(conn) == rels
    assert gc_run_count(conn) == 0


def test_uuid_index_walk_stops_on_budgets_and_resumes_from_a_text_position(conn, dsn):
    uuid_table(conn, "events", 2000, DENSE)
    expected = Expected.take(conn, "events", PROCESSED)
    results = []
    for _ in range(20):
        results.append(collect(dsn, options("events", strategy="index", batch_size=100, max_rows=300)))
        if results[-1].status == "complete":
            break
    statuses = [r.status for r in results]
    assert set(statuses[:-1]) == {"stopped"} and len(statuses) >= 5, statuses
    assert all(r.messages_deleted <= 300 for r in results)
    expected.check_results(conn, *results)
    # each run resumed its predecessor, whose checkpoint is the last uuid it visited, as text
    chain = conn.execute("SELECT id, resumed_from, status, cursor FROM gc_runs ORDER BY id").fetchall()
    assert [row[1] for row in chain[1:]] == [row[0] for row in chain[:-1]]
    for _, _, status, cursor in chain[:-1]:
        assert status == "superseded"
        (part,) = cursor["slices"]
        assert isinstance(part["position"], list) and len(part["position"]) == 1
        assert count(conn, "events", f"id = '{part['position'][0]}'::uuid") == 0  # a deleted row's key
    # resumed, not re-walked: all runs together take about the batches of one walk
    batches = conn.execute("SELECT sum(batches) FROM gc_runs").fetchone()[0]
    assert batches <= expected.garbage // 100 + len(results) + 1


# --- text, timestamp, composite keys; no key --------------------------------------------------

TRICKY_TEXT = ["", " ", "  a", "A", "a", "a ", "B", "b", "O'Brien", "back\\slash", "per%cent", "%(lo)s",
               "{braces}", "ROW(1)", "zürich", "Ωmega", "日本", "emoji 🙂", "tab\tx", "new\nline", "~"]


@pytest.mark.parametrize("strategy", ["index", "physical"])
def test_text_primary_key(conn, dsn, strategy):
    conn.execute("CREATE TABLE chats (handle text PRIMARY KEY, body text NOT NULL, processed_at timestamptz)")
    keys = [f"{base}{n}" for n in range(40) for base in TRICKY_TEXT]
    conn.execute("INSERT INTO chats SELECT k, md5(k), CASE WHEN mod(i, 3) <> 0 THEN now() END"
                 " FROM unnest(%s::text[]) WITH ORDINALITY AS u(k, i)", (keys,))
    conn.execute("ANALYZE chats")
    expected = Expected.take(conn, "chats", PROCESSED)
    results = []
    for _ in range(30):  # budgets: the text position goes to gc_runs and back several times
        results.append(collect(dsn, options("chats", strategy=strategy, batch_size=50, max_rows=150)))
        if results[-1].status == "complete":
            break
    expected.check_results(conn, *results)


@pytest.mark.parametrize("column_type", ["timestamptz", "timestamp"])
@pytest.mark.parametrize("strategy", ["index", "physical", "auto"])
def test_timestamp_primary_key(conn, dsn, column_type, strategy):
    conn.execute(f"CREATE TABLE ticks (at {column_type} PRIMARY KEY, v int NOT NULL,"
                 " processed_at timestamptz)")
    conn.execute("INSERT INTO ticks SELECT '2024-03-31 01:59:59.999999'::timestamptz"
                 " + make_interval(secs => g * 0.000137 + (g % 3) * 3600), g,"
                 " CASE WHEN g % 4 <> 1 THEN now() END FROM generate_series(1, 2000) g")
    conn.execute("ANALYZE ticks")
    expected = Expected.take(conn, "ticks", PROCESSED)
    results = []
    for _ in range(30):
        results.append(collect(dsn, options("ticks", strategy=strategy, batch_size=97, max_rows=400)))
        if results[-1].status == "complete":
            break
    expected.check_results(conn, *results)


def composite_table(conn: Conn, garbage: str, partial_index: bool) -> None:
    conn.execute("CREATE TABLE inbox (tenant_id int NOT NULL,"
                 " msg_uuid uuid NOT NULL DEFAULT gen_random_uuid(), body text NOT NULL,"
                 " processed_at timestamptz, PRIMARY KEY (tenant_id, msg_uuid))")
    conn.execute(sql.SQL(
        "INSERT INTO inbox (tenant_id, body, processed_at) SELECT g % 5, md5(g::text),"
        " CASE WHEN {garbage} THEN now() END FROM generate_series(1, 4000) g"
    ).format(garbage=sql.SQL(garbage)))
    if partial_index:
        conn.execute("CREATE INDEX ON inbox (tenant_id, msg_uuid) WHERE processed_at IS NOT NULL")
    conn.execute("ANALYZE inbox")


@pytest.mark.parametrize(("garbage", "partial_index", "strategy", "chosen", "workers"), [
    (DENSE, False, "index", "index", 1),
    (DENSE, False, "physical", "physical", 2),
    (DENSE, False, "auto", "physical", 1),
    (SPARSE, True, "auto", "index", 1),
    (SPARSE, True, "index", "index", 2),
])
def test_composite_primary_key(conn, dsn, garbage, partial_index, strategy, chosen, workers):
    composite_table(conn, garbage, partial_index)
    expected = Expected.take(conn, "inbox", PROCESSED)
    results = []
    for _ in range(30):
        results.append(collect(dsn, options("inbox", strategy=strategy, workers=workers, batch_size=13,
                                            max_rows=1000)))
        if results[-1].status == "complete":
            break
    assert {r.strategy for r in results} == {chosen}
    expected.check_results(conn, *results)


def test_composite_key_refuses_the_key_walk(conn, dsn):
    composite_table(conn, DENSE, partial_index=False)
    before = whole_digest(conn, "inbox")
    line = refused(dsn, "--table", "inbox", "--strategy", "key")
    assert "(tenant_id, msg_uuid) is not one" in line, line
    assert whole_digest(conn, "inbox") == before and gc_run_count(conn) == 0


def no_key_table(conn: Conn) -> None:
    conn.execute("CREATE TABLE audit_log (at timestamptz NOT NULL, who text, what text,"
                 " processed_at timestamptz)")
    conn.execute("INSERT INTO audit_log SELECT now() - make_interval(secs => g % 50), 'u' || g % 3,"
                 " repeat('x', g % 40), CASE WHEN g % 3 = 0 THEN now() END FROM generate_series(1, 3000) g")
    conn.execute("INSERT INTO audit_log SELECT * FROM audit_log LIMIT 200")  # duplicate rows, no key to tell
    conn.execute("ANALYZE audit_log")


@pytest.mark.parametrize("strategy", ["auto", "physical"])
def test_a_table_without_a_primary_key_is_walked_physically(conn, dsn, strategy):
    no_key_table(conn)
    expected = Expected.take(conn, "audit_log", PROCESSED)
    result = collect(dsn, options("audit_log", strategy=strategy, workers=2, batch_size=5))
    assert result.strategy == "physical"
    expected.check_results(conn, result)


@pytest.mark.parametrize("strategy", ["index", "key"])
def test_a_table_without_a_primary_key_refuses_the_key_walks(conn, dsn, strategy):
    no_key_table(conn)
    before, rels = whole_digest(conn, "audit_log"), relations(conn)
    line = refused(dsn, "--table", "audit_log", "--strategy", strategy)
    assert f"strategy {strategy} cannot walk this table" in line and "no primary key" in line, line
    assert whole_digest(conn, "audit_log") == before and relations(conn) == rels
    assert gc_run_count(conn) == 0


# --- what garbage is: a renamed column, a filter, a retention -----------------------------------


def test_renamed_processed_column_via_the_cli(conn, dsn):
    conn.execute("CREATE TABLE jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text NOT NULL,"
                 " handled_at timestamptz, processed_at_note text)")
    conn.execute("INSERT INTO jobs (kind, handled_at, processed_at_note) SELECT 'k' || g % 4,"
                 " CASE WHEN g % 97 = 0 THEN now() END, 'n' || g FROM generate_series(1, 5000) g")
    conn.execute("CREATE INDEX jobs_garbage ON jobs (id) WHERE handled_at IS NOT NULL")
    conn.execute("ANALYZE jobs")
    expected = Expected.take(conn, "jobs", "handled_at IS NOT NULL")
    result = gc_json(dsn, "--table", "public.jobs", "--processed-column", "handled_at", "--batch-size", "9")
    assert result["strategy"] == "index" and "jobs_garbage" in result["reason"], result["reason"]
    expected.check(conn, [result["messages_deleted"]], [result["status"]])


def flag_table(conn: Conn) -> None:
    """A boolean processed column: true (garbage), false (seen, not processed) and NULL rows."""
    conn.execute("CREATE TABLE flagged (id bigint PRIMARY KEY, body text NOT NULL, processed boolean)")
    conn.execute("INSERT INTO flagged SELECT g, 'b' || g, CASE g % 3 WHEN 0 THEN true WHEN 1 THEN false END"
                 " FROM generate_series(1, 3000) g")
    conn.execute("ANALYZE flagged")


@pytest.mark.parametrize("strategy", ["auto", "index", "key", "physical"])
def test_a_boolean_processed_column_deletes_only_its_true_rows(conn, dsn, strategy):
    """``IS NOT NULL`` on a boolean would take the ``false`` rows too: garbage is ``IS TRUE``."""
    flag_table(conn)
    conn.execute("CREATE INDEX flagged_garbage ON flagged (id) WHERE processed IS NOT NULL")
    expected = Expected.take(conn, "flagged", "processed IS TRUE")
    result = gc_json(dsn, "--table", "flagged", "--processed-column", "processed", "--strategy", strategy,
                     "--batch-size", "100")
    expected.check(conn, [result["messages_deleted"]], [result["status"]])
    assert count(conn, "flagged", "processed IS FALSE") == 1000
    assert result["garbage"] == "processed IS TRUE"


def test_a_boolean_processed_column_never_drops_a_partition_of_false_rows(conn, dsn):
    """A leaf whose rows all read ``false`` is wholly garbage to ``IS NOT NULL``: it was dropped."""
    conn.execute("CREATE TABLE flags (id bigint, day int, processed boolean, PRIMARY KEY (id, day))"
                 " PARTITION BY RANGE (day)")
    for day in (1, 2, 3):
        conn.execute(f"CREATE TABLE flags_{day} PARTITION OF flags FOR VALUES FROM ({day}) TO ({day + 1})")
    conn.execute("INSERT INTO flags SELECT g, 1, true FROM generate_series(1, 2000) g")
    conn.execute("INSERT INTO flags SELECT g, 2, g <> 1500 FROM generate_series(1, 2000) g")
    conn.execute("INSERT INTO flags SELECT g, 3, false FROM generate_series(1, 2000) g")
    conn.execute("ANALYZE flags")
    result = gc_json(dsn, "--table", "flags", "--processed-column", "processed")
    assert (result["status"], result["messages_deleted"]) == ("complete", 3999)
    assert conn.execute("SELECT tableoid::regclass::text, processed, count(*)::int FROM flags"
                        " GROUP BY 1, 2 ORDER BY 1, 2").fetchall() == [("flags_2", False, 1),
                                                                        ("flags_3", False, 2000)]


def test_a_timestamp_processed_column_with_a_precision_or_under_a_domain_takes_a_retention(conn, dsn):
    conn.execute("CREATE DOMAIN done_time AS timestamp(3) with time zone")
    conn.execute("CREATE TABLE stamped (id bigint PRIMARY KEY, done done_time, seen date)")
    conn.execute("INSERT INTO stamped SELECT g,"
                 " CASE WHEN g % 2 = 0 THEN now() - make_interval(days => g % 20)"
                 " END, CASE WHEN g % 3 = 0 THEN current_date - g % 20 END"
                 " FROM generate_series(1, 2000) g")
    expected = Expected.take(conn, "stamped", "done IS NOT NULL AND done < now() - interval '10 days'")
    result = collect(dsn, options("stamped", processed_column="done", older_than=timedelta(days=10)))
    expected.check_results(conn, result)
    rows, dated = count(conn, "stamped"), count(conn, "stamped", "seen IS NOT NULL")
    result = collect(dsn, options("stamped", processed_column="seen"))
    assert (result.status, result.messages_deleted) == ("complete", dated)
    assert count(conn, "stamped", "seen IS NOT NULL") == 0 and count(conn, "stamped") == rows - dated


@pytest.mark.parametrize(("column_type", "shown"), [
    ("text", "text"), ("integer", "integer"), ("jsonb", "jsonb"),
    ("timestamptz[]", "timestamp with time zone[]"), ("time", "time without time zone"),
])
def test_a_processed_column_of_any_other_type_is_refused_in_one_line_pointing_to_where(
        conn, dsn, column_type, shown):
    conn.execute(f"CREATE TABLE typed (id bigint PRIMARY KEY, done {column_type})")
    conn.execute("INSERT INTO typed SELECT g, NULL FROM generate_series(1, 10) g")
    before = whole_digest(conn, "typed")
    line = refused(dsn, "--table", "typed", "--processed-column", "done")
    assert line == (f"msggc: error: --processed-column: typed.done is {shown}, not a timestamp or a date"
                    " (garbage once set) or a boolean (garbage once true): say what garbage is with --where"
                    " instead"), line
    with pytest.raises(UsageError, match="say what garbage is with --where"):  # the Python API
        collect(dsn, options("typed", processed_column="done"))
    assert whole_digest(conn, "typed") == before and gc_run_count(conn) == 0


def test_the_service_refuses_a_processed_column_of_another_type_from_its_config_file(conn, dsn, tmp_path):
    from engine.service import requests
    from engine.service.settings import load_settings

    conn.execute("CREATE TABLE typed (id bigint PRIMARY KEY, done text)")
    config = tmp_path / "msggc.toml"
    config.write_text(f'dsn = "{dsn}"\ntable = "typed"\nprocessed_column = "done"\n')
    settings = load_settings(config=str(config), run_worker=False)
    [answer] = requests.request_gc(settings, {})  # PUT /v1/services/message/gc
    assert answer.error == ("--processed-column: typed.done is text, not a timestamp or a date (garbage"
                            " once set) or a boolean (garbage once true): say what garbage is with --where"
                            " instead")
    assert gc_run_count(conn) == 0


def status_table(conn: Conn) -> None:
    """No processed column at all: a status and a read flag."""
    conn.execute("CREATE TABLE inbox_state (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                 " chat_id text NOT NULL, status text NOT NULL, is_read boolean NOT NULL)")
    conn.execute("INSERT INTO inbox_state (chat_id, status, is_read)"
                 " SELECT CASE WHEN g % 5 = 0 THEN 'vip' || g ELSE 'chat' || g END,"
                 " CASE WHEN g % 3 = 0 THEN 'new' ELSE 'read' END, g % 3 <> 0"
                 " FROM generate_series(1, 3000) g")
    conn.execute("ANALYZE inbox_state")


def test_where_alone_defines_garbage_on_a_table_without_a_processed_column(conn, dsn):
    status_table(conn)
    where = "status = 'read' AND chat_id NOT LIKE 'vip%'"
    expected = Expected.take(conn, "inbox_state", where)
    result = gc_json(dsn, "--table", "inbox_state", "--where", where, "--batch-size", "200")
    expected.check(conn, [result["messages_deleted"]], [result["status"]])


@pytest.mark.parametrize("strategy", ["auto", "index", "physical"])
def test_where_alone_with_placeholder_lookalikes_in_its_literals(conn, dsn, strategy):
    """'%' and psycopg's placeholder forms inside the filter's literals are plain text."""
    status_table(conn)
    conn.execute("UPDATE inbox_state SET chat_id = '%(cutoff)s' WHERE chat_id = 'chat1'")
    conn.execute("UPDATE inbox_state SET chat_id = '%s' WHERE chat_id = 'chat2'")
    where = ("is_read AND status = 'read' AND chat_id NOT LIKE 'vip%' AND chat_id NOT LIKE '%%x%'"
             " AND chat_id NOT IN ('%s', '%(cutoff)s', '%(run_id)s')")
    expected = Expected.take(conn, "inbox_state", where)
    result = collect(dsn, options("inbox_state", where=where, strategy=strategy, batch_size=150))
    expected.check_results(conn, result)


@pytest.mark.parametrize("strategy", ["auto", "index", "key", "physical"])
def test_where_with_the_processed_column_and_older_than(conn, dsn, strategy):
    conn.execute("CREATE TABLE messages_v2 (id bigint PRIMARY KEY, status text NOT NULL,"
                 " chat_id text NOT NULL, processed_at timestamptz)")
    conn.execute("INSERT INTO messages_v2 SELECT g, CASE WHEN g % 4 = 0 THEN 'failed' ELSE 'read' END,"
                 " 'chat' || g % 9, CASE WHEN g % 6 <> 0 THEN now() - make_interval(days => g % 61) END"
                 " FROM generate_series(1, 4000) g")
    conn.execute("ANALYZE messages_v2")
    where = "status = 'read' AND chat_id <> 'chat0'"
    garbage = f"processed_at IS NOT NULL AND processed_at < now() - interval '30 days' AND {where}"
    expected = Expected.take(conn, "messages_v2", garbage)
    result = collect(dsn, options("messages_v2", where=where, strategy=strategy, batch_size=64,
                                  older_than=timedelta(days=30)))
    expected.check_results(conn, result)


# --- hostile filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "reason"), [
    ("1=1; DROP TABLE x", "';' is not"),
    ("id IN (SELECT id FROM t)", "subqueries are not allowed"),
    ("random() < 0.5", "volatile functions are not allowed"),
    ("unknown_col = 1", 'unknown column "unknown_col"'),
    ("true) OR (1=1", "unbalanced parentheses"),
])
def test_hostile_where_is_refused_in_one_line_and_changes_nothing(conn, dsn, where, reason):
    uuid_table(conn, "events", 300, DENSE)
    conn.execute("CREATE TABLE x (id int)")
    conn.execute("CREATE TABLE t (id uuid)")
    conn.execute("INSERT INTO x VALUES (1)")
    before = {name: whole_digest(conn, name) for name in ("events", "x", "t")}
    rels = relations(conn)
    line = refused(dsn, "--table", "public.events", "--where", where)
    assert line.startswith("msggc: error: --where: ") and reason in line, line
    assert {name: whole_digest(conn, name) for name in ("events", "x", "t")} == before
    assert relations(conn) == rels
    assert gc_run_count(conn) == 0


@pytest.mark.parametrize("strategy", ["auto", "index", "key", "physical", "dry-run"])
def test_the_modulo_operator_in_where_reaches_the_server_as_one_percent(conn, dsn, strategy):
    """``n % 2`` is escaped once for psycopg (``%%``, read back as ``%``); the server-side check
    once sent it without parameters, as ``n %% 2``: ``operator does not exist: integer %% integer``."""
    conn.execute("CREATE TABLE counted_rows (id bigint PRIMARY KEY, n int NOT NULL, note text NOT NULL,"
                 " processed_at timestamptz)")
    conn.execute("INSERT INTO counted_rows SELECT g, g, CASE WHEN g % 7 = 0 THEN '50%' ELSE 'x' END,"
                 " CASE WHEN g % 5 <> 0 THEN now() END FROM generate_series(1, 3000) g")
    conn.execute("CREATE INDEX counted_rows_garbage ON counted_rows (id) WHERE processed_at IS NOT NULL")
    conn.execute("ANALYZE counted_rows")
    where = "n % 2 = 0 AND note NOT LIKE '%\\%%' ESCAPE '\\'"
    if strategy == "dry-run":
        done = run_cli("gc", "--dsn", dsn, "--table", "counted_rows", "--where", where, "--dry-run", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["garbage_estimate"] == count(
            conn, "counted_rows", "processed_at IS NOT NULL AND n % 2 = 0 AND n % 7 <> 0")
        return
    expected = Expected.take(conn, "counted_rows", f"processed_at IS NOT NULL AND {where}")
    assert expected.garbage == count(conn, "counted_rows",
                                     "processed_at IS NOT NULL AND n % 2 = 0 AND n % 7 <> 0")
    result = gc_json(dsn, "--table", "counted_rows", "--where", where, "--strategy", strategy,
                     "--batch-size", "100")
    expected.check(conn, [result["messages_deleted"]], [result["status"]])


@pytest.mark.parametrize(("where", "reason"), [
    ("n / 0 = 1", "division by zero"),
    ("status::int = 1", 'invalid input syntax for type integer: "x"'),
    ("1 / (n - n) > 0 OR status = 'x'", "division by zero"),
])
def test_a_where_that_raises_on_the_tables_rows_is_refused_in_one_line_before_any_run(
        conn, dsn, where, reason):
    conn.execute("CREATE TABLE raising (id bigint PRIMARY KEY, n int, status text, processed_at timestamptz)")
    conn.execute("INSERT INTO raising SELECT g, g, CASE WHEN g % 3 = 0 THEN 'x' ELSE '1' END, now()"
                 " FROM generate_series(1, 500) g")
    before = whole_digest(conn, "raising")
    for args in ([], ["--dry-run"]):
        line = refused(dsn, "--table", "raising", "--where", where, *args)
        assert line == f"msggc: error: --where: {reason} (on a row of raising): {where}", line
    with pytest.raises(UsageError, match=re.escape(f"--where: {reason}")):  # the API's worker: the same
        collect(dsn, options("raising", where=where))
    assert whole_digest(conn, "raising") == before and gc_run_count(conn) == 0


def wide_table(conn: Conn, bad_in_sample: bool) -> int:
    """3,500 blocks of 6 garbage rows (the planner samples 2,000 of them), every status '1' but
    one 'x', past the rows a filter is tried on before the run (10,000) and in a block the
    planner's sample reads (or not): the id of that row."""
    conn.execute("CREATE TABLE wide (id bigint PRIMARY KEY, status text NOT NULL, pad text NOT NULL,"
                 " processed_at timestamptz) WITH (fillfactor = 80)")  # room to update a row in place
    conn.execute("INSERT INTO wide SELECT g, '1', repeat('w', 1000), now() FROM generate_series(1, 21000) g")
    conn.execute("ANALYZE wide")
    (percent,) = conn.execute("SELECT 100.0 * 2000 / (pg_relation_size('wide') / 8192)").fetchone()
    sampled = "(SELECT DISTINCT (ctid::text::point)[0] FROM wide TABLESAMPLE SYSTEM ({}) REPEATABLE (7))"
    # SYSTEM keeps a block when its hash is under the percent: in at 0.9 x the planner's percent is
    # in at it, out at 1.1 x is out.
    block = (f"(ctid::text::point)[0] IN {sampled.format(float(percent) * 0.9)}" if bad_in_sample
             else f"(ctid::text::point)[0] NOT IN {sampled.format(float(percent) * 1.1)}")
    (bad, where) = conn.execute(f"SELECT id, ctid FROM wide WHERE id > 15000 AND {block} ORDER BY id LIMIT 1"
                                ).fetchone()
    conn.execute("UPDATE wide SET status = 'x' WHERE id = %s", (bad,))
    assert conn.execute("SELECT (ctid::text::point)[0] = (%s::text::point)[0] FROM wide WHERE id = %s",
                        (where, bad)).fetchone()[0], "the row stayed in its block"
    return bad


def test_a_where_that_raises_on_a_row_further_on_fails_the_run_in_one_line(conn, dsn):
    bad = wide_table(conn, bad_in_sample=False)
    done = run_cli("gc", "--dsn", dsn, "--table", "wide", "--where", "status::int = 1", "--workers", "1")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    reason = 'database error: invalid input syntax for type integer: "x"'
    assert done.stdout.startswith("failed: deleted ") and done.stdout.rstrip().endswith(f"; error: {reason}")
    [run] = conn.execute("SELECT status, error, messages_deleted FROM gc_runs").fetchall()
    assert run[:2] == ("failed", reason)
    [body] = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert body["services"][0]["message"]["gc"] == {
        "messages_deleted": run[2], "status": "failed", "errors": [{"code": 1014, "details": reason}]}
    assert count(conn, "wide") == 21000 - run[2] and count(conn, "wide", f"id = {bad}") == 1


def test_a_where_that_raises_on_a_row_the_planner_samples_is_one_line_and_no_run(conn, dsn):
    wide_table(conn, bad_in_sample=True)
    before = whole_digest(conn, "wide")
    line = refused(dsn, "--table", "wide", "--where", "status::int = 1")
    assert line == ('msggc: error: --where: invalid input syntax for type integer: "x" (on a row of wide):'
                    " status::int = 1"), line
    assert whole_digest(conn, "wide") == before and gc_run_count(conn) == 0


@pytest.mark.parametrize("bad_in_sample", [True, False], ids=["planner-reads-it", "walk-meets-it"])
def test_a_queued_run_whose_where_raises_on_a_row_closes_failed_with_one_line_and_a_1014_webhook(
        conn, dsn, httpserver, bad_in_sample):
    """The service's worker: the run was queued, so it exists from the start; it closes ``failed``
    whether the planner's sample or the walk meets the row, never as an internal error."""
    from engine.service import nodes, requests
    from engine.service.settings import ServiceSettings
    from engine.service.worker import Worker
    from tests.api_support import gc_of, posted_bodies

    wide_table(conn, bad_in_sample)
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    settings = ServiceSettings(nodes=nodes.single(dsn), callback_url=httpserver.url_for("/gc"), poll_s=0.1,
                               defaults=GcOptions(table=TableSpec(name="wide", where="status::int = 1"),
                                                  workers=1, max_seconds=60))
    requests.request_gc(settings, {})
    worker = Worker(settings)
    worker.start()
    try:
        wait_until(lambda: posted_bodies(httpserver), 60, "the failure webhook")
    finally:
        worker.close()
    details = ('--where: invalid input syntax for type integer: "x" (on a row of wide): status::int = 1'
               if bad_in_sample else 'database error: invalid input syntax for type integer: "x"')
    [(status, error, deleted)] = conn.execute(
        "SELECT status, error, messages_deleted FROM gc_runs").fetchall()
    assert (status, error) == ("failed", details)
    assert [gc_of(body) for body in posted_bodies(httpserver)] == [
        {"messages_deleted": deleted, "errors": [{"code": 1014, "details": details}], "status": "failed"}]
    assert (deleted == 0) is bad_in_sample


def test_a_run_the_server_fails_shows_its_detail_and_hint_but_never_its_context(conn, dsn):
    """An application's trigger refuses a delete with a DETAIL and a HINT: both follow msggc's line
    (summary, gc_runs, webhook); the CONTEXT (``PL/pgSQL function ... at RAISE``) does not."""
    conn.execute("CREATE TABLE held (id bigint PRIMARY KEY, processed_at timestamptz)")
    conn.execute("INSERT INTO held SELECT g, now() FROM generate_series(1, 100) g")
    conn.execute("CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN"
                 " IF OLD.id = 50 THEN RAISE EXCEPTION 'row % is on legal hold', OLD.id"
                 " USING DETAIL = 'case 1234 until 2031', HINT = 'ask legal to lift it'; END IF;"
                 " RETURN OLD; END$$")
    conn.execute("CREATE TRIGGER hold BEFORE DELETE ON held FOR EACH ROW EXECUTE FUNCTION hold()")
    done = run_cli("gc", "--dsn", dsn, "--table", "held")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = ("database error: row 50 is on legal hold\n  DETAIL: case 1234 until 2031\n"
             "  HINT: ask legal to lift it")
    first, *server_lines = error.splitlines()
    assert done.stdout.startswith("failed: ")
    assert done.stdout.rstrip().endswith("\n".join([f"; error: {first}", *server_lines])), done.stdout
    assert "CONTEXT" not in done.stdout + done.stderr
    assert conn.execute("SELECT error FROM gc_runs").fetchone()[0] == error
    [body] = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert body["services"][0]["message"]["gc"]["errors"][0]["details"] == error


def test_a_where_refused_for_a_value_of_the_table_shows_the_servers_hint(conn, dsn):
    conn.execute("CREATE TABLE dated (id bigint PRIMARY KEY, due text, processed_at timestamptz)")
    conn.execute("INSERT INTO dated VALUES (1, '2020-13-45', now())")
    done = run_cli("gc", "--dsn", dsn, "--table", "dated", "--where", "due::date < now()")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    # the hint's spelling of the setting changed in PostgreSQL 18 ("DateStyle")
    assert [line.lower() for line in done.stderr.splitlines()] == [
        'msggc: error: --where: date/time field value out of range: "2020-13-45" (on a row of dated):'
        " due::date < now()",
        '  hint: perhaps you need a different "datestyle" setting.']


# --- rows un-processed while the walk goes on -----------------------------------------------------


def ahead_of_the_walk(conn: Conn, table: str, run_id: int, strategy: str) -> str:
    """The rows past the run's committed checkpoint (slice 0)."""
    (cursor,) = conn.execute("SELECT cursor FROM gc_runs WHERE id = %s", (run_id,)).fetchone()
    position = cursor["slices"][0]["position"]
    if strategy == "physical":
        return f"ctid >= '({position},0)'::tid"
    if isinstance(position, list):
        return f"id > '{position[0]}'::{'uuid' if table == 'events' else 'bigint'}"
    return f"id > {int(position)}"


@pytest.mark.parametrize(("key", "strategy"), [("uuid", "index"), ("uuid", "physical"),
                                                ("bigint", "index"), ("bigint", "key"),
                                                ("bigint", "physical")])
def test_rows_unprocessed_ahead_of_the_walk_survive(conn, dsn, key, strategy):
    if key == "uuid":
        table = "events"
        uuid_table(conn, table, 3000, DENSE)
    else:
        table = "numbered"
        conn.execute("CREATE TABLE numbered (id bigint PRIMARY KEY, body text, processed_at timestamptz)")
        conn.execute("INSERT INTO numbered SELECT g * 7, md5(g::text), CASE WHEN g % 5 <> 0 THEN now() END"
                     " FROM generate_series(1, 3000) g")
        conn.execute("ANALYZE numbered")
    expected = Expected.take(conn, table, PROCESSED)
    unprocessed: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as app:

        def unprocess(progress: Progress) -> None:
            if progress.batches > 3:
                return
            ahead = ahead_of_the_walk(app, table, progress.run_id, strategy)
            order = sql.SQL("ctid" if strategy == "physical" else "id")
            rows = app.execute(sql.SQL(
                "UPDATE {t} SET processed_at = NULL WHERE ctid = ANY(ARRAY("
                "SELECT ctid FROM {t} WHERE processed_at IS NOT NULL AND {ahead} ORDER BY {order} LIMIT 4))"
                " RETURNING id::text").format(t=sql.Identifier(table), ahead=sql.SQL(ahead), order=order)
            ).fetchall()
            assert len(rows) == 4
            unprocessed.extend(row[0] for row in rows)

        result = collect(dsn, options(table, strategy=strategy, batch_size=100), on_progress=unprocess)
    assert result.status == "complete", result.error
    assert len(unprocessed) == 12
    kept = f"id::text = ANY('{{{','.join(unprocessed)}}}'::text[])"
    assert count(conn, table, kept) == 12  # un-processed: they survive
    assert count(conn, table, PROCESSED) == 0
    assert count(conn, table) == expected.rows - expected.garbage + 12
    assert rows_digest(conn, table, f"NOT ({kept})") == expected.survivors  # the others are untouched
    assert result.messages_deleted == counted(conn) == expected.garbage - 12


def gc_waits_on(conn: Conn, pid: int) -> bool:
    return conn.execute(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND %s = ANY(pg_blocking_pids(pid))", (APPLICATION_NAME, pid)
    ).fetchone()[0]


@pytest.mark.parametrize("strategy", ["index", "physical"])
def test_a_row_unprocessed_while_the_delete_waits_on_it_survives(conn, dsn, strategy):
    uuid_table(conn, "events", 1500, "true")
    victim = conn.execute("SELECT id FROM events ORDER BY id OFFSET 700 LIMIT 1").fetchone()[0]
    outcome: dict[str, GcResult] = {}
    with psycopg.connect(dsn) as app:
        app.execute("UPDATE events SET processed_at = NULL WHERE id = %s", (victim,))
        gc = threading.Thread(target=lambda: outcome.update(result=collect(
            dsn, options("events", strategy=strategy, batch_size=100, lock_timeout_ms=10_000))))
        gc.start()
        wait_until(lambda: gc_waits_on(conn, app.info.backend_pid) or not gc.is_alive(), 15,
                   "the GC to wait on the app's row lock")
        app.commit()
        gc.join(30)
    result = outcome["result"]
    assert result.status == "complete", result.error
    assert [row[0] for row in conn.execute("SELECT id FROM events")] == [victim]
    assert result.messages_deleted == counted(conn) == 1499


# --- a non-unique --key --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["who", "n"])
def test_a_non_unique_key_is_refused_before_anything_changes(conn, dsn, key):
    """A keyset walk resumes strictly after the last key it reached: rows sharing a key value beyond
    a batch's limit would be skipped while the run says complete. Such a --key is refused."""
    conn.execute("CREATE TABLE shared (who text NOT NULL, n bigint NOT NULL, processed_at timestamptz)")
    conn.execute("INSERT INTO shared SELECT 'u' || g % 10, g % 10, now() FROM generate_series(1, 1000) g")
    conn.execute("INSERT INTO shared SELECT 'u' || g % 10, g % 10, NULL FROM generate_series(1, 100) g")
    conn.execute(f"CREATE INDEX ON shared ({key})")
    with pytest.raises(UsageError, match=rf"--key: \({key}\) is not unique in public.shared"):
        collect(dsn, options("shared", key=(key,), strategy="index", batch_size=30))
    assert count(conn, "shared") == 1100 and gc_run_count(conn) == 0


@pytest.mark.parametrize("key", [("at",), ("seq",), ("id", "seq")])
def test_a_stopped_walk_then_another_key(conn, dsn, key):
    """A run stopped on its budget while walking the uuid key; the next run names another key:
    it must walk that key (or refuse up front), never replay a uuid position against it."""
    conn.execute("CREATE TABLE keyed (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                 " seq bigint UNIQUE NOT NULL, at timestamptz UNIQUE NOT NULL, processed_at timestamptz)")
    conn.execute("CREATE UNIQUE INDEX ON keyed (id, seq)")
    conn.execute("INSERT INTO keyed (seq, at, processed_at) SELECT g, now() - make_interval(secs => g),"
                 " CASE WHEN g % 2 = 0 THEN now() END FROM generate_series(1, 1000) g")
    conn.execute("ANALYZE keyed")
    expected = Expected.take(conn, "keyed", PROCESSED)
    first = collect(dsn, options("keyed", strategy="index", batch_size=50, max_rows=100))
    assert first.status == "stopped"
    try:
        second = collect(dsn, options("keyed", key=key, strategy="auto", batch_size=50))
    except UsageError:
        assert count(conn, "keyed") == expected.rows - first.messages_deleted
        assert gc_run_count(conn) == 1
        return
    expected.check_results(conn, first, second)


# --- the property ---------------------------------------------------------------------------------

KEY_TYPES = {
    "bigint": "id bigint PRIMARY KEY",
    "uuid": "id uuid PRIMARY KEY",
    "text": "id text PRIMARY KEY",
    "composite": "tenant int NOT NULL, id text NOT NULL, PRIMARY KEY (tenant, id)",
}
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)


@st.composite
def tables(draw: st.DrawFn) -> tuple[str, list[tuple[Any, ...]], list[bool]]:
    kind = draw(st.sampled_from(sorted(KEY_TYPES)))
    keys: st.SearchStrategy[Any] = {
        "bigint": st.integers(-(2**63), 2**63 - 1),
        "uuid": st.uuids(),
        "text": TEXT,
        "composite": st.tuples(st.integers(-2, 2), TEXT),
    }[kind]
    rows = draw(st.lists(st.tuples(keys, st.booleans()), min_size=2, max_size=150, unique_by=lambda r: r[0]))
    return kind, [r[0] if isinstance(r[0], tuple) else (r[0],) for r in rows], [r[1] for r in rows]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables(), strategy=st.sampled_from(["auto", "physical", "index", "key"]),
       batch_size=st.none() | st.integers(1, 40), workers=st.integers(1, 2), partial_index=st.booleans(),
       max_rows=st.none() | st.integers(1, 60))
def test_exactly_the_garbage_rows_are_deleted(conn, dsn, table, strategy: StrategyName, batch_size, workers,
                                              partial_index, max_rows):
    kind, keys, garbage = table
    conn.execute("DROP TABLE IF EXISTS prop")
    conn.execute("TRUNCATE gc_sweep, gc_outbox, gc_runs CASCADE")
    conn.execute(f"CREATE TABLE prop ({KEY_TYPES[kind]}, body text, processed_at timestamptz)")
    key_columns = "tenant, id" if kind == "composite" else "id"
    with conn.cursor() as cur:
        placeholders = ", ".join(["%s"] * len(keys[0]))
        cur.executemany(f"INSERT INTO prop ({key_columns}, body, processed_at) VALUES"
                        f" ({placeholders}, md5(random()::text), CASE WHEN %s THEN now() END)",
                        [(*key, flag) for key, flag in zip(keys, garbage, strict=True)])
    if partial_index:
        conn.execute(f"CREATE INDEX ON prop ({key_columns}) WHERE processed_at IS NOT NULL")
    conn.execute("ANALYZE prop")
    survivors = rows_digest(conn, "prop", "processed_at IS NULL")
    gone = sum(garbage)
    gc = options("prop", strategy=strategy, batch_size=batch_size, workers=workers, max_rows=max_rows)
    if strategy == "key" and kind != "bigint":
        with pytest.raises(UsageError, match="strategy key cannot walk this table"):
            collect(dsn, gc)
        assert count(conn, "prop") == len(keys) and gc_run_count(conn) == 0
        return
    results = []
    for _ in range(len(keys) + 2):
        results.append(collect(dsn, gc))
        if results[-1].status != "stopped":
            break
    assert results[-1].status == "complete", results[-1].error
    assert count(conn, "prop") == len(keys) - gone
    assert rows_digest(conn, "prop") == survivors
    assert sum(r.messages_deleted for r in results) == counted(conn) == gone


@pytest.mark.parametrize("key", ["id uuid PRIMARY KEY", "tenant int, id uuid, PRIMARY KEY (tenant, id)"])
def test_a_garbage_row_the_app_updates_while_the_walk_waits_on_it_is_still_collected(conn, dsn, key):
    """The application updates another column of a garbage row (a new row version, elsewhere in
    the heap) while the ordered-key walk waits for its lock: the walk must still delete it, not
    pass its key by and say complete."""
    conn.execute(f"CREATE TABLE keyed ({key}, note text, processed_at timestamptz)")
    columns = "tenant, id, note, processed_at" if "tenant" in key else "id, note, processed_at"
    values = "1, gen_random_uuid(), 'n', now()" if "tenant" in key else "gen_random_uuid(), 'n', now()"
    conn.execute(f"INSERT INTO keyed ({columns}) SELECT {values} FROM generate_series(1, 200)")
    victim = conn.execute("SELECT id FROM keyed ORDER BY id OFFSET 50 LIMIT 1").fetchone()[0]
    app = psycopg.connect(dsn)
    app.execute("UPDATE keyed SET note = repeat('x', 500) WHERE id = %s", (victim,))
    done: list[Any] = []
    gc = threading.Thread(target=lambda: done.append(collect(dsn, options(
        "keyed", strategy="index", batch_size=1000, lock_timeout_ms=10_000))))
    gc.start()
    wait_until(lambda: conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'msggc' AND wait_event_type = 'Lock'"
    ).fetchone(), what="the walk to wait on the application's row lock")
    app.commit()
    app.close()
    gc.join(30)
    assert done and done[0].status == "complete"
    assert count(conn, "keyed") == 0, "the updated garbage row was passed by"


def test_garbage_rows_the_app_moves_past_the_planned_heap_end_are_still_collected(conn, dsn):
    """The application updates garbage rows the heap walk has not reached: their new versions go
    to blocks appended after the walk was planned. The walk must go on into them."""
    conn.execute("CREATE TABLE heap (id bigint PRIMARY KEY, processed_at timestamptz, note text)")
    conn.execute("INSERT INTO heap SELECT g, now(), 'n' FROM generate_series(1, 20000) g")
    conn.execute("VACUUM ANALYZE heap")
    planned_blocks = conn.execute("SELECT pg_relation_size('heap') / 8192").fetchone()[0]
    moved: list[int] = []

    def application(progress: Progress) -> None:
        if not moved:
            conn.execute("UPDATE heap SET note = repeat('x', 2000) WHERE id BETWEEN 15000 AND 15100")
            moved.append(conn.execute("SELECT max((ctid::text::point)[0])::int FROM heap"
                                      " WHERE id BETWEEN 15000 AND 15100").fetchone()[0])

    result = collect(dsn, options("heap", strategy="physical", batch_size=500), on_progress=application)
    assert moved and moved[0] >= planned_blocks  # the test moved rows past the planned end
    assert result.status == "complete" and count(conn, "heap") == 0
    assert result.messages_deleted == 20000
