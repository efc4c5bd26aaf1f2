"""What the server says once per control step, beside the probe: its WAL position, its requested
checkpoints, and buffers written by client backends, each read where its version keeps it.

From PostgreSQL 18 (``pg_stat_get_backend_io``) the backends' writes are the other sessions'
alone: msggc's own workers evicting the pages they dirtied themselves is not a wait of the
application's (its commits' WAL flushes are what the probe times), and counting it held a 10M
run to the pace of the background writer (issue 22: 546 s where one ``DELETE`` took 7 s).
Before 18 no view tells one backend's writes from another's: all client backends count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from engine.db import APPLICATION_NAME, Connection, one_row


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


OWN_WRITES_SQL = """
SELECT a.pid, sum(io.writes)::bigint FROM pg_stat_activity a
CROSS JOIN LATERAL pg_stat_get_backend_io(a.pid) io
WHERE a.backend_type = 'client backend' AND a.application_name LIKE %s AND io.object = 'relation'
GROUP BY a.pid
"""
"""msggc's sessions' buffers written (its workers, probe and dry runs: ``APPLICATION_NAME...``)."""


def others_writes(total_delta: int, own_before: dict[int, int], own_now: dict[int, int]) -> int:
    """The writes of the sessions that are not msggc's between two readings: all client
    backends' less msggc's (a session new since the last reading counts whole; one gone since
    loses its last writes to the others' side, at most a step's)."""
    own_delta = sum(writes - own_before.get(pid, 0) for pid, writes in own_now.items())
    return max(0, total_delta - own_delta)


class CounterReader:
    """Reads :class:`ServerCounters` step after step; from PostgreSQL 18 their ``backend_writes``
    is a running count of the other sessions' writes (see the module's docstring)."""

    def __init__(self) -> None:
        self._own: dict[int, int] = {}
        self._total: int | None = None
        self._others = 0

    def read(self, conn: Connection) -> ServerCounters:
        counters = read_counters(conn)
        if conn.info.server_version < 180000 or counters.backend_writes is None:
            return counters
        own = {int(pid): int(writes) for pid, writes in
               conn.execute(OWN_WRITES_SQL, (f"{APPLICATION_NAME}%",)).fetchall()}
        if self._total is not None:
            self._others += others_writes(counters.backend_writes - self._total, self._own, own)
        self._own, self._total = own, counters.backend_writes
        return replace(counters, backend_writes=self._others)
