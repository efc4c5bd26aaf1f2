"""``msggc``: a thin click shell over :mod:`engine`. User mistakes end in one line and exit 2."""

from __future__ import annotations

import functools
import json
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.cli_options import (
    DURATION,
    LATENCY,
    SIZE,
    WORKERS,
    F,
    dsn_option,
    key_option,
    resolve_dsn,
    table_option,
    with_service_options,
)
from engine.cli_output import print_status, summary
from engine.cli_progress import gc_progress, phase_progress, stop_on_signals
from engine.config import STRATEGIES, GcOptions, TableSpec, mask_dsn
from engine.errors import MsggcError, UsageError

# Start fast: each command imports what it needs when it runs (psycopg, the engine's core, httpx,
# rich, the service stack, Alembic...), so `msggc gc` loads no more than a GC needs and `--help`
# no database driver at all. tests/unit/test_imports.py holds that line.
if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from engine.db import Connection
    from engine.service.notify import Notifier


def embedded_dsn() -> str:
    """The embedded server's DSN, started on demand: the service's default database, handed to it
    by this shell (the service layer never starts a server)."""
    from engine.tools.embedded import ensure_running

    return ensure_running()


def connection(dsn: str) -> AbstractContextManager[Connection]:
    from engine.db import connection as connect

    return connect(dsn)


def friendly_errors(func: F) -> F:
    """Print expected errors on one line (no traceback) and exit with their code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MsggcError as exc:
            click.echo(f"msggc: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # a missing privilege met past the up-front checks
            from engine.db import user_fault

            if (reason := user_fault(exc)) is None:
                raise
            click.echo(f"msggc: error: {reason}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="msggc")
def main() -> None:
    """Batched, resumable garbage collection of processed messages on PostgreSQL."""


@main.command(name="migrate")
@dsn_option
@click.option("--archive-for", "archive_for", metavar="SCHEMA.TABLE", multiple=True,
              help="Also create TABLE_archive, where `gc --table TABLE --archive` moves rows (repeatable).")
@friendly_errors
def migrate_command(dsn: str | None, archive_for: tuple[str, ...]) -> None:
    """Create or upgrade msggc's schema (idempotent), and the archive tables asked for."""
    tables = [TableSpec.parse(name) for name in archive_for]
    dsn = resolve_dsn(dsn)
    from engine import migrate  # Alembic and SQLAlchemy: only this command needs them

    before, after = migrate.upgrade(dsn)
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    click.echo(f"schema {state} revision {after} on {mask_dsn(dsn)}")
    if tables:
        from engine.archive import create_archive

        with connection(dsn) as conn:
            for table in tables:
                made = create_archive(conn, table)
                state = "created" if made.created else "already exists"
                click.echo(f"archive table {made.table.qualified} {state} for {table.qualified}")


@main.command()
@dsn_option
@table_option
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Rows to insert.")
@click.option("--shape", type=click.Choice(["dense", "sparse", "aged"]), default="dense", show_default=True)
@click.option("--garbage-fraction", type=click.FloatRange(0, 1), default=None,
              help="Share of garbage rows (default: 0.8 dense/aged, 0.01 sparse).")
@friendly_errors
def seed(dsn: str | None, table: str, rows: int, shape: str, garbage_fraction: float | None) -> None:
    """Fill the table with synthetic messages, generated server-side."""
    from engine.tools import synth

    dsn = resolve_dsn(dsn)
    with phase_progress() as on_progress:
        report = synth.seed(dsn, rows, shape, garbage_fraction,  # type: ignore[arg-type]
                            table=TableSpec.parse(table).qualified, on_progress=on_progress)
    indexes = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report.index_seconds.items())
    click.echo(
        f"seeded {report.rows:,} rows ({report.garbage_rows:,} garbage, {shape}) in"
        f" {report.total_seconds():.1f}s: insert {report.insert_seconds:.1f}s; indexes: {indexes};"
        f" vacuum analyze {report.vacuum_analyze_seconds:.1f}s"
    )


@main.command()
@dsn_option
@table_option
@key_option
@click.option("--processed-column", metavar="COLUMN", default=None,
              help="A row is garbage once this timestamp or date column IS NOT NULL, or once this"
                   " boolean IS TRUE (default: processed_at); any other type: use --where.")
@click.option("--where", "where", metavar="EXPR", default=None,
              help="SQL filter garbage must also pass, e.g. \"status = 'read'\" (alone on a table"
                   " with no processed column). One boolean expression over the table's columns.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Fixed rows per batch (default: adapt toward --target-batch-ms).")
@click.option("--target-batch-ms", type=click.FloatRange(min=1), default=50.0, show_default=True)
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Stop after about this many rows.")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds.")
@click.option("--sleep", type=click.FloatRange(min=0), default=0.0, help="Seconds to pause between batches.")
@click.option("--older-than", type=DURATION, default=None,
              help="Only rows processed longer ago than this (e.g. 30d, 12h).")
@click.option("--lock-timeout-ms", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--statement-timeout-ms", type=click.IntRange(min=10), default=5000, show_default=True)
@click.option("--workers", type=WORKERS, default="auto", show_default=True,
              help="Parallel workers on disjoint ranges (auto: as many as pay off on this table).")
@click.option("--node", default="", help="Node name reported in webhooks (multiconnect).")
@click.option("--webhook", default=None, help="Callback URL that receives the completion body.")
@click.option("--webhook-secret", envvar="MSGGC_WEBHOOK_SECRET", default=None,
              help="HMAC-SHA256 secret for the signature header (env MSGGC_WEBHOOK_SECRET).")
@click.option("--max-wal-rate", type=SIZE, default=None,
              help="Pause batches while the run's WAL exceeds this rate per second (e.g. 50MB).")
@click.option("--max-replica-lag", type=DURATION, default=None,
              help="Pause while a standby's replay lag exceeds this (e.g. 10s).")
@click.option("--pause-for-vacuum", is_flag=True, help="Pause while (auto)vacuum works on the table.")
@click.option("--max-app-latency", "max_app_latency_ms", type=LATENCY, default=None,
              help="Slow down while a probe's commit latency (recent p99) exceeds this (e.g. 20ms).")
@click.option("--vacuum", is_flag=True, help="VACUUM (ANALYZE) the table after the run; report sizes.")
@click.option("--no-drop", is_flag=True,
              help="Partitioned table: delete a wholly-garbage leaf row by row instead of detaching"
                   " and dropping it.")
@click.option("--delete-dependents", is_flag=True,
              help="Delete the child rows of NO ACTION/RESTRICT foreign keys that hold a garbage row"
                   " first, in the same batch (archived too with --archive); default: keep the row."
                   " Never a row of the table itself: a live reply keeps its parent.")
@click.option("--archive", is_flag=True,
              help="Move deleted rows to TABLE_archive in the same statement (see `msggc restore`).")
@click.option("--archive-to", metavar="PATH", default=None,
              help="Stream deleted rows with COPY to a new gzip CSV file, or into a directory"
                   " (one TABLE-runN.csv.gz per run); see `msggc restore --file`.")
@click.option("--archive-format", metavar="gzip|zstd|parquet", default=None,
              help="--archive-to's format: gzip or zstd CSV, or a directory of parquet parts (one per"
                   " batch); default: told by the name (.zst, .parquet), else gzip.")
@click.option("--async-commit/--sync-commit", default=True, show_default=True,
              help="Batch commits skip the WAL flush wait (safe: a batch's delete and checkpoint are"
                   " lost together, and the run's close waits for the flush).")
@click.option("--dry-run", is_flag=True, help="Plan and estimate only; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly_errors
def gc(dsn: str | None, table: str, key: str | None, processed_column: str | None, where: str | None,
       webhook: str | None, webhook_secret: str | None, as_json: bool, **settings: Any) -> None:
    """Delete processed messages in bounded, resumable batches.

    Exit codes: 0 complete, 1 failed, 2 usage error, 3 stopped on a budget or signal
    (the next run resumes), 4 another GC is running on the table.
    """
    from engine.collector import collect
    from engine.service.notice import NoticeFinisher
    from engine.service.notify import LogNotifier, WebhookNotifier

    options = GcOptions(table=TableSpec.parse(table, key, processed_column, where), **settings)
    dsn = resolve_dsn(dsn)
    notifier: Notifier = WebhookNotifier(webhook, secret=webhook_secret) if webhook else LogNotifier()
    stop = threading.Event()
    with stop_on_signals(stop), gc_progress(enabled=not as_json and not options.dry_run) as on_progress:
        result = collect(dsn, options, NoticeFinisher(notifier), stop=stop, on_progress=on_progress)
    click.echo(json.dumps(result.as_json(), default=str) if as_json else summary(result))
    sys.exit(result.exit_code)


@main.command()
@dsn_option
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def status(dsn: str | None, limit: int, as_json: bool) -> None:
    """Show the most recent GC runs, and any leaf partition an earlier run left detached."""
    from engine import partitions, runs
    from engine.db import require_bookkeeping

    with connection(resolve_dsn(dsn)) as conn:
        require_bookkeeping(conn)
        rows = runs.recent(conn, limit)
        left = partitions.left_detached(conn)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    print_status(rows)
    for leaf, state, run_id in left:
        parent = leaf.parent.qualified
        click.echo(f"{leaf.table.qualified} of {parent}: {state.replace('pending', 'pending detach')}"
                   f" since run {run_id}; the next gc on {parent} attaches it again first")


@main.command()
@dsn_option
@table_option
@key_option
@click.option("--run", "run_id", type=click.IntRange(min=1), default=None,
              help="Run whose rows to restore from TABLE_archive (gc --archive).")
@click.option("--file", "path", type=click.Path(path_type=Path), default=None,
              help="Archive file (gzip or zstd CSV) or parquet directory to restore (gc --archive-to);"
                   " each batch once, however often it is run.")
@friendly_errors
def restore(dsn: str | None, table: str, key: str | None, run_id: int | None, path: Path | None) -> None:
    """Put archived rows back into the table: a run's rows from the archive table, or a file's."""
    from engine import archive, archive_restore
    from engine.compact import restore as compact_restore
    from engine.target import locate

    if (run_id is None) == (path is None):
        raise UsageError("give either --run ID or --file PATH")
    spec = TableSpec.parse(table, key)
    skipped = ""
    with connection(resolve_dsn(dsn)) as conn:
        oid, key_columns = locate(conn, spec)
        if path is not None:
            done = archive_restore.restore(conn, spec, oid, path)
            tables = {spec.qualified: archive.Restored(done.restored, 0)}
            source = str(path)
            if done.skipped:
                skipped = f" ({done.skipped:,} batches restored earlier were skipped)"
            if done.present:
                skipped += f"; {done.present:,} rows not restored: the table holds their key already"
        elif run_id is not None and (compacted := compact_restore.kept(conn, run_id)) is not None:
            tables = {spec.qualified: compact_restore.restore(conn, compacted)}
            source = f"run {run_id} (its old table {compacted.old.qualified})"
        elif run_id is not None:
            tables = archive.restore_with_children(conn, spec, oid, run_id, key_columns)
            source = f"run {run_id}"
    line = "; ".join(f"restored {done.restored:,} rows of {source} into {name}"
                     for name, done in tables.items()) + skipped
    conflicting = sum(done.conflicting for done in tables.values())
    if conflicting:
        raise MsggcError(f"{line}; {conflicting:,} rows kept in the archive: they conflict with rows"
                         " now in the table (remove those and run again to restore them)")
    click.echo(line)


@main.command(name="purge-archive")
@dsn_option
@table_option
@click.option("--older-than", type=DURATION, required=True, help="Archive age to purge, e.g. 30d.")
@friendly_errors
def purge_archive(dsn: str | None, table: str, older_than: timedelta) -> None:
    """Delete archived rows older than --older-than, in batches."""
    from engine import archive

    spec = TableSpec.parse(table)
    with connection(resolve_dsn(dsn)) as conn:
        purged = archive.purge(conn, spec, older_than)
    click.echo(f"purged {purged:,} archived rows of {spec.qualified}")


@main.command()
@dsn_option
@click.option("--rows", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@friendly_errors
def demo(dsn: str | None, rows: int) -> None:
    """Seed a demo database and collect it, with a webhook to a local receiver."""
    from engine.tools.demo import run_demo

    with phase_progress() as on_seed, gc_progress(enabled=True) as on_progress:
        result = run_demo(rows, click.echo, on_seed, on_progress, dsn)
    click.echo(summary(result))
    sys.exit(result.exit_code)


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--count", type=click.IntRange(min=0), default=0, help="Exit after this many (0 = never).")
def receive(port: int, count: int) -> None:
    """Print the webhook bodies POSTed to http://127.0.0.1:PORT/ (a stand-in callback server)."""
    from engine.tools.receiver import Receiver

    with Receiver(lambda body: click.echo(json.dumps(body, indent=4)), port=port) as receiver:
        click.echo(f"listening on {receiver.url}", err=True)
        if count:
            receiver.wait_for(count, timeout_s=None)
        else:
            receiver.thread.join()


@main.group()
def db() -> None:
    """See and control the embedded PostgreSQL server."""


@db.command()
@friendly_errors
def url() -> None:
    """Print the embedded server's DSN (exit 1 when it is not running)."""
    from engine.tools import embedded

    dsn = embedded.url()
    if dsn is None:
        click.echo(f"embedded server is not running (data in {embedded.data_dir()})", err=True)
        sys.exit(1)
    click.echo(dsn)


@db.command()
@friendly_errors
def start() -> None:
    """Start the embedded server (no-op when running) and print its DSN."""
    from engine.tools import embedded

    click.echo(embedded.ensure_running())


@db.command()
@friendly_errors
def stop() -> None:
    """Stop the embedded server."""
    from engine.tools import embedded

    click.echo("stopped" if embedded.stop() else "embedded server was not running")


def _log_to_stderr() -> None:
    """The worker's runs and deliveries at INFO; httpx's line per webhook POST would repeat them."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@main.command()
@with_service_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--token", envvar="MSGGC_API_TOKEN", default=None,
              help="Bearer token required by the API (env MSGGC_API_TOKEN); mandatory beyond loopback.")
@click.option("--no-worker", is_flag=True, help="Serve the API only; run `msggc worker` separately.")
@friendly_errors
def serve(host: str, port: int, token: str | None, no_worker: bool, **service: Any) -> None:
    """Serve the HTTP API (PUT /v1/services/message/gc) and run its worker."""
    from engine.service.settings import load_settings, require_token_beyond_loopback

    settings = load_settings(token=token, run_worker=not no_worker, default_dsn=embedded_dsn, **service)
    require_token_beyond_loopback(host, settings.token)
    import uvicorn

    from engine.service.api import create_app

    _log_to_stderr()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@main.command()
@with_service_options
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve this worker's /metrics here: its batch and run duration histograms and its"
                   " schedule's series (msggc serve exports what the databases know).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of --metrics-port.")
@click.option("--token", envvar="MSGGC_API_TOKEN", default=None,
              help="Bearer token of its /metrics (env MSGGC_API_TOKEN); mandatory beyond loopback.")
@friendly_errors
def worker(metrics_port: int | None, metrics_host: str, token: str | None, **service: Any) -> None:
    """Claim and execute queued GC runs and deliver their webhooks, without the HTTP API."""
    from engine.service.metrics import Metrics
    from engine.service.metrics_server import serve_metrics
    from engine.service.settings import load_settings
    from engine.service.worker import Worker

    settings = load_settings(default_dsn=embedded_dsn, token=token, **service)
    metrics = Metrics(settings, from_databases=False)
    stop_metrics = None
    if metrics_port is not None:
        stop_metrics = serve_metrics(metrics.registry, metrics_host, metrics_port, settings.token)
    _log_to_stderr()
    runner = Worker(settings, metrics)
    runner.start()
    stop = threading.Event()
    with stop_on_signals(stop):
        while not stop.wait(1.0) and runner.alive:
            pass
    runner.close()
    if stop_metrics is not None:
        stop_metrics()
    sys.exit(0 if stop.is_set() else 1)


if __name__ == "__main__":
    main()
