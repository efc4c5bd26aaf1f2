"""An application's table for the compaction tests, its catalog as a comparable value, and an
application that writes into it (inserts, updates, un-processes, processes, deletes) on its own
connection while msggc compacts it, keeping a model of what must be there."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tests.polling import wait_until

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


def make_inbox(conn: Conn, rows: int, live_every: int) -> set[int]:
    """``rows`` rows, one in ``live_every`` not processed; returns the live ids."""
    conn.execute(APP_TABLE)
    conn.execute("INSERT INTO inbox (msg, code, processed_at) SELECT 'm' || g, 'a',"
                 " CASE WHEN g %% %s = 0 THEN NULL ELSE now() END FROM generate_series(1, %s) g",
                 (live_every, rows))
    return {row[0] for row in conn.execute("SELECT id FROM inbox WHERE processed_at IS NULL")}



LEAVES = """
CREATE TABLE events (id bigint NOT NULL, day date NOT NULL, body text, processed_at timestamptz,
                     PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE INDEX events_garbage ON events (id) WHERE processed_at IS NOT NULL;
CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2026-01-02');
CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM ('2026-01-02') TO ('2026-01-03');
CREATE TABLE event_log (id bigint, op text);
CREATE FUNCTION event_log() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO event_log VALUES (NEW.id, TG_OP); RETURN NEW; END$$;
CREATE TRIGGER logged AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION event_log();
CREATE TRIGGER own AFTER UPDATE ON events_1 FOR EACH ROW EXECUTE FUNCTION event_log();
GRANT SELECT ON events_1 TO PUBLIC;
INSERT INTO events SELECT g, date '2026-01-01' + (g % 2), 'b', CASE WHEN g % 10 = 0 THEN NULL ELSE now() END
  FROM generate_series(1, 4000) g;
"""

LEAF_CATALOG = """
SELECT pg_get_expr(c.relpartbound, c.oid), c.relacl::text,
  (SELECT jsonb_agg(jsonb_build_array(ic.relname, pi.inhparent::regclass::text) ORDER BY ic.relname)
   FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
   LEFT JOIN pg_inherits pi ON pi.inhrelid = x.indexrelid WHERE x.indrelid = c.oid),
  (SELECT jsonb_agg(jsonb_build_array(tgname, tgparentid <> 0) ORDER BY tgname) FROM pg_trigger
   WHERE tgrelid = c.oid AND NOT tgisinternal),
  (SELECT jsonb_agg(conname ORDER BY conname) FROM pg_constraint WHERE conrelid = c.oid)
FROM pg_class c WHERE c.oid = 'events_1'::regclass
"""


def leftovers(conn: Conn) -> list[str]:
    """What a compaction builds beside the table: nothing of it may remain once a run closed."""
    return [row[0] for row in conn.execute(
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'msggc%%' UNION ALL"
        " SELECT proname::text FROM pg_proc WHERE proname LIKE 'msggc_capture%%' UNION ALL"
        " SELECT tgname::text FROM pg_trigger WHERE tgname LIKE 'msggc%%'")]


@dataclass
class App:
    """The application: one autocommit connection, one statement at a time, each op's effect on
    the model checked by its row count (a live row it updates must be there, always)."""

    dsn: str
    live: dict[int, str]
    garbage: set[int]
    gone: set[int] = field(default_factory=set)
    inserted: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    seed: int = 0

    @classmethod
    def on(cls, conn: Conn, dsn: str, seed: int = 0) -> App:
        rows = conn.execute("SELECT id, msg, processed_at IS NULL FROM inbox").fetchall()
        live = {i: m for i, m, alive in rows if alive}
        return cls(dsn, live, {i for i, _m, _alive in rows} - set(live), seed=seed)

    def run(self) -> None:
        rng = random.Random(self.seed)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    self.step(conn, rng, f"{self.seed}-{n}")
                except psycopg.Error as exc:
                    self.errors.append(str(exc).strip().splitlines()[0])
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                time.sleep(0.001)

    def step(self, conn: Conn, rng: random.Random, tag: str) -> None:
        op = rng.choice(("insert", "update", "unprocess", "process", "delete"))
        if op == "insert" or not self.live:
            row = conn.execute("INSERT INTO inbox (msg, code) VALUES (%s, 'b') RETURNING id",
                               (tag,)).fetchone()
            assert row is not None
            self.live[row[0]] = tag
            self.inserted += 1
            return
        if op == "unprocess" and self.garbage:
            key = rng.choice(sorted(self.garbage))
            self.garbage.discard(key)
            back = conn.execute("UPDATE inbox SET processed_at = NULL WHERE id = %s RETURNING msg",
                                (key,)).fetchone()
            if back is not None:  # not collected yet: live again, it must stay
                self.live[key] = back[0]
            return
        key = rng.choice(sorted(self.live))
        if op == "update":
            found = conn.execute("UPDATE inbox SET msg = %s WHERE id = %s", (tag, key)).rowcount
            self._must(found, key, op)
            self.live[key] = tag
        elif op == "process":
            found = conn.execute("UPDATE inbox SET processed_at = now() WHERE id = %s", (key,)).rowcount
            self._must(found, key, op)
            del self.live[key]
            self.garbage.add(key)
        else:
            self._must(conn.execute("DELETE FROM inbox WHERE id = %s", (key,)).rowcount, key, op)
            del self.live[key]
            self.gone.add(key)
            self.deleted += 1

    def _must(self, found: int, key: int, op: str) -> None:
        if found != 1:
            self.errors.append(f"live row {key} missing at {op}")

    def check(self, conn: Conn, initial_rows: int) -> None:
        """Every live row with its latest values, none the application deleted, and the runs'
        deleted rows exactly what left the table besides the application's deletes."""
        assert self.errors == []
        rows = dict(conn.execute("SELECT id, msg FROM inbox WHERE processed_at IS NULL").fetchall())
        assert rows == self.live
        present = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
        collected = conn.execute("SELECT coalesce(sum(messages_deleted), 0) FROM gc_runs").fetchone()[0]
        assert collected == initial_rows + self.inserted - self.deleted - present


POINTS = ("start", "capture", "copy", "indexes", "foreign keys", "catch-up", "swap", "finish", "close")
"""Where a compaction records something, in order: "inside capture" is its capture's transaction
with its work done, waiting to commit with its record."""
ORDER = (*POINTS[:-1], "undo", "close")
"""With a swap undone: "undo" is the undo's transaction, under the table's lock, its work done."""


def blocked_in(conn: Conn, pid: int) -> str:
    """The point whose record msggc's backend ``pid`` waits to write."""
    row = conn.execute(
        "SELECT cursor #>> '{compact,phase}',"
        " jsonb_array_length(coalesce(cursor #> '{compact,indexes}', '[]'))"
        " FROM gc_runs WHERE strategy = 'compact' AND status = 'running'").fetchone()
    phase, indexes = row or (None, 0)
    if phase is None:
        return "start"
    swapping = conn.execute("SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s"
                            " AND relation = to_regclass('inbox')"
                            " AND mode = 'AccessExclusiveLock' AND granted)", (pid,)).fetchone()[0]
    return {"planned": "capture", "capture": "copy", "copied": "foreign keys" if indexes else "indexes",
            "indexed": "swap" if swapping else "catch-up", "swapped": "finish", "undoing": "undo",
            "done": "close", "unswapped": "close", "kept": "close"}[phase]


class Turnstile:
    """Stops msggc (``proc``) where it waits to record a point, by holding ``gc_runs`` in SHARE
    mode (every write of it waits). Two connections take turns: to let one of msggc's
    transactions commit, the spare's lock request is queued behind msggc's before the holding one
    lets go, so the next write waits again however slowly this process goes on (one connection
    releasing and locking again let msggc pass two points on a loaded host)."""

    def __init__(self, conn: Conn, dsn: str, proc: subprocess.Popen[str]) -> None:
        self.conn, self.proc = conn, proc
        self.holding: Conn = psycopg.connect(dsn)
        self.spare: Conn = psycopg.connect(dsn)
        self.holding.execute("LOCK TABLE gc_runs IN SHARE MODE")

    def __enter__(self) -> Turnstile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.holding.close()
        self.spare.close()

    def pause_at(self, point: str) -> None:
        """Return once msggc waits to record ``point`` (:data:`ORDER`), held there."""
        while True:
            pid = self._blocked()
            reached = blocked_in(self.conn, pid)
            if reached == point:
                return
            assert ORDER.index(reached) < ORDER.index(point), f"passed {point}"
            self._let_one_through()

    def release(self) -> None:
        """Let msggc go on freely."""
        self.holding.rollback()

    def _blocked(self) -> int:
        holder_pid = self.holding.info.backend_pid
        pid = wait_until(lambda: (self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'msggc'"
            " AND %s = ANY(pg_blocking_pids(pid))", (holder_pid,)).fetchone() or [None])[0]
            or self.proc.poll() is not None, 30, "msggc to record a phase")
        assert self.proc.poll() is None, f"the run ended: {self.proc.communicate()}"
        return int(pid)

    def _let_one_through(self) -> None:
        queued = threading.Thread(target=self.spare.execute, args=("LOCK TABLE gc_runs IN SHARE MODE",))
        queued.start()
        spare_pid = self.spare.info.backend_pid
        wait_until(lambda: self.conn.execute(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s AND relation = 'gc_runs'::regclass"
            " AND NOT granted)", (spare_pid,)).fetchone()[0], 30, "the spare's lock request to queue")
        self.holding.rollback()
        queued.join(60)
        self.holding, self.spare = self.spare, self.holding
