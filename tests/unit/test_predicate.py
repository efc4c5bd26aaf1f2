"""``--where``: the filter is parsed by PostgreSQL's own parser (pglast) and refused unless it is one
expression made of allowed nodes; what runs is pglast's rendering of the validated tree. No database."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from engine.errors import UsageError
from engine.predicate import Filter, parse_filter

COLUMNS = ("id", "message_id", "chat_id", "direction", "status", "payload", "created_at", "processed_at")


def _tree(sql: str):
    return parse_sql(f"SELECT FROM t WHERE {sql}")[0].stmt.whereClause


@pytest.mark.parametrize(("text", "columns", "functions"), [
    ("status = 'read' AND chat_id NOT LIKE 'vip%'", {"status", "chat_id"}, set()),
    ("processed_at < now() - interval '30 days'", {"processed_at"}, {"now"}),
    ("direction IN (1, 2)", {"direction"}, set()),
    ("coalesce(status, 0) = 2", {"status"}, set()),
    ("lower(chat_id) = 'x'", {"chat_id"}, {"lower"}),
    ("status BETWEEN 1 AND 3 OR status IS NULL", {"status"}, set()),
    ("chat_id IS DISTINCT FROM 'a' AND NOT (payload ILIKE '%x%')", {"chat_id", "payload"}, set()),
    ("CASE WHEN direction = 1 THEN status ELSE 0 END = 2", {"direction", "status"}, set()),
    ("greatest(created_at, processed_at) < CURRENT_DATE", {"created_at", "processed_at"}, set()),
    ("nullif(status, 0) IS NOT NULL AND (status > 1) IS NOT TRUE", {"status"}, set()),
    ("direction = ANY (ARRAY[1, 2]) AND status::int8 > 0", {"direction", "status"}, set()),
    ("Pg_Catalog.Upper(chat_id) = 'X'", {"chat_id"}, {"pg_catalog.upper"}),
    ("processed_at < now() - make_interval(days => 30)", {"processed_at"}, {"now", "make_interval"}),
])
def test_accepted_filters_record_their_columns_and_functions(text, columns, functions):
    flt = parse_filter(text, COLUMNS)
    assert flt == Filter(text=text, sql=flt.sql, columns=frozenset(columns), functions=frozenset(functions))
    assert flt.sql.startswith("(") and flt.sql.endswith(")")


@pytest.mark.parametrize("text", [
    "status = 'read' AND chat_id NOT LIKE 'vip%'",
    "processed_at < now() - interval '30 days'",
    "direction IN (1, 2) OR NOT (status = 1 AND payload LIKE 'a;b--c')",
    "(status = 1 OR status = 2) AND direction = 1",
    "- status < 1 AND status + 1 * 2 = 3 AND (status + 1) * 2 = 6",
    "status = 1 IS NOT FALSE",
    "chat_id || 'x' LIKE 'a%' ESCAPE '!'",
    "chat_id SIMILAR TO 'a%'",
    "payload = E'tab\\there' OR payload = 'it''s'",
    "extract(epoch FROM processed_at) > 0 AND processed_at AT TIME ZONE 'UTC' > '2024-01-01'",
])
def test_sql_is_pglasts_rendering_and_round_trips(text):
    flt = parse_filter(text, COLUMNS)
    assert _tree(flt.sql) == _tree(text)
    again = parse_filter(flt.sql, COLUMNS)
    assert again.sql == flt.sql
    assert (again.columns, again.functions) == (flt.columns, flt.functions)


@pytest.mark.parametrize(("text", "message"), [
    ("1=1; DROP TABLE x", "--where: only one expression is allowed, ';' is not: 1=1; DROP TABLE x"),
    ("true;", "';' is not"),
    ("id IN (SELECT id FROM messages)", "--where: subqueries are not allowed: (SELECT id FROM messages)"),
    ("EXISTS (SELECT 1)", "--where: subqueries are not allowed: (SELECT 1)"),
    ("status = ANY (SELECT 1)", "subqueries are not allowed"),
    ("unknown_col = 1", '--where: unknown column "unknown_col"'),
    ("m.id = 1", "--where: only the table's own columns, unqualified, are allowed: m.id"),
    ("messages.* IS NULL", "'*' is not allowed: messages.*"),
    ("$1 = 1", "--where: parameters are not allowed: $1"),
    ("true) UNION SELECT (1", "--where: unbalanced parentheses: true) UNION SELECT (1"),
    ("true UNION SELECT 1", "not UNION/INTERSECT/EXCEPT"),
    ("true GROUP BY 1", "not GROUP BY"),
    ("true ORDER BY 1 LIMIT 1", "only an expression is allowed"),
    ("true FOR UPDATE", "not FOR UPDATE/SHARE"),
    ("", "--where: the filter is empty"),
    ("  \n", "--where: the filter is empty"),
    ("count(*) > 1", "--where: aggregates and window functions are not allowed: count(*)"),
    ("pg_catalog.max(id) > 1", "aggregates and window functions are not allowed"),
    ("row_number() OVER () > 1", "aggregates and window functions are not allowed"),
    ("true --", "--where: comments are not allowed: --"),
    ("true /* ; DROP TABLE x */", "comments are not allowed: /* ; DROP TABLE x */"),
    ("true --\n OR false", "comments are not allowed"),
    ("status = ", "--where: syntax error"),
    ("status = 'unterminated", "--where: syntax error"),
    ("(status, direction) = (1, 2)", "a row constructor is not allowed"),
    ("id OPERATOR(pg_catalog.=) 1", "qualified operators are not allowed"),
    ("a.b.c(id) = 1", "function names may have a schema, nothing more"),
    ("chat_id COLLATE \"C\" = 'a'", "COLLATE is not allowed"),
    ("NOT " * 5000 + "true", "nested too deeply"),
])
def test_hostile_or_unsupported_filters_are_refused_with_one_line(text, message):
    with pytest.raises(UsageError) as info:
        parse_filter(text, COLUMNS)
    assert message in str(info.value)
    assert str(info.value).startswith("--where: ")
    assert "\n" not in str(info.value)


def test_column_names_are_matched_as_the_parser_folds_them():
    assert parse_filter("STATUS = 1", COLUMNS).columns == {"status"}
    with pytest.raises(UsageError, match='unknown column "Status"'):
        parse_filter('"Status" = 1', COLUMNS)
    assert parse_filter('"Status" = 1', ["Status"]).columns == {"Status"}


def test_the_text_is_kept_as_given():
    text = "  status   =  1  "
    flt = parse_filter(text, COLUMNS)
    assert flt.text == text
    assert flt.sql == "(status = 1)"
