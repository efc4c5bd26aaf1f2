"""``--where`` against a real server: check_volatility asks pg_proc about the functions a filter
calls, and the sql of an accepted filter runs as a WHERE clause on ``messages``."""

from __future__ import annotations

import re

import pytest

from engine.errors import UsageError
from engine.predicate import check_volatility, parse_filter


@pytest.fixture
def columns(conn):
    rows = conn.execute("SELECT column_name FROM information_schema.columns"
                        " WHERE table_schema = 'public' AND table_name = 'messages'").fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize(("text", "message"), [
    ("random() < 0.5", "--where: volatile functions are not allowed: random()"),
    ("pg_sleep(1) IS NULL", "volatile functions are not allowed"),
    ("set_config('a.b', 'c', false) = 'c'", "volatile functions are not allowed"),
    ("clock_timestamp() > processed_at", "volatile functions are not allowed"),
    ("nextval('x') > id", "volatile functions are not allowed"),
    ("pg_catalog.random() < 0.5", "volatile functions are not allowed: pg_catalog.random()"),
    ("no_such_function(id) = 1", "--where: unknown function: no_such_function()"),
    ("public.lower(chat_id) = 'x'", "--where: unknown function: public.lower()"),
])
def test_volatile_or_unknown_functions_are_refused(conn, columns, text, message):
    flt = parse_filter(text, columns)
    with pytest.raises(UsageError) as info:
        check_volatility(conn, flt)
    assert message in str(info.value)


def test_an_aggregate_the_parser_does_not_know_is_refused_by_its_kind(conn, columns):
    conn.execute("CREATE AGGREGATE my_total (bigint) (SFUNC = int8pl, STYPE = bigint)")
    with pytest.raises(UsageError, match="aggregates, window functions and procedures are not allowed"):
        check_volatility(conn, parse_filter("my_total(id) > 1", columns))


def test_a_volatile_lookalike_in_the_search_path_is_refused(conn, columns):
    conn.execute("CREATE FUNCTION public.lower(text) RETURNS text VOLATILE LANGUAGE sql AS 'SELECT $1'")
    with pytest.raises(UsageError, match=r"volatile functions are not allowed: lower\(\)"):
        check_volatility(conn, parse_filter("lower(chat_id) = 'x'", columns))
    check_volatility(conn, parse_filter("pg_catalog.lower(chat_id) = 'x'", columns))


@pytest.mark.parametrize("text", [
    "now() > processed_at",
    "lower(chat_id) = 'x'",
    "processed_at < now() - interval '30 days' AND direction IN (1, 2)",
    "coalesce(status, 0) = 2 AND chat_id NOT LIKE 'vip%'",
    "processed_at AT TIME ZONE 'UTC' < CURRENT_TIMESTAMP AND extract(epoch FROM created_at) > 0",
    "greatest(created_at, processed_at) < CURRENT_DATE OR processed_at IS NULL",
])
def test_accepted_filters_run_as_a_where_clause(conn, columns, text):
    conn.execute("INSERT INTO messages (message_id, chat_id, direction, status, payload, processed_at)"
                 " VALUES ('m1', 'x', 1, 2, 'p', now() - interval '40 days')")
    flt = parse_filter(text, columns)
    check_volatility(conn, flt)
    row = conn.execute(f"SELECT count(*) FROM messages WHERE {flt.sql}").fetchone()
    assert row is not None and row[0] in (0, 1)


@pytest.mark.parametrize(("text", "message"), [
    ("status", "argument of WHERE must be type boolean, not type smallint"),
    ("chat_id = 1", "operator does not exist: text = integer"),
    ("lower(chat_id, 3) = 'x'", "function lower(text, integer) does not exist"),
])
def test_a_filter_the_server_cannot_plan_is_refused_before_any_run(conn, dsn, text, message):
    from engine.config import TableSpec
    from engine.target import resolve

    with pytest.raises(UsageError, match=re.escape(f"--where: {message}: {text}")):
        resolve(conn, TableSpec(where=text))
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


@pytest.mark.parametrize("text", ["generate_series(1, 2) > 0", "unnest(ARRAY[id]) = 1",
                                  "jsonb_array_elements_text('[1]') = chat_id",
                                  "pg_catalog.regexp_matches(chat_id, 'x') IS NOT NULL"])
def test_set_returning_functions_are_refused_before_any_run(conn, dsn, text):
    """A WHERE clause cannot hold one: the server said so only at run time, in a traceback."""
    from engine.config import TableSpec
    from engine.target import resolve
    from tests.faults.helpers import one_line_error
    from tests.support import run_cli

    refusal = f"--where: set-returning functions are not allowed: {text.partition('(')[0]}()"
    with pytest.raises(UsageError, match=re.escape(refusal)):
        resolve(conn, TableSpec(where=text))
    done = run_cli("gc", "--dsn", dsn, "--where", text)
    assert done.returncode == 2
    assert one_line_error(done.stderr) == f"msggc: error: {refusal}"
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


def test_a_filter_the_server_cannot_plan_is_refused_with_the_servers_hint(conn):
    """The HINT of an operator that does not exist (add casts) helps who writes the filter."""
    from engine.config import TableSpec
    from engine.target import resolve

    with pytest.raises(UsageError) as info:
        resolve(conn, TableSpec(where="chat_id = 1"))
    assert str(info.value) == ("--where: operator does not exist: text = integer: chat_id = 1\n"
                               "  HINT: No operator matches the given name and argument types. You might need"
                               " to add explicit type casts.")
