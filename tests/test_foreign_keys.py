"""Foreign keys onto the collected table: referenced garbage is kept and counted, never a failed
run; dependents go first on request; cascades and SET NULL are counted; archived children come
back with their parents."""

from __future__ import annotations

import json

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions, TableSpec
from engine.result import GcResult
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


def archived_beside_a_lock(dsn: str, tables: tuple[str, ...], rows: str, options: GcOptions) -> GcResult:
    """A run with ``--archive`` (an archive table made for each of ``tables``) while the
    application holds the ``rows`` selected locked (``FOR UPDATE``)."""
    for table in tables:
        assert run_cli("migrate", "--dsn", dsn, "--archive-for", table).returncode == 0
    with psycopg.connect(dsn) as app:
        app.execute(rows + " FOR UPDATE")
        result = collect(dsn, options)
        app.rollback()
    return result


def test_a_parent_the_application_holds_locked_keeps_its_children_out_of_the_archive(conn, dsn):
    """After a lock timeout the batch leaves the rows the application holds: the children of a
    parent left behind are neither deleted nor archived (restoring the run must not bring back
    a copy of rows still there), and the next run archives them once, with their parent."""
    make_inbox(conn)
    add_child(conn, "attachments", "CASCADE", HELD + LIVE_REFERENCED)
    inbox, children = inbox_digest(conn), content_digest(conn, None, "attachments")
    first = archived_beside_a_lock(dsn, ("app.inbox", "attachments"), "SELECT id FROM app.inbox WHERE n = 3",
                                   GcOptions(table=INBOX, archive=True, batch_size=100, lock_timeout_ms=50))
    assert first.status is RunStatus.COMPLETE, first.error
    assert first.rows_skipped_locked == 1 and garbage_ns(conn) == [3]
    archived = conn.execute("SELECT count(*) FROM attachments_archive WHERE run_id = %s", (first.run_id,))
    assert archived.fetchone()[0] == len(HELD) - 1
    assert first.foreign_keys["attachments_inbox_id_fkey"]["rows"] == len(HELD) - 1

    back = run_cli("restore", "--dsn", dsn, "--table", "app.inbox", "--run", str(first.run_id))
    assert back.returncode == 0, back.stderr
    assert inbox_digest(conn) == inbox and content_digest(conn, None, "attachments") == children

    second = collect(dsn, GcOptions(table=INBOX, archive=True, batch_size=100))
    assert second.status is RunStatus.COMPLETE and garbage_ns(conn) == []
    assert conn.execute("SELECT count(*) FROM attachments_archive WHERE run_id = %s",
                        (second.run_id,)).fetchone()[0] == len(HELD)


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


def make_thread_shapes(conn, action: str = "NO ACTION", index: bool = False) -> tuple[set[int], int]:
    """``public.msg`` with threads of every shape; returns the ids a run must leave and how many of
    them are garbage kept because a row that stays descends from them."""
    make_threads(conn, rows=0, index=index, action=action)
    rows = [
        (1, True, None), (2, True, 1), (3, False, 2),  # garbage <- garbage <- live grandchild: 1, 2 kept
        (4, True, None), (5, True, 4), (6, True, 5),  # all garbage: the whole thread goes
        (7, True, None), (8, True, 7), (9, False, 7),  # a garbage and a live reply: 7 kept, 8 goes
        (11, True, None), (10, True, 11),  # a reply with a smaller id than its parent: both go
        (7000, False, None), (7001, True, None),
    ]
    rows += [(i, True, i - 1 if i > 100 else None) for i in range(100, 140)]  # one chain over batches
    rows += [(i, True, i - 1 if i > 4000 else None) for i in range(4000, 5000)]  # a garbage chain ...
    rows += [(5000, False, 4999)]  # ... under a live reply: all 1,000 kept
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO msg (id, processed_at, parent_id, body) VALUES"
                        " (%s, CASE WHEN %s THEN now() END, %s, 'm')", rows)
    conn.execute("INSERT INTO msg VALUES (6000, now(), NULL, 'm'), (6001, now(), 6000, 'm')")
    conn.execute("UPDATE msg SET parent_id = 6001 WHERE id = 6000")  # a garbage cycle: both go
    conn.execute("ANALYZE msg")
    return {1, 2, 3, 7, 9, *range(4000, 5001), 7000}, 2 + 1 + 1000


@pytest.mark.parametrize(("strategy", "action", "index"), [
    ("key", "NO ACTION", False), ("physical", "RESTRICT", False), ("index", "NO ACTION", True),
    ("key", "RESTRICT", True)])
def test_garbage_threads_go_whole_in_one_run_and_a_live_descendant_keeps_every_ancestor(
        conn, dsn, strategy, action, index):
    stays, kept = make_thread_shapes(conn, action, index)
    before = len(msg_ids(conn))

    result = collect(dsn, GcOptions(table=MSG, strategy=strategy, batch_size=20))

    assert result.status is RunStatus.COMPLETE, result.error
    assert set(msg_ids(conn)) == stays
    assert result.messages_deleted == before - len(stays)
    assert result.kept_referenced == {"msg_parent_id_fkey": kept}
    again = collect(dsn, GcOptions(table=MSG, strategy=strategy, batch_size=20))
    assert again.messages_deleted == 0 and set(msg_ids(conn)) == stays


@pytest.mark.parametrize("action", ["CASCADE", "SET NULL"])
def test_a_self_reference_that_cascades_or_sets_null_is_refused_in_one_line_and_nothing_changes(
        conn, dsn, action):
    make_threads(conn, rows=200, action=action)
    before = content_digest(conn, None, "msg")

    for dry_run in ([], ["--dry-run"]):
        done = run_cli("gc", "--dsn", dsn, "--table", "public.msg", "--delete-dependents", *dry_run)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert f"foreign key msg_parent_id_fkey of public.msg onto itself is ON DELETE {action}" in line
    assert content_digest(conn, None, "msg") == before
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


def test_archived_threads_come_back_whole_each_row_once(conn, dsn):
    stays, _ = make_thread_shapes(conn)
    before = content_digest(conn, None, "msg")
    assert run_cli("migrate", "--dsn", dsn, "--archive-for", "public.msg").returncode == 0

    result = collect(dsn, GcOptions(table=MSG, archive=True, batch_size=20))
    assert result.status is RunStatus.COMPLETE and set(msg_ids(conn)) == stays
    archived = conn.execute("SELECT count(*), count(DISTINCT id) FROM msg_archive WHERE run_id = %s",
                            (result.run_id,)).fetchone()
    assert archived == (result.messages_deleted, result.messages_deleted)

    back = run_cli("restore", "--dsn", dsn, "--table", "public.msg", "--run", str(result.run_id))
    assert back.returncode == 0, back.stderr
    assert content_digest(conn, None, "msg") == before


@pytest.mark.parametrize("delete_dependents", [False, True])
def test_a_self_reference_of_a_partitioned_table_keeps_live_replies_in_any_leaf(conn, dsn, delete_dependents):
    """The key points at the partitioned table: a leaf's garbage goes with its subtree when the
    whole subtree is garbage of that leaf; a descendant in another leaf holds it for a later run.
    PostgreSQL before 16.9 (CI's 16.2) makes no clone of this key onto the leaves and checks no
    delete from them: there only msggc's own reading of the key keeps the live replies' parents."""
    conn.execute("CREATE TABLE pm (id bigint, day date, processed_at timestamptz, parent_id bigint,"
                 " parent_day date, PRIMARY KEY (id, day),"
                 " FOREIGN KEY (parent_id, parent_day) REFERENCES pm (id, day)) PARTITION BY RANGE (day)")
    conn.execute("CREATE TABLE pm_1 PARTITION OF pm FOR VALUES FROM ('2024-01-01') TO ('2024-01-02')")
    conn.execute("CREATE TABLE pm_2 PARTITION OF pm FOR VALUES FROM ('2024-01-02') TO ('2024-01-03')")
    one, two = "2024-01-01", "2024-01-02"
    rows = [(1, one, True, None, None), (2, one, True, 1, one), (3, one, False, 2, one),  # 1, 2 kept
            (4, one, True, None, None), (5, two, False, 4, one),  # a live reply in the next leaf: 4 kept
            (6, one, True, None, None), (7, two, True, 6, one),  # a garbage reply in the next leaf
            (8, two, True, None, None), (9, two, True, 8, two),  # a garbage thread in one leaf: goes
            (10, one, False, None, None)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pm VALUES (%s, %s, CASE WHEN %s THEN now() END, %s, %s)", rows)
    conn.execute("ANALYZE pm")
    live = {3, 5, 10}
    options = GcOptions(table=TableSpec(name="pm", schema="public"), batch_size=100, workers=1,
                        delete_dependents=delete_dependents)

    first = collect(dsn, options)
    ids = {i for (i,) in conn.execute("SELECT id FROM pm")}
    assert first.status is RunStatus.COMPLETE and live <= ids and not {8, 9} & ids
    assert ids - {6, 7} == {1, 2, 3, 4, 5, 10}  # 6 stays while 7 is there, 7 may go first
    # 6 is counted kept when its leaf is walked before 7's, and may still go in the leaf's sweep
    assert first.kept_referenced["pm_parent_id_parent_day_fkey"] in (3, 4)
    assert first.foreign_keys["pm_parent_id_parent_day_fkey"]["child"] == "public.pm"

    second = collect(dsn, options)
    assert {i for (i,) in conn.execute("SELECT id FROM pm")} == {1, 2, 3, 4, 5, 10}
    assert second.kept_referenced == {"pm_parent_id_parent_day_fkey": 3}
    assert first.messages_deleted + second.messages_deleted == 4


def test_a_foreign_key_without_an_index_is_named_in_the_dry_run_and_the_result(conn, dsn):
    make_threads(conn, rows=2000)
    conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, msg_id bigint REFERENCES msg (id))")
    slow = "foreign key msg_parent_id_fkey has no index on (parent_id): each deleted row scans public.msg"
    also = "foreign key notes_msg_id_fkey has no index on (msg_id): each deleted row scans public.notes"

    dry = run_cli("gc", "--dsn", dsn, "--table", "public.msg", "--dry-run")
    gc = run_cli("gc", "--dsn", dsn, "--table", "public.msg", "--json")

    assert dry.returncode == 0 and gc.returncode == 0, dry.stderr + gc.stderr
    assert slow in dry.stdout and also in dry.stdout
    reported = json.loads(gc.stdout)["foreign_keys"]
    assert reported["msg_parent_id_fkey"]["no_index"] == slow
    assert reported["notes_msg_id_fkey"]["no_index"] == also
    conn.execute("CREATE INDEX ON msg (parent_id, id)")  # an index leading with the column serves
    conn.execute("CREATE INDEX ON notes (msg_id) WHERE msg_id > 0")  # a partial one does not
    again = run_cli("gc", "--dsn", dsn, "--table", "public.msg")
    assert again.returncode == 0, again.stderr
    assert "msg_parent_id_fkey has no index" not in again.stdout and also in again.stdout


def test_a_dry_run_whose_sample_batches_meet_statement_timeout_says_the_prediction_is_unknown(conn, dsn):
    make_threads(conn, rows=2000)
    conn.execute("CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS"
                 " $$ BEGIN PERFORM pg_sleep(8); RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER slow BEFORE DELETE ON msg FOR EACH STATEMENT EXECUTE FUNCTION slow_delete()")
    before = content_digest(conn, None, "msg")

    done = run_cli("gc", "--dsn", dsn, "--table", "public.msg", "--dry-run", "--json")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["predicted_seconds"] is None and result["predicted_wal_bytes"] is None
    assert "duration and WAL unknown: a sample batch of" in result["reason"]
    assert result["reason"].endswith("ran past its statement_timeout (5s)")
    text = run_cli("gc", "--dsn", dsn, "--table", "public.msg", "--dry-run")
    assert text.returncode == 0 and text.stderr == "", text.stderr
    assert "duration and WAL unknown" in text.stdout and "msg_parent_id_fkey" in text.stdout
    assert content_digest(conn, None, "msg") == before


def make_chain(conn, rows: int, index: bool) -> None:
    """Every row processed, each a reply to the one before it: one thread ``rows`` deep."""
    make_threads(conn, rows=0, index=index)
    conn.execute("INSERT INTO msg SELECT g, now(), nullif(g - 1, 0), 'm' FROM generate_series(1, %s) g",
                 (rows,))
    conn.execute("ANALYZE msg")


def test_a_deep_garbage_thread_with_an_index_goes_in_one_run(conn, dsn):
    make_chain(conn, 3000, index=True)
    result = collect(dsn, GcOptions(table=MSG, batch_size=100))
    assert result.status is RunStatus.COMPLETE and result.messages_deleted == 3000
    assert msg_ids(conn) == [] and result.kept_referenced == {"msg_parent_id_fkey": 0}


def test_a_deep_garbage_thread_without_an_index_goes_over_runs_that_complete_and_count_what_stays(conn, dsn):
    """Without an index each deleted row reads the table: a subtree goes with a row of the batch
    only up to 32 levels below the batch (one statement over the whole thread made every run fail)."""
    make_chain(conn, 1000, index=False)
    deleted, runs = 0, 0
    while msg_ids(conn):
        result = collect(dsn, GcOptions(table=MSG, batch_size=100))
        runs += 1
        left = len(msg_ids(conn))
        assert result.status is RunStatus.COMPLETE, result.error
        assert result.messages_deleted > 0 and deleted + result.messages_deleted + left == 1000
        assert result.kept_referenced == {"msg_parent_id_fkey": left}
        deleted += result.messages_deleted
        assert runs <= 12


@pytest.mark.parametrize("delete_dependents", [False, True])
def test_other_tables_children_of_a_whole_subtree_are_counted_archived_and_restored(
        conn, dsn, delete_dependents):
    """Rows past the batch's range that go with their thread take their other children with them:
    the cascade's are counted and archived, ``--delete-dependents`` deletes (and archives) the
    others first; without it they hold the row and the thread above it."""
    stays, kept = make_thread_shapes(conn, index=True)
    conn.execute("CREATE TABLE attachments (id serial PRIMARY KEY, msg_id bigint REFERENCES msg (id)"
                 " ON DELETE CASCADE)")
    conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, msg_id bigint REFERENCES msg (id)"
                 " ON DELETE RESTRICT)")
    conn.execute("INSERT INTO attachments (msg_id) SELECT unnest(ARRAY[5, 6, 120, 130, 139, 139, 2, 4500])")
    conn.execute("INSERT INTO notes (msg_id) VALUES (135), (3)")
    digests = {t: content_digest(conn, None, t) for t in ("msg", "attachments", "notes")}
    for table in ("public.msg", "public.attachments", "public.notes"):
        assert run_cli("migrate", "--dsn", dsn, "--archive-for", table).returncode == 0

    result = collect(dsn, GcOptions(table=MSG, batch_size=20, archive=True,
                                    delete_dependents=delete_dependents))

    assert result.status is RunStatus.COMPLETE, result.error
    held = set() if delete_dependents else set(range(100, 136))  # 135 is noted: it and the rows above stay
    assert set(msg_ids(conn)) == stays | held
    gone_attachments = 6 if delete_dependents else 4  # of 5, 6, 120, 130, 139 (twice) or of 5, 6, 139 x2
    assert result.foreign_keys["attachments_msg_id_fkey"]["rows"] == gone_attachments
    assert conn.execute("SELECT count(*) FROM attachments").fetchone()[0] == 8 - gone_attachments
    if delete_dependents:
        assert result.foreign_keys["notes_msg_id_fkey"]["rows"] == 1
        assert result.kept_referenced == {"msg_parent_id_fkey": kept}
    else:
        assert result.kept_referenced == {"msg_parent_id_fkey": kept + 35, "notes_msg_id_fkey": 1}
    archived = conn.execute("SELECT count(*) FROM attachments_archive").fetchone()[0]
    assert archived == gone_attachments

    back = run_cli("restore", "--dsn", dsn, "--table", "public.msg", "--run", str(result.run_id))
    assert back.returncode == 0, back.stderr
    assert {t: content_digest(conn, None, t) for t in digests} == digests


def test_a_reply_the_application_holds_locked_keeps_its_thread_and_the_next_run_takes_it(conn, dsn):
    """After a lock timeout a batch leaves locked rows: a garbage row with any reply stays then
    (its subtree cannot be taken whole), never a live one goes, and the next run finishes it."""
    stays, _ = make_thread_shapes(conn, index=True)
    before = len(msg_ids(conn))
    with psycopg.connect(dsn) as app:
        app.execute("SELECT id FROM msg WHERE id IN (5, 120) FOR UPDATE")  # replies in two threads
        first = collect(dsn, GcOptions(table=MSG, batch_size=20, lock_timeout_ms=50))
        app.rollback()
    ids = set(msg_ids(conn))
    assert first.status is RunStatus.COMPLETE, first.error
    assert stays <= ids and {4, 5, 120} <= ids and first.rows_skipped_locked >= 2
    assert first.messages_deleted == before - len(ids)

    second = collect(dsn, GcOptions(table=MSG, batch_size=20, lock_timeout_ms=50))
    assert second.status is RunStatus.COMPLETE and set(msg_ids(conn)) == stays
    assert first.messages_deleted + second.messages_deleted == before - len(stays)


def test_threads_the_application_holds_locked_keep_their_attachments_out_of_the_archive(conn, dsn):
    """A table onto itself, a cascading child, ``--archive``, and replies held by the application
    (the batch retried with SKIP LOCKED): only the attachments of messages deleted are archived,
    and restoring the run gives back exactly the tables as they were."""
    make_thread_shapes(conn, index=True)
    conn.execute("CREATE TABLE attachments (id serial PRIMARY KEY, msg_id bigint REFERENCES msg (id)"
                 " ON DELETE CASCADE)")
    conn.execute("INSERT INTO attachments (msg_id) SELECT unnest(ARRAY[4, 5, 6, 8, 120, 130, 139, 6001])")
    digests = {t: content_digest(conn, None, t) for t in ("msg", "attachments")}
    result = archived_beside_a_lock(dsn, ("public.msg", "attachments"),
                                    "SELECT id FROM msg WHERE id IN (5, 120)",
                                    GcOptions(table=MSG, archive=True, batch_size=20, lock_timeout_ms=50))
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.rows_skipped_locked >= 2 and {5, 120} <= set(msg_ids(conn))
    archived = {row for (row,) in conn.execute(
        "SELECT id FROM attachments_archive WHERE run_id = %s", (result.run_id,))}
    present = {row for (row,) in conn.execute("SELECT id FROM attachments")}
    assert archived and not archived & present and len(archived | present) == 8

    back = run_cli("restore", "--dsn", dsn, "--table", "public.msg", "--run", str(result.run_id))
    assert back.returncode == 0, back.stderr
    assert {t: content_digest(conn, None, t) for t in digests} == digests


def test_two_keys_of_the_table_onto_itself_both_hold_and_a_whole_garbage_thread_goes(conn, dsn):
    conn.execute("CREATE TABLE msg (id bigint PRIMARY KEY, processed_at timestamptz,"
                 " parent_id bigint REFERENCES msg (id), root_id bigint REFERENCES msg (id))")
    conn.execute("CREATE INDEX ON msg (parent_id)")
    conn.execute("INSERT INTO msg VALUES (1, now(), NULL, NULL), (2, now(), 1, 1), (3, NULL, 2, 1),"
                 " (10, now(), NULL, NULL), (11, now(), 10, 10), (12, now(), 11, 10),"
                 " (20, now(), NULL, NULL), (21, NULL, NULL, 20)")  # 20 held through root_id alone
    result = collect(dsn, GcOptions(table=MSG, batch_size=2))
    assert result.status is RunStatus.COMPLETE, result.error
    assert msg_ids(conn) == [1, 2, 3, 20, 21] and result.messages_deleted == 3
    assert result.kept_referenced == {"msg_parent_id_fkey": 2, "msg_root_id_fkey": 2}
    assert "msg_root_id_fkey has no index on (root_id)" in result.foreign_keys["msg_root_id_fkey"]["no_index"]
