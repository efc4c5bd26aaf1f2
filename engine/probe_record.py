"""What the latency probe records: its ``gc_probe`` row (live figures per table and node) and
the run's figures and time series in ``gc_runs``; and reading them back for the service's views.

Every write here is short and gives way: the probe must never hold up the run or the application
for the sake of a record (a lost write costs a live view a few seconds, never a run).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine.db import APPLICATION_NAME, Connection, connect
from engine.errors import MsggcError, SchemaMissing
from engine.guard_series import Point

PROBE_APPLICATION_NAME = f"{APPLICATION_NAME}-probe"

CLAIM_SQL = """
INSERT INTO gc_probe (table_name, node, run_id, beats, beat_at)
VALUES (%(table)s, %(node)s, %(run_id)s, 0, now())
ON CONFLICT (table_name, node) DO UPDATE
SET run_id = excluded.run_id, beats = 0, beat_at = now(), p50_ms = NULL, p99_ms = NULL,
    held_back_seconds = 0, rate_share = 1, rate_bytes_per_s = NULL, wal_bytes_per_s = NULL,
    checkpoints_requested = 0, before_p99_ms = NULL
"""
BEAT_SQL = """
UPDATE gc_probe SET beats = beats + 1, beat_at = now(), p50_ms = %(p50)s, p99_ms = %(p99)s,
    held_back_seconds = %(held)s, rate_share = %(share)s, rate_bytes_per_s = %(rate)s,
    wal_bytes_per_s = %(wal_rate)s, checkpoints_requested = %(checkpoints)s,
    before_p99_ms = %(before_p99)s
WHERE table_name = %(table)s AND node = %(node)s
"""
FINAL_SQL = """
UPDATE gc_probe SET p50_ms = %(p50)s, p99_ms = %(p99)s, held_back_seconds = %(held)s,
    rate_share = %(share)s, checkpoints_requested = %(checkpoints)s, before_p99_ms = %(before_p99)s
WHERE table_name = %(table)s AND node = %(node)s AND run_id = %(run_id)s
"""
"""The run's figures over all its samples, left in the row once it ended (not a beat)."""
LIVE_SERIES_SQL = "UPDATE gc_runs SET guard_series = %(series)s WHERE id = %(run_id)s"
LIVE_SERIES_SETTINGS = ("SET LOCAL synchronous_commit = off", "SET LOCAL lock_timeout = '100ms'")
"""A batch checkpointing the run holds its row until it commits: a live write that would wait
longer than 100 ms is skipped (the next one, or the run's end, writes the series)."""
RUN_SQL = """
UPDATE gc_runs SET app_latency_p50_ms = %(p50)s, app_latency_p99_ms = %(p99)s,
    app_probes = %(probes)s, held_back_seconds = %(held)s,
    app_latency_before_p99_ms = %(before_p99)s, guard_series = %(series)s,
    options = options || coalesce(%(measured_again)s, '{}'::jsonb)
WHERE id = %(run_id)s
"""

log = logging.getLogger("msggc.guard")


@dataclass(frozen=True)
class ProbeSite:
    """Where a run's probe writes: its ``gc_probe`` row (one per table and node) and its run."""

    dsn: str
    run_id: int
    table: str
    node: str

    @property
    def params(self) -> dict[str, Any]:
        return {"table": self.table, "node": self.node, "run_id": self.run_id}


def require_probe_table(conn: Connection) -> None:
    """``--max-app-latency`` needs ``gc_probe`` (0008) with the rate columns of 0011: refused
    before the run exists."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('gc_probe')"
        " AND attname = 'rate_bytes_per_s' AND NOT attisdropped)").fetchone()
    if not row or not row[0]:
        raise SchemaMissing("--max-app-latency needs msggc's gc_probe table as of migration 0011:"
                            " run `msggc migrate` first")


def write_series(conn: Connection, run_id: int, points: list[Point]) -> None:
    """The series so far into the run's row, in a short transaction of its own that waits for
    no WAL flush (a lost write costs two seconds of a live view, never the run) and for no
    lock long (``LIVE_SERIES_SETTINGS``)."""
    try:
        with conn.transaction():
            for setting in LIVE_SERIES_SETTINGS:
                conn.execute(setting)
            conn.execute(LIVE_SERIES_SQL, {"run_id": run_id, "series": Jsonb(points)})
    except psycopg.errors.LockNotAvailable:
        pass


def record_final(site: ProbeSite, figures: dict[str, Any], share: float,
                 measured_again_from: float | None) -> None:
    """The run's final figures in ``gc_runs`` and ``gc_probe``, each committed alone on a
    connection of its own (the probe's may be the one a cancel just hit), never waiting long
    on a lock: a failure loses only the record, never holds up the run's close."""
    params = {**site.params, "p50": figures["app_latency_p50_ms"],
              "p99": figures["app_latency_p99_ms"], "probes": figures["app_probes"],
              "held": figures["held_back_s"], "share": share,
              "before_p99": figures["app_latency_before_p99_ms"],
              "checkpoints": figures["checkpoints_requested"],
              "series": Jsonb(figures["guard_series"]),
              "measured_again": None if measured_again_from is None else Jsonb({
                  "max_app_latency_ms": figures["app_latency_budget_ms"],
                  "app_latency_budget_measured_again_from_ms": measured_again_from})}
    try:
        with connect(site.dsn) as conn:
            conn.execute("SELECT set_config('application_name', %s, false)", (PROBE_APPLICATION_NAME,))
            conn.execute("SET lock_timeout = '200ms'")  # the row the application may hold: skipped
            conn.execute(RUN_SQL, params)
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                conn.execute(FINAL_SQL, params)
    except (psycopg.Error, MsggcError) as exc:
        log.warning("run %s: latency probe figures not recorded: %s", site.run_id, str(exc).strip())


def latest_figures(conn: Connection, table: str, node: str) -> dict[str, Any] | None:
    """The probe row of this table and node: the live (or last run's final) latency figures, and
    the backend writes of its run's series as last written (:data:`LIVE_SERIES_STEPS`); None
    before any guarded run, or on a schema older than the probe's (0008) or its rates' (0011)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('gc_probe')"
        " AND attname = 'rate_bytes_per_s' AND NOT attisdropped)").fetchone()
    if not row or not row[0]:
        return None
    cur = conn.execute(
        "SELECT run_id, beats, p50_ms, p99_ms, held_back_seconds, rate_share, rate_bytes_per_s,"
        " wal_bytes_per_s, checkpoints_requested, before_p99_ms,"
        " (SELECT (guard_series -> -1 ->> 'backend_writes')::bigint FROM gc_runs r"
        "  WHERE r.id = p.run_id) AS backend_writes"
        " FROM gc_probe p WHERE table_name = %s AND node = %s",
        (table, node),
    )
    found = cur.fetchone()
    if found is None:
        return None
    return dict(zip([c.name for c in cur.description or []], found, strict=True))
