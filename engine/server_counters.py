"""What the server says once per control step, beside the probe: its WAL position, its requested
checkpoints, and buffers written by client backends, each read where its version keeps it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.db import Connection, one_row


@dataclass(frozen=True)
class ServerCounters:
    """What the server says once per step, beside the probe: its WAL position, its requested
    checkpoints, and buffers written by client backends (None where the version cannot say)."""

    at: float
    lsn: int
    checkpoints_requested: int
    backend_writes: int | None


def counters_sql(server_version: int) -> str:
    """The checkpointer's count moved to ``pg_stat_checkpointer`` in 17; backend writes are in
    ``pg_stat_io`` from 16 and ``pg_stat_bgwriter.buffers_backend`` before (gone in 17)."""
    lsn = "(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
    io = ("(SELECT coalesce(sum(writes), 0)::bigint FROM pg_stat_io"
          " WHERE backend_type = 'client backend' AND object = 'relation')")
    if server_version >= 170000:
        return f"SELECT {lsn}, (SELECT num_requested FROM pg_stat_checkpointer), {io}"
    if server_version >= 160000:
        return f"SELECT {lsn}, (SELECT checkpoints_req FROM pg_stat_bgwriter), {io}"
    return f"SELECT {lsn}, checkpoints_req, buffers_backend FROM pg_stat_bgwriter"


def read_counters(conn: Connection) -> ServerCounters:
    lsn, checkpoints, writes = one_row(conn.execute(counters_sql(conn.info.server_version)))
    return ServerCounters(time.monotonic(), int(lsn), int(checkpoints),
                          None if writes is None else int(writes))
