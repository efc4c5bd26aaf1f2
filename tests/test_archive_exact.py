"""Issue 21, items 5-8: an ``--archive-to`` file gives back exactly the values deleted (text that
reads NULL or NaN included), each row once however often ``restore --file`` runs, refuses a
damaged batch in one line, and restores tables with generated and identity columns."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import zstandard
from psycopg import sql

from engine import collect
from engine.archive_formats import members
from engine.config import GcOptions, TableSpec
from tests.polling import wait_until
from tests.support import run_cli, spawn_cli
from tests.test_cli import assert_one_line_error

LOOKS_NULL = ["NULL", "NA", "N/A", "n/a", "null", "nan", "NaN", "-nan", "#N/A", "", "\\N", '"', "a,b", "x\ny"]
FORMATS = {"gzip": "gone.csv.gz", "zstd": "gone.csv.zst", "parquet": "gone.parquet"}


def table_text(conn, table: str) -> list[str]:
    """Every row as PostgreSQL's text of it, sorted: equal lists mean equal rows, each as often."""
    return [row[0] for row in conn.execute(f"SELECT whole_row::text FROM {table} whole_row ORDER BY 1")]


def archive_to(dsn: str, table: str, path: Path, batch_size: int = 100, **options):
    result = collect(dsn, GcOptions(table=TableSpec(name=table), archive_to=str(path),
                                    batch_size=batch_size, **options))
    assert result.status == "complete", result
    return result


def restore_file(dsn: str, table: str, path: Path):
    return run_cli("restore", "--dsn", dsn, "--table", table, "--file", str(path))


def restore_here(dsn: str, table: str, path: Path) -> str | None:
    """What ``msggc restore --file`` does, in this process: None when it completed, else the line
    it stopped with. The flipped-bit tests restore a dozen damaged copies each, and a CLI start per
    copy (~0.7 s) was most of their time; each test still runs the CLI on one damaged copy."""
    from engine.archive_restore import restore
    from engine.db import connection
    from engine.errors import MsggcError
    from engine.target import locate

    spec = TableSpec.parse(table)
    with connection(dsn) as conn:
        oid, _ = locate(conn, spec)
        try:
            restore(conn, spec, oid, path)
        except MsggcError as exc:
            return str(exc)
    return None


def forget_restores(conn, table: str) -> None:
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
    if conn.execute("SELECT to_regclass('gc_restored')").fetchone()[0]:
        conn.execute("DELETE FROM gc_restored")


def make_notes(conn, rows: int = 300) -> None:
    """Every row garbage; its text cycles through strings a CSV reader may take for NULL, its
    float through NaN, the infinities and -0."""
    conn.execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text, score float8, ratio real,"
                 " processed_at timestamptz)")
    conn.execute(
        "INSERT INTO notes SELECT i, (%s::text[])[1 + i %% %s],"
        " (ARRAY['NaN', 'Infinity', '-Infinity', '-0', '0.1', '1e-320', NULL])[1 + i %% 7]::float8,"
        " (ARRAY['NaN', '-Infinity', '3.4028235e+38', NULL])[1 + i %% 4]::real, now()"
        " FROM generate_series(1, %s) i", (LOOKS_NULL, len(LOOKS_NULL), rows))


def test_parquet_keeps_text_that_reads_null_and_float_nan_as_values(conn, dsn, tmp_path):
    make_notes(conn)
    before = table_text(conn, "notes")
    path = tmp_path / "gone.parquet"
    archive_to(dsn, "notes", path)

    parts = ds.dataset(path, format="parquet").to_table()
    values = dict(zip(parts.column("id").to_pylist(), parts.column("body").to_pylist(), strict=True))
    assert all(values[i] == LOOKS_NULL[i % len(LOOKS_NULL)] for i in values)  # none became None
    nan = [score for i, score in zip(parts.column("id").to_pylist(), parts.column("score").to_pylist(),
                                     strict=True) if i % 7 == 0]
    assert nan and all(score != score for score in nan)  # NaN, not NULL

    proc = restore_file(dsn, "notes", path)
    assert proc.returncode == 0, proc.stderr
    assert table_text(conn, "notes") == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_bit_in_a_batch_is_refused_in_one_line_and_never_restores_an_altered_row(
        conn, dsn, tmp_path, fmt):
    """One bit flipped at several places of one batch (its data and its framing): each restore
    either stops at that batch in one line that names it and says what went back, or (a bit the
    format does not read) restores every row exactly; never a row with another value."""
    make_notes(conn, rows=2000)
    original = dict(conn.execute("SELECT id, whole_row::text FROM notes whole_row").fetchall())
    path = tmp_path / FORMATS[fmt]
    archive_to(dsn, "notes", path, batch_size=250)
    victim = sorted(path.iterdir())[4] if fmt == "parquet" else path
    good = victim.read_bytes()
    start = 0 if fmt == "parquet" else len(good) // 2  # a file: a batch in its middle
    refused = 0
    for position in range(start + 7, len(good), max(1, (len(good) - start) // 12)):
        damaged = bytearray(good)
        damaged[position] ^= 1 << (position % 8)
        victim.write_bytes(bytes(damaged))
        refusal = restore_here(dsn, "notes", path)
        back = dict(conn.execute("SELECT id, whole_row::text FROM notes whole_row").fetchall())
        assert {i: original[i] for i in back} == back, f"a row came back altered (byte {position})"
        if refusal is None:
            assert back == original
        else:
            refused += 1
            assert "\n" not in refusal and "batch" in refusal
            assert "restored" in refusal and str(path) in refusal
        forget_restores(conn, "notes")
        if refused == 1 and refusal is not None:  # the command itself, once: its one line, its exit code
            proc = restore_file(dsn, "notes", path)
            assert_one_line_error(proc, "batch", code=1)
            assert refusal.split(";")[0] in proc.stderr
            forget_restores(conn, "notes")
    victim.write_bytes(good)
    assert refused >= 6


def make_events(conn, rows: int = 1000) -> None:
    """A table without a key: nothing but a record of what went back can stop a duplicate."""
    conn.execute("CREATE TABLE events (n int, body text, processed_at timestamptz)")
    conn.execute("INSERT INTO events SELECT i %% 10, 'event ' || i, now() FROM generate_series(1, %s) i",
                 (rows,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_restoring_a_file_twice_into_a_table_without_a_key_restores_each_row_once(conn, dsn, tmp_path, fmt):
    make_events(conn)
    before = table_text(conn, "events")
    path = tmp_path / FORMATS[fmt]
    archive_to(dsn, "events", path)
    assert table_text(conn, "events") == []

    first = restore_file(dsn, "events", path)
    again = restore_file(dsn, "events", path)

    assert first.returncode == 0 and "restored 1,000 rows" in first.stdout, first.stderr
    assert again.returncode == 0 and "restored 0 rows" in again.stdout, again.stderr
    assert table_text(conn, "events") == before


def test_a_restore_stopped_midway_then_rerun_on_a_good_copy_restores_each_row_once(conn, dsn, tmp_path):
    """The restore stops at a damaged batch (as a crash would, between batches); the batches
    before it went back. A rerun on a good copy of the file restores only the rest."""
    make_events(conn)
    before = table_text(conn, "events")
    path = tmp_path / "gone.csv.zst"
    archive_to(dsn, "events", path)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) * 2 // 3] ^= 0x10
    bad = tmp_path / "bad.csv.zst"
    bad.write_bytes(bytes(damaged))

    stopped = restore_file(dsn, "events", bad)
    assert stopped.returncode == 1, stopped.stdout
    partly = len(table_text(conn, "events"))
    assert 0 < partly < 1000
    rest = restore_file(dsn, "events", path)

    assert rest.returncode == 0, rest.stderr
    assert f"restored {1000 - partly:,} rows" in rest.stdout
    assert table_text(conn, "events") == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_restore_file_of_a_table_with_generated_and_identity_columns_puts_every_row_back(
        conn, dsn, tmp_path, fmt):
    conn.execute("CREATE TABLE ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int,"
                 " doubled int GENERATED ALWAYS AS (n * 2) STORED, processed_at timestamptz)")
    conn.execute("INSERT INTO ledger (n, processed_at) SELECT i, CASE WHEN i % 2 = 0 THEN now() END"
                 " FROM generate_series(1, 500) i")
    before = table_text(conn, "ledger")
    path = tmp_path / FORMATS[fmt]
    archive_to(dsn, "ledger", path)

    proc = restore_file(dsn, "ledger", path)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "restored 250 rows" in proc.stdout
    assert table_text(conn, "ledger") == before


def test_a_restore_killed_midway_then_rerun_restores_each_row_once(conn, dsn, tmp_path):
    """kill -9 between batches, or inside one: the record of a batch commits with its rows, so
    the rerun restores exactly the batches that had not gone back."""
    make_events(conn, rows=60_000)
    before = table_text(conn, "events")
    path = tmp_path / "gone.csv.gz"
    archive_to(dsn, "events", path, batch_size=500)

    restoring = spawn_cli("restore", "--dsn", dsn, "--table", "events", "--file", str(path))
    wait_until(lambda: conn.execute("SELECT count(*) FROM gc_restored").fetchone()[0] >= 3
               or restoring.poll() is not None, 60, "three batches restored")
    restoring.kill()
    restoring.communicate(timeout=10)
    partly = len(table_text(conn, "events"))
    assert 0 < partly < 60_000, "the restore ended before it was killed"
    rest = restore_file(dsn, "events", path)

    assert rest.returncode == 0, rest.stderr
    assert f"restored {60_000 - partly:,} rows" in rest.stdout
    assert table_text(conn, "events") == before


def legacy_copy(path: Path, target: Path, fmt: str) -> None:
    """The archive as versions before issue 21 wrote it: zstd frames without a content
    checksum, parquet parts without the digest of their rows."""
    if fmt == "zstd":
        target.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part) for part in members(path)))
        return
    target.mkdir()
    for part in sorted(path.iterdir()):
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata(None), target / part.name)


@pytest.mark.parametrize(("fmt", "name"), [("zstd", "old.csv.zst"), ("parquet", "old.parquet")])
def test_an_archive_written_before_checksums_still_restores(conn, dsn, tmp_path, fmt, name):
    make_events(conn)
    before = table_text(conn, "events")
    path = tmp_path / FORMATS[fmt]
    archive_to(dsn, "events", path)
    legacy_copy(path, tmp_path / name, fmt)

    proc = restore_file(dsn, "events", tmp_path / name)

    assert proc.returncode == 0, proc.stderr
    assert table_text(conn, "events") == before


def test_a_batch_without_the_checksum_the_file_promises_is_refused(conn, dsn, tmp_path):
    """A flipped bit could clear a zstd frame's checksum flag, or a parquet part's digest key:
    the batch is refused when the file's first batch carries one."""
    make_events(conn)
    path = tmp_path / "gone.csv.zst"
    archive_to(dsn, "events", path)
    batches = list(members(path))
    mixed = tmp_path / "mixed.csv.zst"
    checked = zstandard.ZstdCompressor(write_checksum=True)
    mixed.write_bytes(b"".join([*(checked.compress(part) for part in batches[:3]),
                                zstandard.ZstdCompressor().compress(batches[3]),
                                *(checked.compress(part) for part in batches[4:])]))

    proc = restore_file(dsn, "events", mixed)

    assert_one_line_error(proc, "batch 3 is damaged", code=1)
    assert len(table_text(conn, "events")) == sum(part.count(b"\n") for part in batches[1:3])


def test_parquet_part_rows_are_what_the_digest_covers(tmp_path):
    """The digest is of the values Arrow reads back from the part: a part whose values
    changed under an intact footer is refused."""
    from engine.archive_formats.parquet import arrow_schema, parquet_batches, part_bytes

    schema = arrow_schema({"id": "bigint", "body": "text"})
    epoch = pa.array([0, 0], pa.timestamp("us", "UTC"))
    table = pa.table({"id": [1, 2], "body": ["NULL", None], "archived_at": epoch, "run_id": [7, 7]},
                     schema=schema)
    directory = tmp_path / "one.parquet"
    directory.mkdir()
    (directory / "part-000000.parquet").write_bytes(part_bytes(schema.empty_table()))
    (directory / "part-000001.parquet").write_bytes(part_bytes(table))
    rows = [list(csv.reader(io.StringIO(part.decode()))) for _, part, _ in parquet_batches(directory)]
    at = "1970-01-01 00:00:00.000000Z"
    assert rows[1] == [["1", "NULL", at, "7"], ["2", "", at, "7"]]  # the text NULL quoted, NULL empty

    forged = table.set_column(1, "body", pa.array(["NULL", "x"])).replace_schema_metadata(
        pq.read_table(directory / "part-000001.parquet").schema.metadata)
    pq.write_table(forged, directory / "part-000001.parquet")
    with pytest.raises(ValueError, match=r"part-000001\.parquet does not match its checksum"):
        list(parquet_batches(directory))


@pytest.mark.parametrize("value", ["infinity", "0044-03-15 BC"])
def test_a_timestamp_parquet_cannot_hold_fails_the_run_in_one_line_and_deletes_nothing(conn, dsn, tmp_path,
                                                                                      value):
    """Parquet types timestamps as microseconds since 1970 (year 1 to 9999 in its text form):
    a value outside fails the batch before it commits, so no row goes without its archive."""
    conn.execute("CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz, processed_at timestamptz)")
    conn.execute("INSERT INTO ev SELECT i, CASE WHEN i = 5 THEN %s::timestamptz ELSE now() END, now()"
                 " FROM generate_series(1, 10) i", (value,))

    proc = run_cli("gc", "--dsn", dsn, "--table", "ev", "--archive-to", str(tmp_path / "gone.parquet"))

    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot write a row to parquet" in proc.stdout
    assert conn.execute("SELECT count(*) FROM ev").fetchone()[0] == 10


def test_restore_file_says_how_many_rows_a_key_already_in_the_table_kept_out(conn, dsn, tmp_path):
    make_notes(conn, rows=100)
    path = tmp_path / "gone.csv.gz"
    archive_to(dsn, "notes", path)
    conn.execute("INSERT INTO notes (id, body) VALUES (7, 'the application reused key 7')")

    proc = restore_file(dsn, "notes", path)

    assert proc.returncode == 0, proc.stderr
    assert "restored 99 rows" in proc.stdout
    assert "1 rows not restored: the table holds their key already" in proc.stdout
    assert conn.execute("SELECT body FROM notes WHERE id = 7").fetchone()[0] == "the application reused key 7"


@pytest.mark.parametrize("fmt", ["zstd", "parquet"])
def test_a_flipped_bit_in_the_header_batch_restores_nothing_or_everything_exactly(conn, dsn, tmp_path, fmt):
    """The first batch names the columns (zstd: its first frame; parquet: the schema part):
    damaged, the restore refuses in one line with nothing restored, never a traceback."""
    make_events(conn, rows=100)
    before = table_text(conn, "events")
    path = tmp_path / FORMATS[fmt]
    archive_to(dsn, "events", path)
    victim = path / "part-000000.parquet" if fmt == "parquet" else path
    good = victim.read_bytes()
    end = len(good)
    if fmt == "zstd":
        reader = zstandard.ZstdDecompressor().decompressobj()
        reader.decompress(good)
        end -= len(reader.unused_data)  # the header frame's end
    refused = 0
    for position in range(0, end, max(1, end // 10)):
        damaged = bytearray(good)
        damaged[position] ^= 1 << (position % 8)
        victim.write_bytes(bytes(damaged))
        refusal = restore_here(dsn, "events", path)  # anything but msggc's own error fails the test
        if refusal is None:
            assert table_text(conn, "events") == before, f"byte {position}"
        else:
            refused += 1
            assert "\n" not in refusal
            assert table_text(conn, "events") == [], f"byte {position}"
        forget_restores(conn, "events")
        if refused == 1 and refusal is not None:  # the command itself, once: one line, no traceback
            proc = restore_file(dsn, "events", path)
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
            assert proc.returncode != 0 and table_text(conn, "events") == []
            forget_restores(conn, "events")
    assert refused >= 3


def test_parquet_takes_a_batch_over_a_mebibyte_of_text_spanning_lines():
    """Arrow reads CSV in blocks of 1 MiB; a quoted newline near a block's end put its parser out
    of sync with its chunker, and the batch (so the run) failed on a table of multi-line text."""
    from engine.archive_formats.parquet import ParquetBatch, arrow_schema

    schema = arrow_schema({"id": "bigint", "body": "text"})
    batch = ParquetBatch(schema)
    at = "2026-12-06 08:00:00+00"
    rows = "".join(f'{i},"line one {i}\nline two, {"x" * (i % 97)}",{at},1\n' for i in range(1, 30_000))
    batch.write(rows.encode())
    part = batch.finish()  # 3.9 MB of CSV

    table = pq.read_table(pa.py_buffer(part))
    assert table.num_rows == 29_999
    assert table.column("body")[41].as_py() == "line one 42\nline two, " + "x" * 42


def test_a_parquet_batch_is_known_by_the_digest_its_part_carries(conn, dsn, tmp_path):
    """Restore records a parquet batch by the digest written into its part (of values as bits,
    not as a pyarrow version formats them), so a rerun after an upgrade still knows it."""
    from engine.archive_formats import batches
    from engine.archive_formats.parquet import DIGEST_KEY

    make_notes(conn, rows=50)
    path = tmp_path / "gone.parquet"
    archive_to(dsn, "notes", path, batch_size=20)
    carried = [bytes.fromhex(pq.read_schema(part).metadata[DIGEST_KEY].decode())
               for part in sorted(path.iterdir())[1:]]

    assert [batch.identity for batch in list(batches(path))[1:]] == carried
    assert restore_file(dsn, "notes", path).returncode == 0
    recorded = [bytes(row[0]) for row in conn.execute("SELECT batch_sha256 FROM gc_restored ORDER BY batch")]
    assert recorded == carried
