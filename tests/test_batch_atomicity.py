"""A batch's delete and its checkpoint commit together or not at all.

One batch's COMMIT is made to fail on purpose, deterministically, by a one-shot deferred
constraint trigger (it runs at COMMIT, after the batch's statements all succeeded):

- on ``gc_runs`` (AFTER UPDATE of the checkpoint): the checkpoint's side of the commit fails;
- on ``messages`` (AFTER DELETE): the delete's side of the commit fails.

Either way the failed run's ``messages_deleted`` must equal the rows actually gone, and the next
run must finish the job exactly. "One-shot" is a sequence, not a flag row: a flag deleted by the
failing transaction would come back with its rollback, and fire again at every later commit.

Each failure catches one way of splitting a batch in two transactions: the ``checkpoint`` one a
checkpoint committed after the delete (rows gone, not counted), the ``delete`` one a checkpoint
committed before it (rows counted, not gone).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from engine import GcOptions, RunStatus, collect
from tests.data import fill, live_ids, surviving_ids
from tests.faults.helpers import audited_deletions, install_delete_audit

Conn = psycopg.Connection[Any]

GARBAGE = [i % 5 != 0 for i in range(3000)]
BATCH_ROWS = 100
FAILURE = "injected commit failure"


def install_commit_failure(conn: Conn, table: str, event: str, when: str, fire_at: int) -> None:
    """A trigger that runs at COMMIT and raises exactly once: at its ``fire_at``-th invocation."""
    conn.execute("CREATE SEQUENCE commit_failure_calls")
    conn.execute(sql.SQL(
        "CREATE FUNCTION commit_failure() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF nextval('commit_failure_calls') = {fire_at} THEN RAISE EXCEPTION {message}; END IF;"
        " RETURN NULL; END $$"
    ).format(fire_at=sql.Literal(fire_at), message=sql.Literal(FAILURE)))
    conn.execute(sql.SQL(
        "CREATE CONSTRAINT TRIGGER commit_failure AFTER {event} ON {table}"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW {when} EXECUTE FUNCTION commit_failure()"
    ).format(event=sql.SQL(event), table=sql.Identifier(table), when=sql.SQL(when)))


def fired(conn: Conn) -> int:
    row = conn.execute("SELECT last_value, is_called FROM commit_failure_calls").fetchone()
    return row[0] if row[1] else 0


def counted(conn: Conn) -> int:
    return int(conn.execute("SELECT coalesce(sum(messages_deleted), 0) FROM gc_runs").fetchone()[0])


def gone(conn: Conn) -> int:
    return len(GARBAGE) - len(surviving_ids(conn))


FAILURES = {
    # the 3rd checkpoint's commit fails (the WHEN clause keeps start, finish and the archive
    # bookkeeping out: only a batch's checkpoint moves ``batches``)
    "checkpoint": ("gc_runs", "UPDATE", "WHEN (OLD.batches IS DISTINCT FROM NEW.batches)", 3),
    # the commit of the batch deleting the 250th garbage row fails
    "delete": ("messages", "DELETE", "", 250),
}


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
@pytest.mark.parametrize("failing", sorted(FAILURES))
def test_a_batch_whose_commit_fails_is_neither_deleted_nor_counted(
        conn: Conn, dsn: str, failing: str, strategy: str, workers: int) -> None:
    fill(conn, GARBAGE)
    install_delete_audit(conn)
    install_commit_failure(conn, *FAILURES[failing])
    options = GcOptions(strategy=strategy, batch_size=BATCH_ROWS, workers=workers)  # type: ignore[arg-type]

    failed = collect(dsn, options)

    assert fired(conn) >= FAILURES[failing][3], "the trigger never reached its failing call"
    assert failed.status == RunStatus.FAILED, failed
    assert FAILURE in (failed.error or ""), failed.error
    assert 0 < gone(conn) < sum(GARBAGE), "the failure must come after some batches, before the end"
    assert counted(conn) == failed.messages_deleted == gone(conn)
    assert set(live_ids(GARBAGE)) <= set(surviving_ids(conn))

    finished = collect(dsn, options)

    assert finished.status == RunStatus.COMPLETE, finished.error
    assert finished.resumed_from == failed.run_id
    assert surviving_ids(conn) == live_ids(GARBAGE)
    assert counted(conn) == sum(GARBAGE)
    audit = audited_deletions(conn)
    assert len(audit.ids) == sum(GARBAGE) and audit.counted_twice == 0
    assert audit.deleted_while_live == []
    statuses = [row[0] for row in conn.execute("SELECT status FROM gc_runs ORDER BY id")]
    assert statuses == ["superseded", "complete"]
