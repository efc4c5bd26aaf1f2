"""The callback server down, slow, failing or redirecting: the notice stays queued with its
attempts and last error, retries are bounded, and once the server recovers it arrives exactly once."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions
from engine.service import outbox
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from tests.data import fill
from tests.faults.helpers import CallbackServer, Conn, Ledger, free_port, outbox_rows
from tests.polling import wait_until

CLIENT_TIMEOUT_S = 0.3
DELIVERY_ATTEMPTS = 3
"""``outbox.deliver_run``'s quick retries at the end of a run."""

FAULTS = {
    "down": "Connection refused",
    "slow": "timed out",
    "error": "answered 500",
    "redirect": "answered 307",
}


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> float:
    """Backoff of 0.2 s doubling, instead of 1 s: the same schedule, fast enough for a test, and
    long enough (0.8 s after the third attempt) that a loaded machine still sees it back off."""
    monkeypatch.setattr(outbox, "BACKOFF_BASE_S", 0.2)
    return 0.2


def notifier_for(url: str) -> WebhookNotifier:
    return WebhookNotifier(url, timeout_s=CLIENT_TIMEOUT_S)


def finisher_for(url: str) -> NoticeFinisher:
    return NoticeFinisher(notifier_for(url))


def is_due(conn: Conn) -> bool:
    return conn.execute("SELECT bool_and(next_attempt_at <= now()) FROM gc_outbox").fetchone()[0]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_callback_server_loses_nothing_and_gets_the_notice_once_it_recovers(
    conn: Conn, dsn: str, fault: str, quick_backoff: float, ledger: Ledger
) -> None:
    fill(conn, [True] * 200)
    server = CallbackServer(port=free_port())
    if fault != "down":  # down: nothing listens on the port yet
        server.start()
        server.mode = fault
    try:
        began = time.monotonic()
        result = collect(dsn, GcOptions(), finisher_for(server.url))
        took = time.monotonic() - began

        assert result.status == "complete" and result.messages_deleted == 200  # GC is unaffected
        assert FAULTS[fault] in (result.notification_error or "")
        [queued] = outbox_rows(conn)
        assert queued["delivered_at"] is None
        assert queued["attempts"] == DELIVERY_ATTEMPTS
        assert FAULTS[fault] in queued["last_error"]
        # bounded: three attempts of at most the client timeout, and two short backoffs
        assert took < DELIVERY_ATTEMPTS * (CLIENT_TIMEOUT_S + 0.5) + 3 * quick_backoff + 2.0
        assert server.accepted == [] and server.redirect_followed == 0
        assert not is_due(conn)  # backed off: the next attempt waits
        assert outbox.deliver_due(conn, notifier_for) == (0, 0)

        if fault == "down":
            server.start()
        server.mode = "ok"
        server.release()
        wait_until(lambda: is_due(conn), 5, "the backoff to expire")
        passes = [outbox.deliver_due(conn, notifier_for) for _ in range(4)]
    finally:
        server.stop()

    ledger.add(callback_failures=queued["attempts"], notifications_lost=1 - min(1, len(server.accepted)),
               notifications_duplicated=max(0, len(server.accepted) - 1))
    assert passes == [(1, 0), (0, 0), (0, 0), (0, 0)]
    assert server.accepted == [queued["body"].encode()]
    [delivered] = outbox_rows(conn)
    assert delivered["delivered_at"] is not None and delivered["last_error"] is None
    assert delivered["attempts"] == DELIVERY_ATTEMPTS + 1


def test_two_deliverers_at_once_post_a_notice_once(conn: Conn, dsn: str, callback: CallbackServer,
                                                   quick_backoff: float, ledger: Ledger) -> None:
    fill(conn, [True] * 10)
    callback.mode = "error"
    collect(dsn, GcOptions(), finisher_for(callback.url))
    callback.mode = "ok"
    conn.execute("UPDATE gc_outbox SET next_attempt_at = now()")
    start = threading.Barrier(4)
    outcomes: list[tuple[int, int]] = []

    def deliverer() -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            start.wait(10)
            outcomes.append(outbox.deliver_due(own, notifier_for))

    threads = [threading.Thread(target=deliverer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    ledger.add(notifications_duplicated=max(0, len(callback.accepted) - 1))
    assert sorted(outcomes) == [(0, 0), (0, 0), (0, 0), (1, 0)]
    assert len(callback.accepted) == 1


def test_every_attempt_of_a_notice_carries_the_same_delivery_id(conn: Conn, dsn: str, httpserver,
                                                                quick_backoff: float) -> None:
    """Receivers can drop the duplicate that at-least-once delivery allows."""
    from werkzeug import Response

    from engine.service.notify import DELIVERY_HEADER

    fill(conn, [True] * 10)
    httpserver.expect_ordered_request("/gc", method="POST").respond_with_response(Response(status=500))
    httpserver.expect_ordered_request("/gc", method="POST").respond_with_data("ok")
    result = collect(dsn, GcOptions(), finisher_for(httpserver.url_for("/gc")))

    assert result.notification_error is None
    outbox_id = conn.execute("SELECT id FROM gc_outbox").fetchone()[0]
    assert [request.headers[DELIVERY_HEADER] for request, _ in httpserver.log] == [str(outbox_id)] * 2
