"""``--dry-run --strategy compact``: the conditions checked, the live rows the copy would move,
and its duration, WAL and disk predicted from a real sample copy that is rolled back, beside the
walk's own prediction (the same dry run with the strategy the planner would pick).

The copy's time is the finding of its live rows (a sequential search: one read of the heap, timed
on chunks spread through it; an index that answers the predicate's negation: timed on the first
``FIND_ROWS`` it finds, scaled), plus the writing of its live rows and the building of its indexes
(timed on sampled live rows written into a table like the new one, inside a transaction rolled
back, and scaled; the index builds' cost on no rows added once), plus the verification after the
swap (its counts and the old table's drop): predicted as one read of the heap, which it took 0.9-1.5
times at 10M and 100M rows with the heap in memory or not.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from psycopg import sql

from engine.compact import copy, preconditions, tally
from engine.compact.choice import live_share
from engine.compact.state import Compaction, names_of
from engine.db import Connection, one_row, table_ident
from engine.queries import Statements
from engine.result import GcResult
from engine.target import Target

CHECKED = ("a key", "owned", "no view, rule or materialized view", "no foreign key onto it", "not published",
           "no inheritance", "no object on its row type", "no security label")
SAMPLE_ROWS = 20_000
"""The live rows written in the sample copy."""
READ_CHUNKS, CHUNK_BLOCKS = 4, 4_096
"""The heap's sequential read is timed on this many chunks of blocks spread through it (128 MB in
all), so that the share of it in memory counts as it is: timed on its first 32 MB, cached by the
seed, it predicted 4.1 s for a 12.6 s read of a 100M-row heap (and, cold, 22.9 s)."""
FIND_ROWS = 5_000
"""The live rows found to time the copy's search for them (at 1% live, a twentieth of 10M rows)."""


def predict(conn: Connection, target: Target, statements: Statements | None, walk: GcResult,
            cutoff: object, refused: list[str] | None = None) -> GcResult:
    """The walk's dry run ``walk`` turned into the compaction's, the walk's figures kept beside;
    ``refused``: the refusals if just asked (``auto`` chose compaction: none), else asked here."""
    refused = preconditions.refusals(conn, target) if refused is None else refused
    figures: dict[str, Any] = {"refused": refused, "walk": {
        "strategy": walk.strategy, "predicted_seconds": walk.predicted_seconds,
        "predicted_wal_bytes": walk.predicted_wal_bytes}}
    if statements is None or refused:
        return dataclasses.replace(walk, strategy="compact", compaction=figures,
                                   reason=f"compaction refused: {'; '.join(refused)}")
    params = {"cutoff": cutoff}
    pages, heap_bytes, total_bytes, rows = one_row(conn.execute(
        "SELECT relpages, pg_relation_size(oid), pg_total_relation_size(oid), greatest(reltuples, 0)::bigint"
        " FROM pg_class WHERE oid = %s", (target.oid,)))
    share = live_share(conn, statements, params)
    live = round(rows * share)
    copied = _sample_copy(conn, target, statements, params) if live else None
    live_rows = copy.live_rows(statements.garbage, copy.never_null(target))
    read_s = _read_seconds(conn, statements, int(pages))
    find_s = _find_seconds(conn, table_ident(statements.table), live_rows, params, live, read_s)
    verify_s = read_s  # its counts (index-only) and the drop: 0.9-1.5 heap reads measured, 10M-100M rows
    scale = live / copied.rows if copied and copied.rows else 0.0
    write_s = copied.seconds * scale + copied.fixed_seconds if copied else 0.0
    seconds = find_s + write_s + verify_s
    wal = round(copied.wal_bytes * scale) if copied else 0
    disk = round(copied.disk_bytes * scale) if copied else 0
    room, disk_line = preconditions.disk_room(conn, disk)
    figures.update(live_rows=live, rows=int(rows), heap_bytes=int(heap_bytes), predicted_seconds=seconds,
                   predicted_find_seconds=find_s, predicted_write_seconds=write_s,
                   predicted_verify_seconds=verify_s,
                   predicted_wal_bytes=wal, disk_bytes=disk, disk=disk_line, room=room, checked=CHECKED)
    versus = _versus(walk, seconds, wal)
    return dataclasses.replace(
        walk, strategy="compact", compaction=figures, predicted_seconds=seconds, predicted_wal_bytes=wal,
        planned_batches=None,
        reason=f"compaction: copy ~{live:,} live rows of ~{int(rows):,}; {disk_line}{versus}"
               f"{_given_back(int(total_bytes))}")


@dataclasses.dataclass(frozen=True)
class SampleCopy:
    rows: int
    seconds: float
    """Writing the rows and building the indexes, less ``fixed_seconds``."""
    fixed_seconds: float
    """Building the indexes on no rows: paid once, whatever the rows (scaled, a 20,000-row
    sample's fixed cost made a 10M-row backlog's prediction twice its time)."""
    wal_bytes: int
    disk_bytes: int


def _sample_copy(conn: Connection, target: Target, statements: Statements,
                 params: dict[str, object]) -> SampleCopy | None:
    """Sampled live rows written into a table like the new one, with its indexes, in a
    transaction that is rolled back. The sample is first staged untimed (finding the live rows
    is timed apart, as the copy finds them: a sample of an aged table's blocks holds few)."""
    schema, oid = names_of(conn, target.oid)[0], target.oid
    garbage = statements.garbage.as_string(conn)
    stage, empty, new = (Compaction(-3 * conn.info.backend_pid - n, schema, target.spec.name,
                                    list(target.key), garbage, None) for n in range(3))
    cols = sql.SQL(", ").join(map(sql.Identifier, copy.columns(conn, oid)))
    conn.execute("BEGIN")
    try:
        for table in (stage, empty, new):
            copy.create_table(conn, table, oid)
        rows = conn.execute(sql.SQL(
            "INSERT INTO {stage} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {t}"
            " TABLESAMPLE SYSTEM (10) WHERE ({g}) IS NOT TRUE LIMIT {n}").format(
                stage=table_ident(stage.new), cols=cols, t=table_ident(target.spec), g=statements.garbage,
                n=sql.Literal(SAMPLE_ROWS)), params).rowcount
        started = time.monotonic()
        copy.build_indexes(conn, empty, oid)
        fixed = time.monotonic() - started
        lsn, started = one_row(conn.execute("SELECT pg_current_wal_insert_lsn()"))[0], time.monotonic()
        conn.execute(sql.SQL("INSERT INTO {new} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {stage}"
                             ).format(new=table_ident(new.new), cols=cols, stage=table_ident(stage.new)))
        copy.build_indexes(conn, new, oid)
        seconds = time.monotonic() - started
        wal, size = one_row(conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)::bigint,"
            " pg_total_relation_size(to_regclass(%s))", (lsn, table_ident(new.new).as_string(conn))))
        return SampleCopy(rows, max(seconds - fixed, 0.0), fixed, int(wal), int(size))
    finally:
        conn.execute("ROLLBACK")


def _find_seconds(conn: Connection, table: sql.Composable, live_rows: sql.Composable,
                  params: dict[str, object], live: int, read_s: float) -> float:
    """The copy's search for the live rows: a sequential read of the whole heap (``read_s``)
    where its plan is one, wherever the live rows lie (an aged table's are all at its end: timing
    its first ``FIND_ROWS`` and scaling read the table twenty times over); else timed on its
    first ``FIND_ROWS`` (a btree on the processed column finds a backlog's few without reading
    the heap's garbage), scaled to ``live``."""
    search = sql.SQL("SELECT 1 FROM ONLY {} WHERE {}").format(table, live_rows)
    if not live:
        return 0.0
    if tally.sequential(conn, search, params):
        return read_s
    started = time.monotonic()
    found = one_row(conn.execute(sql.SQL("SELECT count(*) FROM ({} LIMIT {}) AS live").format(
        search, sql.Literal(FIND_ROWS)), params))[0]
    return (time.monotonic() - started) * live / max(int(found), 1)


def _read_seconds(conn: Connection, statements: Statements, pages: int) -> float:
    """The whole heap's sequential read, timed on ``READ_CHUNKS`` chunks spread through it (a
    small heap: read whole)."""
    chunk = min(CHUNK_BLOCKS, pages // (2 * READ_CHUNKS))
    starts = [pages * (2 * i + 1) // (2 * READ_CHUNKS) for i in range(READ_CHUNKS)] if chunk else [0]
    chunk = chunk or max(pages, 1)
    read = sql.SQL("SELECT count(*) FROM {} WHERE ctid >= {}::tid AND ctid < {}::tid")
    started = time.monotonic()
    for first in starts:
        conn.execute(read.format(table_ident(statements.table), sql.Literal(f"({first},0)"),
                                 sql.Literal(f"({first + chunk},0)")))
    return (time.monotonic() - started) * max(pages, 1) / (chunk * len(starts))


def _given_back(total_bytes: int) -> str:
    """What the drop of the old table returns at once: on a filesystem mounted with online
    ``discard`` (ext4 ``-o discard``) every commit on that device waits while it is discarded
    (measured: ``rm`` of 3 GB held pgbench's commits up to 250 ms), as it would for any DROP."""
    if total_bytes < 2**30:
        return ""
    return (f"; at its end the old table's {total_bytes / 2**30:.1f} GiB go back to the filesystem at"
            " once: with online discard (mount -o discard) commits on that disk wait while they are"
            " discarded; --archive keeps the old table instead (drop it at a quiet hour)")


def _versus(walk: GcResult, seconds: float, wal: int) -> str:
    if not walk.predicted_seconds or not walk.predicted_wal_bytes:
        return f"; the walk ({walk.strategy}) has no prediction to compare"
    speedup = walk.predicted_seconds / max(seconds, 1e-3)
    return (f"; against the walk ({walk.strategy}): {speedup:.1f}x as fast,"
            f" {wal / walk.predicted_wal_bytes:.2f}x its WAL")
