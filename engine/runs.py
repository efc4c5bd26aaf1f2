"""The ``gc_runs`` bookkeeping: one row per run, its checkpoint and its end.

The checkpoint is written in the same transaction as the batch it records, so the row always
says exactly which part of the table has been collected and how many rows that removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from psycopg.types.json import Jsonb

from engine import progress
from engine.config import StrategyName
from engine.db import Connection, one_row
from engine.status import ACTIVE, FINISHED, RESUMABLE, RunStatus
from engine.strategies import Slice

ENDED_KEY = "ended"
"""In a superseded run's ``options``: the status it had when a later run took over its walk."""

ADVISORY_LOCK_CLASS = 0x6D736763
"""First key of msggc's advisory locks ('msgc'); the second is the table's oid."""


@dataclass
class Run:
    id: int
    strategy: StrategyName
    slices: list[Slice]
    resumed_from: int | None
    key: tuple[str, ...] | None = None
    """The key its keyset positions are values of (None: recorded before runs recorded it)."""
    continues: bool = False
    """It walks on from an earlier run's checkpoint: garbage may have appeared where that run
    had already been, so every leg is swept after the walk."""

    def continues_with(self, key: tuple[str, ...]) -> bool:
        """Its positions mean something for a walk on ``key``: block numbers always do."""
        return self.strategy == "physical" or self.key is None or self.key == key


def try_lock_table(conn: Connection, oid: int) -> bool:
    """Session-level: released by the server if this process dies, so a crash never wedges GC."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s::oid::int)", (ADVISORY_LOCK_CLASS, oid))
    return bool(one_row(row)[0])


def unlock_table(conn: Connection, oid: int) -> None:
    """Release it now: the server releases a closing session's locks only as its backend exits,
    after the client has moved on, and a GC started right after would find the table busy."""
    conn.execute("SELECT pg_advisory_unlock(%s, %s::oid::int)", (ADVISORY_LOCK_CLASS, oid))


def lock_holder(conn: Connection, oid: int) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = %s AND objid = %s::oid LIMIT 1",
        (ADVISORY_LOCK_CLASS, oid),
    ).fetchone()
    return row[0] if row else None


def _slices(cursor: dict[str, Any]) -> list[Slice]:
    return [Slice.of_json(part) for part in cursor["slices"]]


def latest_resumable(conn: Connection, table: str, node: str, exclude: int | None = None) -> Run | None:
    """The newest unfinished walk of this table and node: the next run continues it."""
    row = conn.execute(
        "SELECT id, strategy, cursor, resumed_from FROM gc_runs"
        " WHERE table_name = %s AND node = %s AND status = ANY(%s) AND cursor IS NOT NULL"
        " AND strategy IS DISTINCT FROM 'compact' AND id IS DISTINCT FROM %s ORDER BY id DESC LIMIT 1",
        (table, node, list(RESUMABLE), exclude),
    ).fetchone()
    if row is None:
        return None
    run_id, strategy, cursor, resumed_from = row
    return Run(run_id, cast(StrategyName, strategy), _slices(cursor), resumed_from, _key(cursor))


def resumable_archive_file(conn: Connection, table: str, node: str) -> Path | None:
    """The archive file the next run of this table and node would continue, if any."""
    previous = latest_resumable(conn, table, node)
    state = archive_state_to_continue(conn, previous.id) if previous else None
    return Path(state[0]) if state else None


QUEUED_MARK = "queued"
"""Option set on runs queued by :func:`enqueue`: their worker posts the service's webhook."""


def enqueue(conn: Connection, table: str, node: str, options: dict[str, Any]) -> int:
    """A queued run, claimed later by a worker (the HTTP API's way to start a GC)."""
    row = one_row(conn.execute(
        "INSERT INTO gc_runs (node, table_name, status, options) VALUES (%s, %s, 'queued', %s)"
        " RETURNING id",
        (node, table, Jsonb({**options, QUEUED_MARK: True})),
    ))
    return int(row[0])


def record_unstarted(conn: Connection, table: str, node: str, error: str, options: dict[str, Any]) -> int:
    """A requested run that could not start, closed at once as ``failed``: the record its failure
    notice is queued with (its node's database may be another's, see ``gc_runs.node``)."""
    row = one_row(conn.execute(
        "INSERT INTO gc_runs (node, table_name, status, options, error, finished_at)"
        " VALUES (%s, %s, 'failed', %s, %s, now()) RETURNING id",
        (node, table, Jsonb(options), error),
    ))
    return int(row[0])


def walked_so_far(conn: Connection, run_id: int) -> Run | None:
    """A run that already walked part of the table (a worker died): it goes on in place."""
    row = conn.execute(
        "SELECT strategy, cursor, resumed_from FROM gc_runs WHERE id = %s AND cursor IS NOT NULL"
        " AND strategy IS DISTINCT FROM 'compact'",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        "UPDATE gc_runs SET status = 'running', heartbeat_at = now(), error = NULL WHERE id = %s",
        (run_id,),
    )
    return Run(id=run_id, strategy=cast(StrategyName, row[0]), slices=_slices(row[1]), resumed_from=row[2],
               key=_key(row[1]))


def start(conn: Connection, table: str, node: str, strategy: StrategyName, slices: list[Slice],
          options: dict[str, Any], resumed_from: int | None, run_id: int | None = None,
          garbage: str | None = None, key: tuple[str, ...] = ()) -> Run:
    """Open a running row (or promote the queued ``run_id``); a resumed predecessor is marked
    superseded in the same transaction, keeping how it ended (``ENDED_KEY``)."""
    with conn.transaction():
        if resumed_from is not None:
            conn.execute(
                "UPDATE gc_runs SET status = 'superseded', finished_at = coalesce(finished_at, now()),"
                " options = options || jsonb_build_object(%s::text, status) WHERE id = %s",
                (ENDED_KEY, resumed_from),
            )
            forget_sweep(conn, resumed_from)
        values = (strategy, Jsonb(_cursor(slices, key)), resumed_from, garbage)
        if run_id is None:
            run_id = int(one_row(conn.execute(
                "INSERT INTO gc_runs (node, table_name, status, strategy, cursor, resumed_from, garbage,"
                " options, started_at, heartbeat_at)"
                " VALUES (%s, %s, 'running', %s, %s, %s, %s, %s, now(), now()) RETURNING id",
                (node, table, *values, Jsonb(options)),
            ))[0])
        else:
            conn.execute(
                "UPDATE gc_runs SET status = 'running', strategy = %s, cursor = %s, resumed_from = %s,"
                " garbage = %s, started_at = now(), heartbeat_at = now() WHERE id = %s",
                (*values, run_id),
            )
    return Run(id=run_id, strategy=strategy, slices=slices, resumed_from=resumed_from, key=key)


def forget_sweep(conn: Connection, run_id: int) -> None:
    """The keys a run's sweep read are its own: dropped when it closes or is superseded."""
    conn.execute("DELETE FROM gc_sweep WHERE run_id = %s", (run_id,))


def _cursor(slices: list[Slice], key: tuple[str, ...]) -> dict[str, Any]:
    return {"slices": [s.as_json() for s in slices], "key": list(key)}


def _key(cursor: dict[str, Any]) -> tuple[str, ...] | None:
    return tuple(cursor["key"]) if "key" in cursor else None


def checkpoint(conn: Connection, run_id: int, slice_index: int, part: Slice, deleted: int,
               skipped_locked: int, archive_bytes: int | None = None,
               foreign_keys: dict[str, int] | None = None, live: progress.Live | None = None) -> None:
    """Called inside the batch's transaction: the delete and its record commit together.
    ``foreign_keys`` holds the run's totals so far, this batch's included; with ``live``, the
    batch also carries a sample of the run's progress (:mod:`engine.progress`)."""
    conn.execute(
        "UPDATE gc_runs SET"
        " cursor = jsonb_set(cursor, ARRAY['slices', %(i)s::text], %(part)s),"
        f" {progress.SAMPLED},"
        " messages_deleted = messages_deleted + %(deleted)s,"
        " rows_skipped_locked = rows_skipped_locked + %(skipped)s,"
        " archive_bytes = coalesce(%(archived)s, archive_bytes),"
        " foreign_keys = coalesce(%(foreign_keys)s, foreign_keys),"
        " batches = batches + 1, heartbeat_at = now()"
        " WHERE id = %(run)s",
        {"i": slice_index, "part": Jsonb(part.as_json()), "deleted": deleted, "skipped": skipped_locked,
         "archived": archive_bytes, "foreign_keys": Jsonb(foreign_keys) if foreign_keys else None,
         "sample": progress.sample_param(live), "run": run_id},
    )


def add_slice(conn: Connection, run_id: int, part: Slice) -> None:
    """A slice added to the run's walk (its index is the next one: checkpoints address it)."""
    conn.execute("UPDATE gc_runs SET cursor = jsonb_set(cursor, '{slices}', (cursor -> 'slices') || %s)"
                 " WHERE id = %s", (Jsonb([part.as_json()]), run_id))


def add_sweep(conn: Connection, run_id: int, part: Slice | None, retried: int) -> None:
    """A sweep's slice added (None: the sweep found nothing); the rows the walk had skipped as
    locked are the sweep's to count now (it read them again)."""
    if part is not None:
        add_slice(conn, run_id, part)
    conn.execute("UPDATE gc_runs SET rows_skipped_locked = rows_skipped_locked - %s WHERE id = %s",
                 (retried, run_id))


def record_detached(conn: Connection, run_id: int, leaf: str, parent: str, bound: str) -> None:
    """In the detach's transaction: a run killed before the drop is finished by the next one,
    which finds the leaf here (:func:`engine.partitions.recover`)."""
    conn.execute(
        "UPDATE gc_runs SET cursor = jsonb_set(cursor, '{detaching}',"
        " coalesce(nullif(cursor -> 'detaching', 'null'), '{}') || jsonb_build_object(%s::text, %s::jsonb))"
        " WHERE id = %s",
        (leaf, Jsonb({"leaf": leaf, "parent": parent, "bound": bound}), run_id))


def unfinished_detaches(conn: Connection) -> list[tuple[int, dict[str, str]]]:
    """``(run id, record)`` of every leaf a run recorded before detaching it (versions that
    detached and dropped in two steps) and did not see through. A record is a single leaf in
    runs from before several workers dropped side by side."""
    rows = conn.execute("SELECT id, cursor -> 'detaching' FROM gc_runs"
                        " WHERE cursor -> 'detaching' NOT IN ('null', '{}') ORDER BY id").fetchall()
    return [(run_id, leaf) for run_id, recorded in rows
            for leaf in ([recorded] if "leaf" in recorded else recorded.values())]


def forget_detached(conn: Connection, run_id: int, leaf: str) -> None:
    """The leaf is attached again (or gone): its record is done with."""
    conn.execute("UPDATE gc_runs SET cursor = CASE WHEN cursor #>> '{detaching,leaf}' = %(leaf)s"
                 " THEN cursor - 'detaching' ELSE cursor #- ARRAY['detaching', %(leaf)s] END"
                 " WHERE id = %(run)s",
                 {"leaf": leaf, "run": run_id})


def record_drop(conn: Connection, run_id: int, leaf: str, rows: int) -> None:
    """In the drop's transaction: its rows count as deleted, the leaf's slices are done."""
    conn.execute(
        "UPDATE gc_runs SET messages_deleted = messages_deleted + %(rows)s, batches = batches + 1,"
        " heartbeat_at = now(), cursor = jsonb_set(cursor #- ARRAY['detaching', %(leaf)s],"
        " '{slices}', (SELECT jsonb_agg(CASE WHEN s ->> 'leaf' = %(leaf)s"
        "   THEN jsonb_set(s, '{finished}', 'true') ELSE s END ORDER BY n)"
        "   FROM jsonb_array_elements(cursor -> 'slices') WITH ORDINALITY AS e(s, n)))"
        " || jsonb_build_object('dropped',"
        "   coalesce(cursor -> 'dropped', '{}') || jsonb_build_object(%(leaf)s::text, %(rows)s))"
        " WHERE id = %(run)s",
        {"rows": rows, "leaf": leaf, "run": run_id},
    )


def dropped_rows(conn: Connection, run_id: int, leaf: str) -> int | None:
    """The rows :func:`record_drop` counted for the leaf, or None when the run dropped no such leaf."""
    rows = one_row(conn.execute("SELECT (cursor -> 'dropped' ->> %s)::bigint FROM gc_runs WHERE id = %s",
                                (leaf, run_id)))[0]
    return None if rows is None else int(rows)


def recorded_slices(conn: Connection, run_id: int) -> list[Slice]:
    """Where each slice of the run stands as of its last committed (and kept) checkpoint."""
    row = one_row(conn.execute("SELECT cursor FROM gc_runs WHERE id = %s", (run_id,)))
    return _slices(row[0])


def archive_state(conn: Connection, run_id: int) -> tuple[str, int] | None:
    """The run's archive file and its committed length, if it wrote one."""
    row = conn.execute(
        "SELECT archive_file, archive_bytes FROM gc_runs WHERE id = %s AND archive_file IS NOT NULL",
        (run_id,),
    ).fetchone()
    return (row[0], row[1]) if row else None


def archive_state_to_continue(conn: Connection, run_id: int) -> tuple[str, int] | None:
    """The archive file and committed length of the run or, if it recorded none, of the nearest run
    it resumes: a run killed after it started and before it recorded its file leaves its
    predecessor's file the one its resumption continues (one step back was not enough: the
    resumption refused that file as 'already exists')."""
    row = conn.execute(
        "WITH RECURSIVE chain AS ("
        " SELECT id, resumed_from, archive_file, archive_bytes, 0 AS depth FROM gc_runs WHERE id = %s"
        " UNION ALL SELECT r.id, r.resumed_from, r.archive_file, r.archive_bytes, c.depth + 1"
        " FROM gc_runs r JOIN chain c ON r.id = c.resumed_from WHERE c.archive_file IS NULL)"
        " SELECT archive_file, archive_bytes FROM chain WHERE archive_file IS NOT NULL"
        " ORDER BY depth LIMIT 1",
        (run_id,),
    ).fetchone()
    return (row[0], row[1]) if row else None


def record_archive(conn: Connection, run_id: int, path: str | None, size: int | None) -> None:
    """The run's archive file and its committed length (0: claimed, not yet created)."""
    conn.execute("UPDATE gc_runs SET archive_file = %s, archive_bytes = %s WHERE id = %s",
                 (path, size, run_id))


def finish(conn: Connection, run_id: int, status: RunStatus, error: str | None,
           throttle_pauses: int = 0, throttled_s: float = 0.0) -> int:
    """Close the run; returns the rows it deleted, as committed batch by batch."""
    row = one_row(conn.execute(
        "UPDATE gc_runs SET status = %s, error = %s, finished_at = now(), heartbeat_at = now(),"
        f" progress = {progress.POINT},"
        " throttle_pauses = throttle_pauses + %s, throttled_seconds = throttled_seconds + %s"
        " WHERE id = %s RETURNING messages_deleted",
        (status, error, throttle_pauses, throttled_s, run_id),
    ))
    forget_sweep(conn, run_id)
    return int(row[0])


def record_reclaim(conn: Connection, run_id: int, space: dict[str, Any]) -> None:
    conn.execute("UPDATE gc_runs SET reclaim = %s WHERE id = %s", (Jsonb(space), run_id))


BUDGET_COLUMNS = (
    "(options ->> 'max_app_latency_ms')::float8 AS app_latency_budget_ms,"
    " coalesce((options ->> 'app_latency_auto')::boolean, false) AS app_latency_auto,"
    " options -> 'app_latency_baseline' AS app_latency_baseline"
)
"""A run's latency budget as it went by it: the number (set, or what ``auto`` resolved to, NULL
while an ``auto`` one is not measured yet) and, for ``auto``, the measurement it came from
(the keys are :data:`engine.baseline.AUTO_MARK` and :data:`engine.baseline.RECORD_KEY`)."""


def recent(conn: Connection, limit: int = 10) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT id, node, table_name, status, strategy, messages_deleted, rows_skipped_locked,"
        " batches, throttle_pauses, throttled_seconds, reclaim, garbage, foreign_keys, started_at,"
        " finished_at, error, app_latency_p50_ms, app_latency_p99_ms, app_probes, held_back_seconds,"
        " app_latency_before_p99_ms, guard_series, " + BUDGET_COLUMNS +
        " FROM gc_runs ORDER BY id DESC LIMIT %s",
        (limit,),
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur]


# -- the service's queue: enqueue or join, claim, status ------------------------------------

ENQUEUE_LOCK_CLASS = ADVISORY_LOCK_CLASS + 1
"""Transaction-level lock key serialising enqueuers of one table and node."""


def enqueue_or_join(conn: Connection, table: str, node: str, options: dict[str, Any]) -> tuple[int, bool]:
    """The active run of this table and node, or a new queued one: ``(run id, joined)``.

    Check and insert happen under one advisory transaction lock, so two PUTs racing on two
    API processes still leave one active run. Only a queued run is joined: a GC started
    elsewhere (``msggc gc``) posts no webhook to the service's callback, so a PUT meeting one
    queues a run that waits for the table, then collects what is left and notifies.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                     (ENQUEUE_LOCK_CLASS, f"{table}\x1f{node}"))
        row = conn.execute(
            "SELECT id FROM gc_runs WHERE table_name = %s AND node = %s AND status = ANY(%s)"
            " AND options ? %s ORDER BY id DESC LIMIT 1",
            (table, node, list(ACTIVE), QUEUED_MARK),
        ).fetchone()
        if row is not None:
            return row[0], True
        return enqueue(conn, table, node, options), False


def claim(conn: Connection, table: str, node: str, stale_after_s: float) -> tuple[int, dict[str, Any]] | None:
    """Take the oldest queued run, or a running one whose heartbeat is stale (its worker died).

    ``SKIP LOCKED`` plus the re-check of the row after locking: two workers never claim the same
    run. The claim refreshes the heartbeat so other workers leave it alone from now on.
    """
    row = conn.execute(
        "UPDATE gc_runs SET status = 'running', heartbeat_at = now()"
        " WHERE id = (SELECT id FROM gc_runs WHERE table_name = %(table)s AND node = %(node)s"
        " AND (status = 'queued' OR (status = 'running' AND (heartbeat_at IS NULL"
        " OR heartbeat_at < now() - make_interval(secs => %(stale)s))))"
        " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
        " RETURNING id, options",
        {"table": table, "node": node, "stale": stale_after_s},
    ).fetchone()
    return (row[0], row[1]) if row else None


def release(conn: Connection, run_id: int) -> None:
    """Hand back a claimed run that could not take its table: queued again if it never walked."""
    conn.execute(
        "UPDATE gc_runs SET status = 'queued', heartbeat_at = NULL"
        " WHERE id = %s AND status = 'running' AND cursor IS NULL",
        (run_id,),
    )


def latest(conn: Connection, table: str, node: str) -> dict[str, Any] | None:
    """The newest run of this table and node with its speed, for the API's status answer."""
    cur = conn.execute(
        "SELECT id AS run_id, status, messages_deleted, batches, requested_at, started_at,"
        " finished_at, heartbeat_at, error, throttle_pauses, throttled_seconds, reclaim, garbage,"
        " foreign_keys, app_latency_p50_ms, app_latency_p99_ms, held_back_seconds,"
        " app_latency_before_p99_ms, guard_series, " + BUDGET_COLUMNS + ","
        " round((messages_deleted / greatest(extract(epoch FROM"
        "   coalesce(finished_at, heartbeat_at) - started_at), 0.001))::numeric, 1)::float8 AS rows_per_s"
        " FROM gc_runs WHERE table_name = %s AND node = %s ORDER BY id DESC LIMIT 1",
        (table, node),
    )
    row = cur.fetchone()
    if row is None:
        return None
    names = [c.name for c in cur.description or []]
    return dict(zip(names, row, strict=True))


def newest(conn: Connection, table: str, node: str, limit: int) -> list[dict[str, Any]]:
    """The newest runs of this table and node, newest first, with their options and progress
    (the status page's recent runs)."""
    cur = conn.execute(
        "SELECT id AS run_id, status, strategy, options, progress, messages_deleted, rows_skipped_locked,"
        " batches, throttle_pauses, throttled_seconds, foreign_keys, requested_at, started_at,"
        " heartbeat_at, finished_at, error, app_latency_p50_ms, app_latency_p99_ms, held_back_seconds,"
        " app_latency_before_p99_ms"
        " FROM gc_runs WHERE table_name = %s AND node = %s ORDER BY id DESC LIMIT %s",
        (table, node, limit),
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur]


def totals(conn: Connection, table: str, node: str) -> dict[str, tuple[int, int]]:
    """Per status: (runs, rows they deleted); the metrics read these at scrape time."""
    rows = conn.execute(
        "SELECT status, count(*), coalesce(sum(messages_deleted), 0)::bigint FROM gc_runs"
        " WHERE table_name = %s AND node = %s GROUP BY status",
        (table, node),
    )
    return {status: (count, deleted) for status, count, deleted in rows}



SIGNALS_SQL = """
SELECT last.status AS last_status, extract(epoch FROM last.finished_at)::float8 AS last_finished,
       runs.progress, runs.throttled_seconds, runs.throttle_pauses
FROM (SELECT extract(epoch FROM max(heartbeat_at) FILTER (WHERE status = 'running'))::float8 AS progress,
             coalesce(sum(throttled_seconds), 0)::float8 AS throttled_seconds,
             coalesce(sum(throttle_pauses), 0)::bigint AS throttle_pauses
      FROM gc_runs WHERE table_name = %(table)s AND node = %(node)s) AS runs
LEFT JOIN LATERAL (SELECT ended.status, finished_at FROM gc_runs,
                   LATERAL (SELECT CASE status WHEN 'superseded' THEN options ->> %(ended)s::text
                                   ELSE status END AS status) AS ended
                   WHERE table_name = %(table)s AND node = %(node)s AND ended.status = ANY(%(finished)s)
                   ORDER BY id DESC LIMIT 1) AS last ON true
"""
"""A superseded run counts as it ended: a failed run stays the node's last while the next run
resumes its walk, until that one ends."""


def signals(conn: Connection, table: str, node: str) -> dict[str, Any]:
    """What alerts watch, read at scrape time: the newest finished run's status and end, the last
    checkpoint of a running run (every batch advances it: a stalled run does not) and the time
    throttles held runs back. Times are epoch seconds, which Prometheus compares with ``time()``."""
    cur = conn.execute(SIGNALS_SQL, {"table": table, "node": node, "ended": ENDED_KEY,
                                     "finished": [str(s) for s in FINISHED]})
    row = one_row(cur)
    return dict(zip([c.name for c in cur.description or []], row, strict=True))
