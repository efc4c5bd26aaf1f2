"""Foreign keys onto the collected table: referenced garbage is kept and counted, never a failed
run; dependents go first on request; cascades and SET NULL are counted; archived children come
back with their parents."""

from __future__ import annotations

import json

import pytest

from engine import collect
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.faults.helpers import content_digest
from tests.support import run_cli

INBOX = TableSpec(name="inbox", schema="app", processed_column="handled_at")


def make_inbox(conn, rows: int = 1000, key: str = "bigint") -> None:
    """``app.inbox``: every row but each fifth handled (garbage); ids 1..rows in id order."""
    default = "gen_random_uuid()" if key == "uuid" else "nextval('app.inbox_seq')"
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE SEQUENCE app.inbox_seq")
    conn.execute(f"CREATE TABLE app.inbox (id {key} PRIMARY KEY DEFAULT {default}, n int NOT NULL,"
                 " handled_at timestamptz, body text)")
    conn.execute("INSERT INTO app.inbox (n, handled_at, body) SELECT g, CASE WHEN g %% 5 <> 0 THEN now() END,"
                 " repeat('b', 50) FROM generate_series(1, %s) g", (rows,))
    conn.execute("ANALYZE app.inbox")


def add_child(conn, table: str, action: str, referencing_ns: list[int], key: str = "bigint") -> None:
    """A child table whose rows reference the inbox rows numbered ``referencing_ns``."""
    conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY,"
                 f" inbox_id {key} REFERENCES app.inbox (id) ON DELETE {action})")
    conn.execute(f"CREATE INDEX ON {table} (inbox_id)")
    conn.execute(f"INSERT INTO {table} (inbox_id) SELECT id FROM app.inbox WHERE n = ANY(%s)",
                 (referencing_ns,))


def inbox_digest(conn) -> str:
    return conn.execute("SELECT md5(string_agg(t::text, ',' ORDER BY t.n)) FROM app.inbox t").fetchone()[0]


def garbage_ns(conn) -> list[int]:
    return [n for (n,) in conn.execute("SELECT n FROM app.inbox WHERE handled_at IS NOT NULL ORDER BY n")]


HELD = [2, 3, 4, 6]  # garbage rows (n % 5 != 0) that a child references
LIVE_REFERENCED = [5, 10]  # live rows a child references


@pytest.mark.parametrize(("strategy", "key"), [("physical", "bigint"), ("index", "bigint"),
                                              ("key", "bigint"), ("index", "uuid"), ("physical", "uuid")])
@pytest.mark.parametrize("action", ["NO ACTION", "RESTRICT"])
def test_referenced_garbage_is_kept_and_counted_and_the_run_completes(conn, dsn, strategy, key, action):
    make_inbox(conn, key=key)
    add_child(conn, "replies", action, HELD + LIVE_REFERENCED, key)
    children = content_digest(conn, None, "replies")

    result = collect(dsn, GcOptions(table=INBOX, strategy=strategy, batch_size=100))

    assert result.status is RunStatus.COMPLETE
    assert result.kept_referenced == {"replies_inbox_id_fkey": len(HELD)}
    assert result.foreign_keys["replies_inbox_id_fkey"] == {
        "child": "public.replies", "action": action.lower(), "effect": "kept", "rows": len(HELD)}
    assert garbage_ns(conn) == HELD and result.messages_deleted == 800 - len(HELD)
    assert content_digest(conn, None, "replies") == children


def test_delete_dependents_removes_the_children_first_in_the_same_batch(conn, dsn):
    make_inbox(conn)
    add_child(conn, "replies", "NO ACTION", HELD + LIVE_REFERENCED)

    result = collect(dsn, GcOptions(table=INBOX, delete_dependents=True, batch_size=100))

    assert result.status is RunStatus.COMPLETE and result.kept_referenced == {}
    assert result.foreign_keys["replies_inbox_id_fkey"]["effect"] == "deleted"
    assert result.foreign_keys["replies_inbox_id_fkey"]["rows"] == len(HELD)
    assert garbage_ns(conn) == [] and result.messages_deleted == 800
    left = [n for (n,) in conn.execute("SELECT i.n FROM replies r JOIN app.inbox i ON i.id = r.inbox_id"
                                       " ORDER BY 1")]
    assert left == LIVE_REFERENCED


@pytest.mark.parametrize(("action", "effect"), [("CASCADE", "cascaded"), ("SET NULL", "set null")])
def test_children_a_delete_changes_are_counted_per_constraint(conn, dsn, action, effect):
    make_inbox(conn)
    add_child(conn, "attachments", action, HELD + LIVE_REFERENCED)
    conn.execute("INSERT INTO attachments (inbox_id) SELECT inbox_id FROM attachments")  # two each

    result = collect(dsn, GcOptions(table=INBOX, batch_size=100))

    assert result.status is RunStatus.COMPLETE and garbage_ns(conn) == []
    assert result.foreign_keys["attachments_inbox_id_fkey"] == {
        "child": "public.attachments", "action": action.lower(), "effect": effect, "rows": 2 * len(HELD)}
    recorded = conn.execute("SELECT foreign_keys FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()[0]
    assert recorded == {"attachments_inbox_id_fkey": 2 * len(HELD)}


def test_a_foreign_key_from_another_schema_is_found(conn, dsn):
    make_inbox(conn)
    conn.execute("CREATE SCHEMA audit")
    add_child(conn, "audit.trail", "NO ACTION", HELD)
    result = collect(dsn, GcOptions(table=INBOX))
    assert result.kept_referenced == {"trail_inbox_id_fkey": len(HELD)}
    assert result.foreign_keys["trail_inbox_id_fkey"]["child"] == "audit.trail"


def test_dry_run_lists_every_foreign_key_with_its_action_and_an_estimate(conn, dsn):
    make_inbox(conn)
    add_child(conn, "replies", "NO ACTION", HELD)
    add_child(conn, "attachments", "CASCADE", [*HELD, 7, 8])
    before = inbox_digest(conn)

    done = run_cli("gc", "--dsn", dsn, "--table", "app.inbox", "--processed-column=handled_at", "--dry-run")

    assert done.returncode == 0, done.stderr
    assert "replies_inbox_id_fkey (public.replies, ON DELETE NO ACTION): ~4 rows kept" in done.stdout
    # rows 2, 3, 4, 6 stay (replies hold them): only the attachments of 7 and 8 would go
    cascade = "attachments_inbox_id_fkey (public.attachments, ON DELETE CASCADE): ~2 rows cascaded"
    assert cascade in done.stdout
    assert inbox_digest(conn) == before


def test_status_and_json_show_the_predicate_and_the_rows_kept(conn, dsn):
    make_inbox(conn)
    add_child(conn, "replies", "RESTRICT", HELD)
    gc = run_cli("gc", "--dsn", dsn, "--table", "app.inbox", "--processed-column", "handled_at",
                 "--where", "n > 1", "--json")
    assert gc.returncode == 0, gc.stderr
    status = run_cli("status", "--dsn", dsn, "--json")
    (run,) = json.loads(status.stdout)
    assert run["garbage"] == "handled_at IS NOT NULL AND (n > 1)"
    assert run["foreign_keys"] == {"replies_inbox_id_fkey": len(HELD)}


def test_archived_cascades_come_back_parents_first_then_children_exactly(conn, dsn):
    make_inbox(conn)
    add_child(conn, "attachments", "CASCADE", HELD + LIVE_REFERENCED)
    conn.execute("INSERT INTO attachments (inbox_id) SELECT inbox_id FROM attachments")
    inbox, children = inbox_digest(conn), content_digest(conn, None, "attachments")
    for table in ("app.inbox", "attachments"):
        assert run_cli("migrate", "--dsn", dsn, "--archive-for", table).returncode == 0

    result = collect(dsn, GcOptions(table=INBOX, archive=True, batch_size=100))
    assert result.status is RunStatus.COMPLETE and garbage_ns(conn) == []
    assert result.foreign_keys["attachments_inbox_id_fkey"]["rows"] == 2 * len(HELD)
    archived = conn.execute("SELECT count(*) FROM attachments_archive WHERE run_id = %s", (result.run_id,))
    assert archived.fetchone()[0] == 2 * len(HELD)

    back = run_cli("restore", "--dsn", dsn, "--table", "app.inbox", "--run", str(result.run_id))
    assert back.returncode == 0, back.stderr
    run = f"of run {result.run_id}"
    assert back.stdout.strip() == (f"restored 800 rows {run} into app.inbox;"
                                   f" restored {2 * len(HELD)} rows {run} into public.attachments")
    assert inbox_digest(conn) == inbox and content_digest(conn, None, "attachments") == children


def test_dependents_deleted_on_request_are_archived_and_restored_with_their_parents(conn, dsn):
    make_inbox(conn)
    add_child(conn, "replies", "RESTRICT", HELD + LIVE_REFERENCED)
    inbox, children = inbox_digest(conn), content_digest(conn, None, "replies")
    for table in ("app.inbox", "replies"):
        assert run_cli("migrate", "--dsn", dsn, "--archive-for", table).returncode == 0

    result = collect(dsn, GcOptions(table=INBOX, archive=True, delete_dependents=True, batch_size=100))
    assert result.status is RunStatus.COMPLETE and garbage_ns(conn) == []
    assert result.foreign_keys["replies_inbox_id_fkey"] == {
        "child": "public.replies", "action": "restrict", "effect": "deleted", "rows": len(HELD)}

    back = run_cli("restore", "--dsn", dsn, "--table", "app.inbox", "--run", str(result.run_id))
    assert back.returncode == 0, back.stderr
    assert inbox_digest(conn) == inbox and content_digest(conn, None, "replies") == children


def test_status_shows_the_predicate_and_the_foreign_key_counts_of_each_run(conn, dsn):
    make_inbox(conn)
    add_child(conn, "replies", "NO ACTION", HELD)
    assert run_cli("gc", "--dsn", dsn, "--table", "app.inbox", "--processed-column=handled_at",
                   "--where", "n > 1").returncode == 0
    shown = run_cli("status", "--dsn", dsn)
    assert "handled_at IS NOT NULL AND (n > 1)" in shown.stdout
    assert f"replies_inbox_id_fkey {len(HELD)}" in shown.stdout


# -- a foreign key of the table onto itself (issue 21, item 3) ------------------------------------

MSG = TableSpec(name="msg", schema="public")


def make_threads(conn, rows: int = 20_000, index: bool = False, action: str = "NO ACTION") -> None:
    """``public.msg``: odd ids processed (garbage), each even row a reply to the row before it."""
    conn.execute(f"CREATE TABLE msg (id bigint PRIMARY KEY, processed_at timestamptz,"
                 f" parent_id bigint REFERENCES msg (id) ON DELETE {action}, body text)")
    if index:
        conn.execute("CREATE INDEX ON msg (parent_id)")
    conn.execute("INSERT INTO msg SELECT g, CASE WHEN g %% 2 = 1 THEN now() END,"
                 " CASE WHEN g %% 2 = 0 THEN g - 1 END, 'm' || g FROM generate_series(1, %s) g", (rows,))
    conn.execute("ANALYZE msg")


def msg_ids(conn, where: str = "TRUE") -> list[int]:
    return [i for (i,) in conn.execute(f"SELECT id FROM msg WHERE {where} ORDER BY id")]


@pytest.mark.parametrize("delete_dependents", [False, True])
def test_a_self_reference_never_deletes_a_live_reply_and_keeps_its_processed_parent(
        conn, dsn, delete_dependents):
    make_threads(conn)
    live = msg_ids(conn, "processed_at IS NULL")

    flags = ["--delete-dependents"] if delete_dependents else []
    done = run_cli("gc", "--dsn", dsn, "--table", "public.msg", *flags, "--json")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert msg_ids(conn, "processed_at IS NULL") == live and len(live) == 10_000
    assert len(msg_ids(conn)) == 20_000  # every processed row is some live reply's parent
    assert result["messages_deleted"] == 0
    assert result["kept_referenced"] == {"msg_parent_id_fkey": 10_000}
    assert result["foreign_keys"]["msg_parent_id_fkey"]["effect"] == "kept"
