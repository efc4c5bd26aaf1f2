"""Tools shared by the fault tests: msggc's one-line errors, a switchable callback server on
127.0.0.1, a private embedded PostgreSQL, a DELETE audit and the ledger of measured figures."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.api_support import free_port as free_port  # re-exported: a port nothing listens on
from tests.data import surviving_ids
from tests.polling import wait_until
from tests.standby import msggc_home

Conn = psycopg.Connection[Any]

# --- msggc's answers ---------------------------------------------------------------------------

CLICK_HINTS = ("Usage: ", "Try '")
"""click prints its usage and a help hint around a flag's error line; those are not errors."""


def one_line_error(stderr: str) -> str:
    """The single error line of a refused command (asserts there is exactly one, no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(CLICK_HINTS)]
    assert len(lines) == 1, stderr
    return lines[0]


def notice(body: bytes) -> dict[str, Any]:
    """The ``gc`` object of a completion webhook body."""
    return json.loads(body)["services"][0]["message"]["gc"]


# --- waiting, always bounded ----------------------------------------------------------------------


def gc_backends(conn: Conn) -> int:
    """msggc sessions still connected to this database (a killed client's backend lingers briefly)."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'msggc' AND pid <> pg_backend_pid()"
    ).fetchone()[0]


def wait_for_gc_backends_gone(conn: Conn, timeout_s: float = 20) -> None:
    wait_until(lambda: gc_backends(conn) == 0, timeout_s, "the killed collector's backend to exit")


# --- what the database says happened --------------------------------------------------------------


def counted_deletions(conn: Conn) -> int:
    """Rows the runs say they deleted (each batch adds its count in its own transaction)."""
    return conn.execute("SELECT coalesce(sum(messages_deleted), 0)::bigint FROM gc_runs").fetchone()[0]


def batches_committed(conn: Conn) -> int:
    return conn.execute("SELECT coalesce(sum(batches), 0)::bigint FROM gc_runs").fetchone()[0]


def run_statuses(conn: Conn) -> list[str]:
    return [row[0] for row in conn.execute("SELECT status FROM gc_runs ORDER BY id")]


AUDIT_TABLE = "gc_deleted_audit"


def install_delete_audit(conn: Conn, table: str = "messages") -> None:
    """Record every deleted row version, inside the deleting transaction.

    A statement-level AFTER DELETE trigger with a transition table sees exactly the versions the
    DELETE removed: the last committed version the DELETE re-checked its predicate against.
    """
    conn.execute(sql.SQL(
        "CREATE TABLE {audit} (id bigint NOT NULL, processed_at timestamptz,"
        " deleted_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
        " xid bigint NOT NULL DEFAULT txid_current())"
    ).format(audit=sql.Identifier(AUDIT_TABLE)))
    conn.execute(sql.SQL(
        "CREATE FUNCTION gc_audit_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " INSERT INTO {audit} (id, processed_at) SELECT id, processed_at FROM gone;"
        " RETURN NULL; END $$"
    ).format(audit=sql.Identifier(AUDIT_TABLE)))
    conn.execute(sql.SQL(
        "CREATE TRIGGER gc_audit AFTER DELETE ON {table} REFERENCING OLD TABLE AS gone"
        " FOR EACH STATEMENT EXECUTE FUNCTION gc_audit_delete()"
    ).format(table=sql.Identifier(table)))


@dataclass(frozen=True)
class AuditedDeletions:
    ids: list[int]
    """Deleted ids, one entry per deletion (a duplicate would appear twice)."""
    deleted_while_live: list[int]
    """Ids whose removed version had ``processed_at IS NULL``: must stay empty."""

    @property
    def counted_twice(self) -> int:
        return len(self.ids) - len(set(self.ids))


def audited_deletions(conn: Conn) -> AuditedDeletions:
    rows = conn.execute(sql.SQL("SELECT id, processed_at FROM {} ORDER BY id").format(
        sql.Identifier(AUDIT_TABLE))).fetchall()
    return AuditedDeletions(ids=[r[0] for r in rows], deleted_while_live=[r[0] for r in rows if r[1] is None])


def content_digest(conn: Conn, ids: list[int] | None = None, table: str = "messages") -> str:
    """md5 of whole rows in id order (all rows, or only ``ids``): "the same table", not just ids."""
    query = sql.SQL(
        "SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY t.id)), '') FROM {} t"
        " WHERE %(ids)s::bigint[] IS NULL OR t.id = ANY(%(ids)s)"
    ).format(sql.Identifier(table))
    return conn.execute(query, {"ids": ids}).fetchone()[0]


def outbox_rows(conn: Conn) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT id, run_id, body, attempts, next_attempt_at, delivered_at, last_error"
                       " FROM gc_outbox ORDER BY id")
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur]


# --- a callback server whose behaviour the test switches -------------------------------------------

SLOW_HOLD_S = 3.0
"""How long the slow mode holds a request before answering: beyond every client timeout used."""


class CallbackServer:
    """A real HTTP callback receiver on 127.0.0.1, standing in for the business's server.

    ``mode`` decides each answer: ``ok`` (200, body accepted), ``error`` (500), ``redirect`` (307
    to another path, which must never be followed) or ``slow`` (answers 504 only after
    :data:`SLOW_HOLD_S` or :meth:`release`, far beyond the client's timeout).
    """

    PATH = "/v1/gc-callback"
    ELSEWHERE = "/redirected-here"

    def __init__(self, port: int = 0) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=port, threaded=True)
        self.server.expect_request(self.PATH, method="POST").respond_with_handler(self._answer)
        self.server.expect_request(self.ELSEWHERE).respond_with_handler(self._elsewhere)
        self.mode = "ok"
        self.accepted: list[bytes] = []
        self.attempts = 0
        self.redirect_followed = 0
        self._released = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.server.url_for(self.PATH)

    def start(self) -> CallbackServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.release()
        if self.server.is_running():
            self.server.stop()

    def __enter__(self) -> CallbackServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Let requests held by the slow mode answer now."""
        self._released.set()

    def _answer(self, request: Request) -> Response:
        with self._lock:
            self.attempts += 1
            mode = self.mode
        if mode == "slow":
            self._released.wait(SLOW_HOLD_S)
            return Response("too late", status=504)
        if mode == "error":
            return Response("internal error", status=500)
        if mode == "redirect":
            return Response(status=307, headers={"Location": self.server.url_for(self.ELSEWHERE)})
        with self._lock:
            self.accepted.append(request.get_data())
        return Response("{}", status=200, content_type="application/json")

    def _elsewhere(self, _request: Request) -> Response:
        with self._lock:
            self.redirect_followed += 1
        return Response("{}", status=200)


# --- a private embedded server, free to stop and start -------------------------------------------


class PrivateServer:
    """An embedded PostgreSQL in its own ``MSGGC_HOME``: the session's test server is shared by
    every test, this one a test may stop and restart at will."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def start(self) -> str:
        from engine.tools import embedded

        with msggc_home(self.home):
            return embedded.ensure_running()

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> bool:
        from engine.tools import embedded

        with msggc_home(self.home):
            return embedded.stop(mode)


# --- the figures the suite reports ------------------------------------------------------------------

FIGURES: dict[str, str] = {
    "sigkills": "collector processes killed with SIGKILL mid-run",
    "db_outages": "database restarts or outages mid-run",
    "callback_failures": "failed webhook attempts (down, slow, 500, 3xx)",
    "statement_timeouts": "batches cancelled by statement_timeout",
    "app_transactions": "concurrent application transactions",
    "app_lock_waits_measured": "application UPDATEs timed while GC deleted their rows",
    "bad_inputs": "bad or hostile inputs tried (identifiers, DSNs, roles, tables, flags, bodies)",
    "api_requests_fuzzed": "schemathesis requests against the OpenAPI schema",
    "indexes_checked": "indexes verified by amcheck after GC",
    "rows_checked": "rows whose fate was checked",
    "rows_deleted_while_live": "rows lost (deleted while not garbage)",
    "garbage_left": "garbage rows left behind",
    "rows_counted_twice": "rows counted twice",
    "notifications_duplicated": "duplicate notifications",
    "notifications_lost": "notifications lost",
}


@dataclass
class Ledger:
    """Counts measured by the tests; printed at the end of the run for the README."""

    counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **figures: int) -> None:
        unknown = set(figures) - set(FIGURES)
        assert not unknown, f"unknown figures {unknown}"
        with self._lock:
            self.counts.update(figures)

    def lines(self) -> list[str]:
        return [f"| {label} | {self.counts.get(key, 0):,} |" for key, label in FIGURES.items()]


@dataclass(frozen=True)
class Fate:
    """What became of the rows of a table made by :func:`tests.data.fill`, after GC."""

    checked: int
    deleted_while_live: int
    garbage_left: int
    counted_twice: int

    def figures(self) -> dict[str, int]:
        return {"rows_checked": self.checked, "rows_deleted_while_live": self.deleted_while_live,
                "garbage_left": self.garbage_left, "rows_counted_twice": self.counted_twice}


def table_fate(conn: Conn, garbage: list[bool]) -> Fate:
    survivors = set(surviving_ids(conn))
    gone = [i for i in range(1, len(garbage) + 1) if i not in survivors]
    return Fate(
        checked=len(garbage),
        deleted_while_live=sum(1 for i in gone if not garbage[i - 1]),
        garbage_left=sum(1 for i in survivors if garbage[i - 1]),
        counted_twice=counted_deletions(conn) - len(gone),
    )
