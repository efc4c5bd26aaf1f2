"""Where a streamed ``--archive-to`` batch's rows go: the batch's archive turn sets itself as the
receiver (:func:`receiving`) for the thread's batch; ``strategies._delete_range`` writes the COPY
stream's blocks to :func:`current`. Without a receiver (``--dry-run``'s rolled-back samples) the
rows are read and dropped. A module of its own so that the walks need not import the file code.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import psycopg
from psycopg import pq, sql
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait

from engine.db import Connection


class Sink(Protocol):
    def write(self, block: bytes | bytearray | memoryview) -> None: ...


class _Discard:
    def write(self, block: bytes | bytearray | memoryview) -> None:
        pass


DISCARD = _Discard()
_CURRENT: ContextVar[Sink | None] = ContextVar("msggc_archive_sink", default=None)


def current() -> Sink:
    return _CURRENT.get() or DISCARD


@contextmanager
def receiving(sink: Sink) -> Iterator[None]:
    token = _CURRENT.set(sink)
    try:
        yield
    finally:
        _CURRENT.reset(token)


BLOCK = 1 << 20
"""The server sends a COPY row per message; they are handed on a MiB at a time."""
TEXT_FORMS = ("SELECT set_config('DateStyle', 'ISO', true),"
              " set_config('IntervalStyle', 'postgres', true), set_config('extra_float_digits', '1', true)")
"""The text forms an archive is written in, whatever the server's or role's settings: dates and
intervals that read back the same under any setting, and floats in their shortest exact form
(``extra_float_digits`` below 1 rounds them). For the batch's transaction only."""


def copy_out(conn: Connection, statement: sql.Composed, params: dict[str, Any], sink: Sink) -> int:
    """Run ``COPY (...) TO STDOUT`` and hand its data to ``sink`` in blocks of about ``BLOCK``
    bytes; the number of rows. The rows are read straight from libpq in a tight loop: psycopg's
    ``Copy.read()`` costs a generator and a wait per row, several times the server's cost."""
    conn.execute(TEXT_FORMS)
    cursor = conn.cursor()
    with cursor.copy(statement, params):
        result = conn.wait(_drain(conn.pgconn, sink))
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    return int(result.command_tuples or 0)


def _drain(pgconn: PGconn, sink: Sink) -> Generator[Wait, Ready | int, PGresult]:
    """The COPY data, then its final result (an error result when the statement failed)."""
    block = bytearray()
    get = pgconn.get_copy_data
    while True:
        size, data = get(1)
        if size > 0:
            block += data
            if len(block) >= BLOCK:
                sink.write(block)
                block = bytearray()
        elif size == 0:  # nothing buffered: wait for the socket
            if (yield Wait.R):
                pgconn.consume_input()
        else:
            break
    if block:
        sink.write(block)
    final: PGresult | None = None
    while True:
        while pgconn.is_busy():
            if (yield Wait.R):
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if final is None or result.status == pq.ExecStatus.FATAL_ERROR:
            final = result
    if final is None:
        raise psycopg.OperationalError("the COPY ended without a result")
    return final
