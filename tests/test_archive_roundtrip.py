"""The round-trip property of every archive (issue 21, the proof): rows deleted by ``gc
--archive-to`` (gzip, zstd, parquet) or ``gc --archive`` and put back by ``restore --file`` (twice)
or ``restore --run`` are the rows deleted, each once, with the same values, over the column types
applications use: text of any content, numeric and float specials, bytea, json/jsonb, arrays, uuid,
timestamps, interval, an enum, and identity and generated columns; on a plain table and on a
partitioned one. The table has no key, so nothing but msggc's own record of what it restored can
keep a row from coming back twice.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import archive, collect
from engine.archive_restore import restore as restore_file
from engine.config import GcOptions, TableSpec

TABLE = TableSpec(name="rt")
LABELS = ("sad", "ok", "NULL", "happy, really", 'say "hi"')
TRICKY = ["NULL", "NA", "N/A", "n/a", "null", "nan", "NaN", "-nan", "#N/A", "", " ", "\\N", "\\.", '"',
          "'", ",", "a,b", "x\ny", "\r\n", "\\", "tab\there", "é ü 漢字 🙂"]
COLUMNS = {  # name: (type, how a parameter becomes it)
    "t": ("text", "%s::text"),
    "n": ("numeric", "%s::numeric"),
    "f": ("double precision", "%s::float8"),
    "r": ("real", "%s::real"),
    "i2": ("smallint", "%s::smallint"),
    "i4": ("integer", "%s::integer"),
    "b": ("boolean", "%s::boolean"),
    "d": ("date", "%s::date"),
    "by": ("bytea", "%s::bytea"),
    "j": ("json", "%s::json"),
    "jb": ("jsonb", "%s::jsonb"),
    "ta": ("text[]", "%s::text[]"),
    "ia": ("integer[]", "%s::integer[]"),
    "u": ("uuid", "%s::uuid"),
    "ts": ("timestamptz", "%s::timestamptz"),
    "tsl": ("timestamp", "%s::timestamp"),
    "iv": ("interval", "%s::interval"),
    "m": ("mood", "%s::mood"),
}
ENUM = f"CREATE TYPE mood AS ENUM ({', '.join(chr(39) + label + chr(39) for label in LABELS)})"
BODY = (", ".join(f"{name} {type_}" for name, (type_, _) in COLUMNS.items())
        + ", g text GENERATED ALWAYS AS (t || '!' || coalesce(i4, 0)) STORED, processed_at timestamptz")
SHAPES = {
    # an identity column the table numbers itself
    "plain": (f"CREATE TABLE rt (id bigint GENERATED ALWAYS AS IDENTITY, {BODY})", ""),
    # two hash leaves (identity columns on partitioned tables need PostgreSQL 17): the archive is
    # the parent's, restore goes through the parent
    "partitioned": (f"CREATE TABLE rt (id bigint NOT NULL, {BODY}) PARTITION BY HASH (id);"
                    " CREATE TABLE rt_0 PARTITION OF rt FOR VALUES WITH (MODULUS 2, REMAINDER 0);"
                    " CREATE TABLE rt_1 PARTITION OF rt FOR VALUES WITH (MODULUS 2, REMAINDER 1)", "id, "),
}

characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # no NUL in text
text = st.one_of(st.sampled_from(TRICKY), st.text(characters, max_size=20))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)
numeric = st.one_of(st.sampled_from(["NaN", "Infinity", "-Infinity", "0", "-0.000"]),
                    st.builds(lambda digits, scale: str(Decimal(digits).scaleb(-scale)),
                              st.integers(-10**40, 10**40), st.integers(0, 30)))
interval = st.builds(lambda months, days, micros: f"{months} mons {days} days {micros} microseconds",
                     st.integers(-10**4, 10**4), st.integers(-10**5, 10**5), st.integers(-10**14, 10**14))
VALUES = {
    "t": text,
    "n": numeric,
    "f": st.floats(),
    "r": st.floats(width=32),
    "i2": st.integers(-2**15, 2**15 - 1),
    "i4": st.integers(-2**31, 2**31 - 1),
    "b": st.booleans(),
    "d": st.dates(),
    "by": st.binary(max_size=16),
    "j": json_values.map(lambda value: json.dumps(value, ensure_ascii=False)),
    "jb": json_values.map(json.dumps),
    "ta": st.lists(st.none() | text, max_size=4),
    "ia": st.lists(st.none() | st.integers(-2**31, 2**31 - 1), max_size=4),
    "u": st.uuids(),
    "ts": st.datetimes(timezones=st.just(UTC)),
    "tsl": st.datetimes(),
    "iv": interval,
    "m": st.sampled_from(LABELS),
}
row = st.tuples(*(st.none() | values for values in VALUES.values()), st.booleans())
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def rows_text(conn) -> list[str]:
    """Every row as PostgreSQL's text of it, sorted: equal lists, equal rows, each as often."""
    return [line for (line,) in conn.execute("SELECT whole_row::text FROM rt whole_row ORDER BY 1")]


def fresh_table(conn, shape: str, rows: list[tuple]) -> None:
    conn.execute("DROP TABLE IF EXISTS rt, rt_archive; DROP TYPE IF EXISTS mood; DELETE FROM gc_restored")
    create, id_column = SHAPES[shape]
    conn.execute(f"{ENUM}; {create}")
    casts = ", ".join(cast for _, cast in COLUMNS.values())
    insert = (f"INSERT INTO rt ({id_column}{', '.join(COLUMNS)}, processed_at)"
              f" VALUES ({'%s, ' if id_column else ''}{casts}, CASE WHEN %s THEN now() END)")
    with conn.cursor() as cursor:
        cursor.executemany(insert, [(n, *values) if id_column else values for n, values in enumerate(rows)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["gzip", "zstd", "parquet", "table"])
@PROPERTY
@given(rows=st.lists(row, min_size=1, max_size=12))
def test_every_archive_gives_back_exactly_the_rows_it_took_once(conn, dsn, fmt, shape, rows):
    fresh_table(conn, shape, rows)
    before = rows_text(conn)
    garbage = sum(1 for values in rows if values[-1])
    oid = conn.execute("SELECT 'rt'::regclass::oid").fetchone()[0]
    with tempfile.TemporaryDirectory() as directory:
        if fmt == "table":
            archive.create_archive(conn, TABLE)
            result = collect(dsn, GcOptions(table=TABLE, archive=True, batch_size=3))
        else:
            path = Path(directory) / "gone"
            result = collect(dsn, GcOptions(table=TABLE, archive_to=str(path), archive_format=fmt,
                                            batch_size=3))
        assert result.status == "complete", result.error
        assert result.messages_deleted == garbage
        assert len(rows_text(conn)) == len(rows) - garbage

        if fmt == "table":
            back = archive.restore(conn, TABLE, oid, result.run_id, ())
            assert back == archive.Restored(garbage, 0)
        else:
            assert restore_file(conn, TABLE, oid, path).restored == garbage
            assert restore_file(conn, TABLE, oid, path).restored == 0  # again: nothing twice
    assert rows_text(conn) == before
