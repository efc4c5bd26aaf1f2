"""What a swap carries beyond the basics (tests/test_compact.py compares those): the comments of
indexes, constraints, triggers and policies; TOAST options; the tablespaces of the table and of
its indexes and its access method; the CLUSTER mark; statistics targets of index columns; column
options; extended statistics (names, targets, comments); the identity sequence's grants and
comment. Each compared in the catalog before and after."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from engine import collect
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.compact_app import CATALOG, leftovers, make_inbox

Conn = psycopg.Connection[Any]

EXTRAS = """
COMMENT ON INDEX inbox_lower IS 'by lower text';
COMMENT ON INDEX inbox_pkey IS 'the key';
COMMENT ON CONSTRAINT inbox_msg_key ON inbox IS 'one text once';
COMMENT ON CONSTRAINT inbox_code_fkey ON inbox IS 'a known code';
COMMENT ON TRIGGER audit ON inbox IS 'audited';
COMMENT ON POLICY recent ON inbox IS 'recent ones';
ALTER TABLE inbox SET (toast.autovacuum_enabled = false, toast.vacuum_truncate = false);
ALTER TABLE inbox CLUSTER ON inbox_lower;
ALTER INDEX inbox_lower ALTER COLUMN 1 SET STATISTICS 222;
ALTER TABLE inbox ALTER COLUMN code SET (n_distinct = 2);
CREATE STATISTICS inbox_stats (ndistinct) ON code, n FROM inbox;
ALTER STATISTICS inbox_stats SET STATISTICS 55;
COMMENT ON STATISTICS inbox_stats IS 'codes by n';
GRANT SELECT, USAGE ON SEQUENCE inbox_id_seq TO PUBLIC;
COMMENT ON SEQUENCE inbox_id_seq IS 'the ids';
CREATE ACCESS METHOD heap_too TYPE TABLE HANDLER heap_tableam_handler;
ALTER TABLE inbox SET ACCESS METHOD heap_too;
"""

CARRIED = """
SELECT jsonb_build_object(
 'indexes', (SELECT jsonb_agg(jsonb_build_array(ic.relname, obj_description(ic.oid, 'pg_class'),
    coalesce(ts.spcname, ''), x.indisclustered,
    (SELECT jsonb_agg(jsonb_build_array(a.attnum, a.attstattarget)) FROM pg_attribute a
     WHERE a.attrelid = ic.oid AND coalesce(a.attstattarget, -1) >= 0)) ORDER BY ic.relname)
    FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
    LEFT JOIN pg_tablespace ts ON ts.oid = ic.reltablespace WHERE x.indrelid = 'inbox'::regclass),
 'constraints', (SELECT jsonb_object_agg(conname, obj_description(oid, 'pg_constraint'))
    FROM pg_constraint WHERE conrelid = 'inbox'::regclass),
 'triggers', (SELECT jsonb_object_agg(tgname, obj_description(oid, 'pg_trigger'))
    FROM pg_trigger WHERE tgrelid = 'inbox'::regclass AND NOT tgisinternal),
 'policies', (SELECT jsonb_object_agg(polname, obj_description(oid, 'pg_policy'))
    FROM pg_policy WHERE polrelid = 'inbox'::regclass),
 'table', (SELECT jsonb_build_array(coalesce(ts.spcname, ''),
    (SELECT reloptions FROM pg_class t WHERE t.oid = c.reltoastrelid),
    (SELECT amname FROM pg_am WHERE oid = c.relam)) FROM pg_class c
    LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace WHERE c.oid = 'inbox'::regclass),
 'sequence', (SELECT jsonb_build_array(relacl::text, obj_description(oid, 'pg_class')) FROM pg_class
    WHERE oid = pg_get_serial_sequence('inbox', 'id')::regclass),
 'column_options', (SELECT jsonb_agg(jsonb_build_array(attname, o) ORDER BY attnum, o)
    FROM pg_attribute, unnest(attoptions) o
    WHERE attrelid = 'inbox'::regclass AND o LIKE 'n_distinct%'),
 'statistics', (SELECT jsonb_agg(jsonb_build_array(stxname, stxnamespace::regnamespace::text,
    pg_get_statisticsobjdef_columns(oid), stxstattarget, obj_description(oid, 'pg_statistic_ext')))
    FROM pg_statistic_ext WHERE stxrelid = 'inbox'::regclass))
"""


@pytest.fixture
def tablespace(conn: Conn) -> Iterator[str]:
    """A tablespace of this test's own, inside the server's data directory (PostgreSQL 15's
    ``allow_in_place_tablespaces``), emptied and dropped after the test."""
    name = f"ts_{conn.info.dbname}"
    conn.execute("SET allow_in_place_tablespaces = true")
    conn.execute(sql.SQL("CREATE TABLESPACE {} LOCATION ''").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute(sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(name)))
        conn.execute("DROP ACCESS METHOD IF EXISTS heap_too")


def test_a_swap_carries_comments_toast_options_tablespaces_cluster_mark_and_statistics(
        conn: Conn, dsn: str, tablespace: str) -> None:
    live = make_inbox(conn, 3000, 3)
    conn.execute(EXTRAS)
    ts = sql.Identifier(tablespace)
    conn.execute(sql.SQL("ALTER TABLE inbox SET TABLESPACE {}").format(ts))
    conn.execute(sql.SQL("ALTER INDEX inbox_garbage SET TABLESPACE {}").format(ts))
    before, basics = conn.execute(CARRIED).fetchone()[0], conn.execute(CATALOG).fetchone()[0]
    assert before["table"] == [tablespace, ["autovacuum_enabled=false", "vacuum_truncate=false"], "heap_too"]
    assert before["sequence"][1] == "the ids" and "=rU/" in before["sequence"][0]
    assert before["column_options"] == [["code", "n_distinct=2"]]
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact"))
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.messages_deleted == 2000
    assert conn.execute(CARRIED).fetchone()[0] == before
    assert conn.execute(CATALOG).fetchone()[0] == basics
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live
    assert leftovers(conn) == []
