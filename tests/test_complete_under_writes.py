"""``complete`` holds while the application writes: every row that was garbage when the run
started and stayed garbage is gone when it says so, and every row the application keeps is there.

The heap walk deletes by block range: a garbage row the application updates meanwhile gets a new
version wherever the free space map says, maybe in blocks the walk has passed; a resumed walk
passed part of the table in an earlier run, before garbage appeared there. The sweep after the
walk reads the keys of the garbage left, in one statement, and deletes them by key.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
import pytest

from engine import Progress, collect
from engine.config import GcOptions, StrategyName, TableSpec

Conn = psycopg.Connection[Any]


def options(table: str, **settings: Any) -> GcOptions:
    return GcOptions(table=TableSpec(name=table, schema="public"), **settings)


def make_table(conn: Conn, rows: int, processed: str = "now()") -> None:
    conn.execute("CREATE TABLE heap (id bigint PRIMARY KEY, processed_at timestamptz, note text)")
    conn.execute(f"INSERT INTO heap SELECT g, {processed}, 'n' FROM generate_series(1, %s) g", (rows,))
    conn.execute("VACUUM ANALYZE heap")


def garbage_left(conn: Conn) -> int:
    return conn.execute("SELECT count(*) FROM heap WHERE processed_at IS NOT NULL").fetchone()[0]


def block_of(conn: Conn, ids: tuple[int, int]) -> int:
    """The highest heap block holding one of these rows."""
    return conn.execute("SELECT max((ctid::text::point)[0])::int FROM heap WHERE id BETWEEN %s AND %s",
                        ids).fetchone()[0]


def test_garbage_rows_the_app_moves_behind_the_heap_walk_are_still_collected(conn, dsn):
    """After the walk's first batches, VACUUM records the blocks they emptied as free space; the
    application then updates garbage rows near the end of the table, too big for their own block:
    their new versions land in the emptied blocks, behind the walk."""
    make_table(conn, 20_000)
    moved: list[tuple[int, int]] = []

    def application(progress: Progress) -> None:
        if moved or progress.batches < 3:
            return
        walked_to = conn.execute("SELECT (cursor -> 'slices' -> 0 ->> 'position')::int FROM gc_runs"
                                 " WHERE id = %s", (progress.run_id,)).fetchone()[0]
        conn.execute("VACUUM heap")
        conn.execute("UPDATE heap SET note = repeat('x', 3000) WHERE id BETWEEN 19000 AND 19020")
        moved.append((walked_to, block_of(conn, (19000, 19020))))

    result = collect(dsn, options("heap", strategy="physical", batch_size=500), on_progress=application)
    walked_to, landed = moved[0]
    assert landed < walked_to, "the test meant to move rows behind the walk"
    assert result.status == "complete", result.error
    assert garbage_left(conn) == 0
    assert result.messages_deleted == 20_000


@pytest.mark.parametrize("strategy", ["physical", "key", "index"])
def test_a_resumed_run_also_collects_garbage_that_appeared_where_the_earlier_run_had_been(
        conn, dsn, strategy: StrategyName):
    """Run 1 stops halfway; the application then marks processed rows run 1 had already passed.
    Run 2 resumes the walk where run 1 stopped: its ``complete`` covers those rows too."""
    make_table(conn, 10_000, processed="CASE WHEN g %% 2 = 0 THEN now() END")
    conn.execute("CREATE INDEX heap_garbage ON heap (id) WHERE processed_at IS NOT NULL")
    first = collect(dsn, options("heap", strategy=strategy, batch_size=500, max_rows=2_000))
    assert first.status == "stopped"
    # rows run 1 passed (deleted neighbours) became garbage after it stopped
    behind = conn.execute("UPDATE heap SET processed_at = now() WHERE processed_at IS NULL"
                          " AND id < (SELECT min(id) FROM heap WHERE processed_at IS NOT NULL)").rowcount
    assert behind > 0
    second = collect(dsn, options("heap", strategy=strategy, batch_size=500))
    assert second.status == "complete", second.error
    assert second.resumed_from == first.run_id
    assert garbage_left(conn) == 0
    assert first.messages_deleted + second.messages_deleted == 5_000 + behind


@pytest.mark.parametrize("strategy", ["physical", "index"])
def test_while_the_application_writes_throughout_complete_means_the_start_garbage_is_gone(
        conn, dsn, strategy: StrategyName):
    """An application inserts new rows, marks rows processed and rewrites processed rows (new
    versions anywhere in the heap, VACUUM making room behind the walk) for the whole run. At
    ``complete``: no row that was garbage at the start is left, no unprocessed row is lost."""
    make_table(conn, 30_000, processed="CASE WHEN g %% 4 <> 0 THEN now() END")
    conn.execute("CREATE INDEX heap_garbage ON heap (id) WHERE processed_at IS NOT NULL")
    start_garbage = {row[0] for row in conn.execute("SELECT id FROM heap WHERE processed_at IS NOT NULL")}
    stop = threading.Event()
    written: list[int] = []
    app = psycopg.connect(dsn, autocommit=True)

    def application() -> None:
        rng = random.Random(7)
        next_id = 100_000
        while not stop.is_set():
            app.execute("INSERT INTO heap SELECT g, NULL, 'new' FROM generate_series(%s, %s) g",
                        (next_id, next_id + 9))
            written.extend(range(next_id, next_id + 10))
            next_id += 10
            low = rng.randrange(1, 30_000)
            app.execute("UPDATE heap SET note = repeat('y', 1500) WHERE id BETWEEN %s AND %s"
                        " AND processed_at IS NOT NULL", (low, low + 20))
            if rng.random() < 0.2:
                app.execute("VACUUM heap")

    thread = threading.Thread(target=application)
    thread.start()
    try:
        result = collect(dsn, options("heap", strategy=strategy, batch_size=300, sleep=0.01))
    finally:
        stop.set()
        thread.join()
        app.close()
    assert result.status == "complete", result.error
    left = {row[0] for row in conn.execute("SELECT id FROM heap WHERE processed_at IS NOT NULL")}
    assert not left & start_garbage
    kept = {row[0] for row in conn.execute("SELECT id FROM heap WHERE processed_at IS NULL")}
    assert set(written) <= kept
    assert kept >= set(range(4, 30_001, 4))


def test_a_garbage_row_the_app_moves_into_a_leaf_already_walked_is_still_collected(conn, dsn):
    """A partitioned table walked by key, leaf after leaf: once the first leaf is done, the
    application updates the partition key of a garbage row of the last leaf, moving it into the
    first. Its key did not change, but the walk of its new leaf has ended."""
    conn.execute("CREATE TABLE inbox (id bigint NOT NULL, day int NOT NULL, processed_at timestamptz,"
                 " PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    for day in range(4):
        conn.execute(f"CREATE TABLE inbox_d{day} PARTITION OF inbox FOR VALUES FROM ({day}) TO ({day + 1})")
    conn.execute("INSERT INTO inbox SELECT g, g % 4, CASE WHEN g % 4 = 0 OR g % 5 = 0 THEN now() END"
                 " FROM generate_series(1, 800) g")
    conn.execute("ANALYZE inbox")
    moved: list[int] = []

    def application(progress: Progress) -> None:
        if not moved and progress.deleted >= 200:  # the first leaf's 200 garbage rows are gone
            moved.extend(row[0] for row in conn.execute(
                "UPDATE inbox SET day = 0 WHERE (id, day) = (SELECT id, day FROM inbox WHERE day = 3"
                " AND processed_at IS NOT NULL ORDER BY id LIMIT 1) RETURNING id"))

    gc = GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="index", batch_size=50,
                   no_drop=True, workers=1)
    result = collect(dsn, gc, on_progress=application)
    assert moved, "the test meant to move a garbage row into the walked leaf"
    assert result.status == "complete", result.error
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 0
