"""statement_timeout hit by batches: each cancelled batch is split and retried smaller, never
skipped; when even one row outlasts the timeout the run fails cleanly (1014) at that row, and the
next run resumes there."""

from __future__ import annotations

import pytest

from engine import collect, sizer
from engine.config import GcOptions
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from tests.data import fill, surviving_ids
from tests.faults.helpers import CallbackServer, Conn, Ledger, counted_deletions, notice

STUCK_ID = 30


@pytest.fixture
def cancellations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches cancelled by statement_timeout (each one makes the sizer shrink)."""
    seen: list[int] = []
    shrink = sizer.BatchSizer.shrink

    def counting(self: sizer.BatchSizer) -> bool:
        seen.append(self.size)
        return shrink(self)

    monkeypatch.setattr(sizer.BatchSizer, "shrink", counting)
    return seen


def test_a_row_that_outlasts_statement_timeout_fails_the_run_there_and_the_next_run_resumes(
    conn: Conn, dsn: str, callback: CallbackServer, cancellations: list[int], ledger: Ledger
) -> None:
    fill(conn, [True] * 50)
    conn.execute(
        "CREATE FUNCTION stuck_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF OLD.id = {STUCK_ID} THEN PERFORM pg_sleep(0.5); END IF; RETURN OLD; END $$"
    )
    conn.execute("CREATE TRIGGER stuck BEFORE DELETE ON messages FOR EACH ROW EXECUTE FUNCTION stuck_row()")

    failed = collect(dsn, GcOptions(strategy="index", batch_size=16, statement_timeout_ms=100),
                     NoticeFinisher(WebhookNotifier(callback.url)))
    kept_after_failure = surviving_ids(conn)
    conn.execute("DROP TRIGGER stuck ON messages")
    resumed = collect(dsn, GcOptions(strategy="index"), NoticeFinisher(WebhookNotifier(callback.url)))
    ledger.add(statement_timeouts=len(cancellations), rows_checked=50,
               garbage_left=len(surviving_ids(conn)), rows_counted_twice=counted_deletions(conn) - 50)

    assert cancellations == [16, 8, 4, 2, 1]  # split down to the one row, never past it
    assert failed.status == "failed" and "still exceeds statement_timeout" in (failed.error or "")
    assert kept_after_failure == list(range(STUCK_ID, 51))  # everything before it went, nothing skipped
    first, second = (notice(body) for body in callback.accepted)
    assert first["status"] == "failed" and first["errors"][0]["code"] == 1014
    assert first["messages_deleted"] == STUCK_ID - 1
    assert resumed.status == "complete" and resumed.messages_deleted == 51 - STUCK_ID
    assert second == {"messages_deleted": 51 - STUCK_ID, "status": "complete"}
    assert surviving_ids(conn) == [] and counted_deletions(conn) == 50
