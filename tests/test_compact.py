"""Compaction (``--strategy compact``) on a plain table: the live rows kept, the garbage counted
exactly, and the table's catalog (grants, triggers, policies, defaults, identity position,
indexes, constraints, comments) the same after the swap; the refusals, one line each."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine import collect
from engine.compact.preconditions import CompactRefused
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus

Conn = psycopg.Connection[Any]

APP_TABLE = """
CREATE TABLE app_ref (code text PRIMARY KEY);
INSERT INTO app_ref VALUES ('a'), ('b');
CREATE TABLE inbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg text NOT NULL UNIQUE,
    code text REFERENCES app_ref (code),
    n int NOT NULL DEFAULT 7 CHECK (n > 0),
    doubled int GENERATED ALWAYS AS (n * 2) STORED,
    processed_at timestamptz
) WITH (fillfactor = 90);
CREATE INDEX inbox_garbage ON inbox (id) WHERE processed_at IS NOT NULL;
CREATE INDEX inbox_lower ON inbox (lower(msg));
COMMENT ON TABLE inbox IS 'the inbox';
COMMENT ON COLUMN inbox.msg IS 'the text';
ALTER TABLE inbox ALTER COLUMN msg SET STATISTICS 321;
CREATE TABLE inbox_audit (id bigint, op text);
CREATE FUNCTION inbox_audit() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO inbox_audit VALUES (NEW.id, TG_OP); RETURN NEW; END$$;
CREATE TRIGGER audit AFTER INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION inbox_audit();
CREATE TRIGGER audit_off AFTER UPDATE ON inbox FOR EACH ROW EXECUTE FUNCTION inbox_audit();
ALTER TABLE inbox DISABLE TRIGGER audit_off;
ALTER TABLE inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY recent ON inbox FOR SELECT TO PUBLIC USING (n > 1);
GRANT SELECT, INSERT ON inbox TO PUBLIC;
GRANT UPDATE (processed_at) ON inbox TO PUBLIC;
ALTER TABLE inbox REPLICA IDENTITY FULL;
"""

CATALOG = """
SELECT jsonb_build_object(
 'columns', (SELECT jsonb_agg(jsonb_build_array(attname, format_type(atttypid, atttypmod), attnotnull,
    attidentity, attgenerated, pg_get_expr(d.adbin, d.adrelid), col_description(attrelid, attnum),
    attacl::text, coalesce(attstattarget, -1)) ORDER BY attnum)
    FROM pg_attribute LEFT JOIN pg_attrdef d ON d.adrelid = attrelid AND d.adnum = attnum
    WHERE attrelid = 'inbox'::regclass AND attnum > 0 AND NOT attisdropped),
 'indexes', (SELECT jsonb_agg(regexp_replace(indexdef, 'msggc_\\d+', '') ORDER BY indexname)
    FROM pg_indexes WHERE tablename = 'inbox'),
 'constraints', (SELECT jsonb_agg(jsonb_build_array(conname, pg_get_constraintdef(oid), convalidated)
    ORDER BY conname) FROM pg_constraint WHERE conrelid = 'inbox'::regclass),
 'triggers', (SELECT jsonb_agg(jsonb_build_array(tgname, tgenabled, pg_get_triggerdef(oid)) ORDER BY tgname)
    FROM pg_trigger WHERE tgrelid = 'inbox'::regclass AND NOT tgisinternal),
 'policies', (SELECT jsonb_agg(jsonb_build_array(policyname, cmd, roles, qual)) FROM pg_policies
    WHERE tablename = 'inbox'),
 'table', (SELECT jsonb_build_array(relacl::text, pg_get_userbyid(relowner), relrowsecurity, relreplident,
    reloptions, obj_description(oid, 'pg_class')) FROM pg_class WHERE oid = 'inbox'::regclass),
 'identity', pg_get_serial_sequence('inbox', 'id'),
 'next_id', (SELECT last_value FROM inbox_id_seq))
"""


def options(**settings: Any) -> GcOptions:
    return GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact", **settings)


def make_inbox(conn: Conn, rows: int, live_every: int) -> set[int]:
    """``rows`` rows, one in ``live_every`` not processed; returns the live ids."""
    conn.execute(APP_TABLE)
    conn.execute("INSERT INTO inbox (msg, code, processed_at) SELECT 'm' || g, 'a',"
                 " CASE WHEN g %% %s = 0 THEN NULL ELSE now() END FROM generate_series(1, %s) g",
                 (live_every, rows))
    return {row[0] for row in conn.execute("SELECT id FROM inbox WHERE processed_at IS NULL")}


def test_compaction_keeps_live_rows_counts_garbage_and_carries_the_catalog(conn: Conn, dsn: str) -> None:
    live = make_inbox(conn, 5000, 10)
    before = conn.execute(CATALOG).fetchone()[0]
    result = collect(dsn, options())
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.strategy == "compact"
    assert result.messages_deleted == 4500
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live
    assert conn.execute(CATALOG).fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'msggc%%'").fetchone()[0] == 0
    # the identity goes on where it stood, the application's trigger fires on the new table
    new_id = conn.execute("INSERT INTO inbox (msg) VALUES ('after') RETURNING id").fetchone()[0]
    assert new_id == 5001
    assert conn.execute("SELECT op FROM inbox_audit WHERE id = %s", (new_id,)).fetchone() == ("INSERT",)
    assert conn.execute("SELECT messages_deleted, status FROM gc_runs WHERE id = %s",
                        (result.run_id,)).fetchone() == (4500, "complete")


@pytest.mark.parametrize(("setup", "reason"), [
    ("CREATE VIEW inbox_view AS SELECT id FROM inbox", "views, materialized views or rules depend on it"),
    ("CREATE TABLE reply (id int PRIMARY KEY, inbox_id bigint REFERENCES inbox (id))",
     "foreign keys point at it"),
    ("CREATE PUBLICATION inbox_pub FOR TABLE inbox", "it is published"),
    ("ALTER TABLE inbox DROP CONSTRAINT inbox_pkey, DROP CONSTRAINT inbox_msg_key", "no key"),
    ("CREATE TABLE inbox_child () INHERITS (inbox)", "it takes part in inheritance"),
    ("CREATE FUNCTION first_inbox() RETURNS inbox LANGUAGE sql AS 'SELECT * FROM inbox LIMIT 1'",
     "objects depend on it or on its row type"),
])
def test_compaction_is_refused_in_one_line_when_a_rename_cannot_carry_the_table(
        conn: Conn, dsn: str, setup: str, reason: str) -> None:
    make_inbox(conn, 100, 2)
    conn.execute(setup)
    with pytest.raises(CompactRefused, match=reason) as refused:
        collect(dsn, options())
    assert "\n" not in str(refused.value)
    assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 100
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


def test_compaction_is_refused_to_a_role_that_does_not_own_the_table(
        conn: Conn, role_dsn: Any) -> None:
    make_inbox(conn, 100, 2)
    other = role_dsn("GRANT SELECT, DELETE ON inbox TO {role}",
                     "GRANT SELECT, INSERT, UPDATE, DELETE ON gc_runs, gc_outbox, gc_sweep TO {role}")
    with pytest.raises(CompactRefused, match="the role does not own it"):
        collect(other, options())
