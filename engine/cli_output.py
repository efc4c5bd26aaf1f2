"""What the CLI prints about runs: the one-line summary of a GC and the `msggc status` table.

Part of the CLI layer (the core never imports it): the core hands back a ``GcResult`` or rows of
``gc_runs``, and only the shell decides how they read. Kept apart from :mod:`engine.cli` so that the
click commands and the wording of their results change independently.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from engine.status import RunStatus

if TYPE_CHECKING:
    from engine.result import GcResult


def summary(result: GcResult) -> str:
    """The result of ``msggc gc`` (or a dry run) as one line, plus indented advice lines."""
    if result.status is RunStatus.DRY_RUN:
        if result.compaction is not None:
            return _compaction_line(result)
        if result.predicted_seconds is None:  # no sample batch finished: the reason is in result.reason
            return (f"dry run: strategy {result.strategy} ({result.reason}); would delete"
                    f" ~{result.garbage_estimate:,} rows" + _foreign_key_lines(result, "~")
                    + _partition_lines(result))
        return (f"dry run: strategy {result.strategy} ({result.reason}); would delete"
                f" ~{result.garbage_estimate:,} rows in ~{result.planned_batches or 0:,} batches,"
                f" predicted ~{result.predicted_seconds:,.1f}s and ~{_mib(result.predicted_wal_bytes or 0)}"
                " of WAL (from rolled-back sample batches"
                + ("; leaves dropped or swept alone not included)" if result.partitions else ")")
                + _foreign_key_lines(result, "~")
                + _checkpoint_line(result)
                + _budget_line(result)
                + _partition_lines(result))
    line = (f"{result.status}: deleted {result.messages_deleted:,} rows in {result.elapsed_s:.1f}s"
            f" ({result.rows_per_s:,.0f} rows/s, {result.batches:,} batches")
    if result.batch_ms_p50 is not None:
        line += f", batch p50 {result.batch_ms_p50:.0f} ms p99 {result.batch_ms_p99:.0f} ms"
    line += f") with strategy {result.strategy}, run {result.run_id}"
    if result.resumed_from is not None:
        line += f" ({result.reason})"
    if result.throttle_pauses:
        reasons = ", ".join(f"{k} x{v}" for k, v in result.throttle_reasons.items())
        line += f"; throttled {result.throttled_s:.1f}s ({reasons})"
    if result.app_latency_budget_ms is not None:
        line += _guard_line(result)
    if result.reclaim and "after_vacuum" in result.reclaim:
        line += "; " + _reclaim_line(result.reclaim)
    elif result.vacuum_skipped:
        line += f"; vacuum skipped: {result.vacuum_skipped}"
    if result.rows_skipped_locked:
        line += f"; {result.rows_skipped_locked:,} locked rows left for the next run"
    line += _foreign_key_lines(result)
    if dropped := [part["deleted"] for part in result.partitions.values() if part["dropped"]]:
        line += (f"; {len(dropped)} of {len(result.partitions)} partitions wholly garbage, dropped"
                 f" ({sum(dropped):,} rows)")
    if result.stop_reason:
        line += f"; stopped on {result.stop_reason}: run again to resume"
    more = ""
    if result.error:
        first, *server_lines = result.error.splitlines()  # the server's DETAIL/HINT close the summary
        line += f"; error: {first}"
        more = "".join(f"\n{server_line}" for server_line in server_lines)
    if result.notification_error:
        line += f"; webhook not delivered yet ({result.notification_error}), kept in the outbox"
    return line + more


def _compaction_line(result: GcResult) -> str:
    """A dry run of ``--strategy compact``: refused and why, or what it would copy and cost."""
    if result.compaction and result.compaction["refused"]:
        walk = result.compaction["walk"]["strategy"]
        return f"dry run: {result.reason}; the walk ({walk}) can still collect it"
    return (f"dry run: {result.reason}; would delete ~{result.garbage_estimate:,} rows, predicted"
            f" ~{result.predicted_seconds or 0:,.1f}s and ~{_mib(result.predicted_wal_bytes or 0)} of WAL"
            " (from a rolled-back sample copy)")


def print_status(rows: list[dict[str, Any]]) -> None:
    """``msggc status``: the recent runs as a table, whole lines even when piped."""
    from rich.console import Console  # rich costs ~100 ms: only this command pays it
    from rich.table import Table

    table = Table("run", "node", "table", "garbage", "status", "strategy", "deleted", "batches",
                  "foreign keys", "throttled", "latency budget", "app p50/p99, held back", "started",
                  "error")
    for row in rows:
        foreign_keys = ", ".join(f"{name} {n:,}" for name, n in (row["foreign_keys"] or {}).items())
        table.add_row(str(row["id"]), row["node"], row["table_name"], row["garbage"] or "", row["status"],
                      row["strategy"] or "", f"{row['messages_deleted']:,}", str(row["batches"]),
                      foreign_keys,
                      f"{row['throttle_pauses']} / {row['throttled_seconds']:.1f}s",
                      _budget_cell(row),
                      _guard_cell(row),
                      f"{row['started_at']:%Y-%m-%d %H:%M:%S}" if row["started_at"] else "",
                      row["error"] or "")
    console = Console()
    if not console.is_terminal:  # piped, rich would cut every line at 80 columns: scripts need it all
        unbounded = console.options.update(max_width=sys.maxsize)
        console.width = console.measure(table, options=unbounded).maximum
    console.print(table)


def _guard_line(result: GcResult) -> str:
    """The latency guard's part of the summary: what the probe felt and what it cost the run."""
    p50, p99 = result.app_latency_p50_ms, result.app_latency_p99_ms
    felt = f"p50 {p50:.1f} ms p99 {p99:.1f} ms" if p50 is not None and p99 is not None else "no sample"
    before = result.app_latency_before_p99_ms
    alone = f"p99 {before:.1f} ms before the run, " if before is not None else ""
    line = (f"; app commit latency {alone}{felt} over {result.app_probes:,} probes"
            f" (budget {result.app_latency_budget_ms:g} ms), held back {result.held_back_s:.1f}s")
    if result.guard_rate_min_bytes_per_s is not None:
        line += (f" (lowest WAL rate granted {_mib(result.guard_rate_min_bytes_per_s)}/s,"
                 f" {result.rate_decreases} decreases")
        if result.guard_futile_steps:
            line += (f", {result.guard_futile_steps} steps over the budget not slowed further: halving"
                     " left the latency as high")
        line += (f", {result.checkpoints_requested} checkpoints requested)" if result.checkpoints_requested
                 else ", no checkpoint requested)")
    return line


def _budget_line(result: GcResult) -> str:
    """A dry run's word on ``--max-app-latency``: whether it can hold, and the duration under it."""
    if result.budget_verdict is None:
        return ""
    seconds = result.predicted_guarded_seconds
    under = f"predicted ~{seconds:,.1f}s under it; " if seconds is not None else ""
    return f"\n  budget {result.app_latency_budget_ms:g} ms: {under}{result.budget_verdict}"


def _guard_cell(row: dict[str, Any]) -> str:
    """A run's probe latency and time held back, for `msggc status` (empty without a guard)."""
    if row.get("app_latency_p99_ms") is None:
        return ""
    before = row.get("app_latency_before_p99_ms")
    return ((f"{before:.1f} before, " if before is not None else "")
            + f"{row['app_latency_p50_ms']:.1f}/{row['app_latency_p99_ms']:.1f} ms,"
            f" {row['held_back_seconds']:.1f}s")


def _budget_cell(row: dict[str, Any]) -> str:
    """The budget a run goes by, for `msggc status`: ``12 ms``, ``auto 12 ms (3x the p99 of ...)``,
    ``auto (not measured yet)``; empty without one."""
    budget, measured = row.get("app_latency_budget_ms"), row.get("app_latency_baseline")
    if not row.get("app_latency_auto"):
        return "" if budget is None else f"{budget:g} ms"
    if budget is None:
        return "auto (not measured yet)"
    came_from = (f" ({measured['factor']:g}x the p99 of {measured['p99_ms']:.2f} ms before the run,"
                 f" at least {measured['floor_ms']:g})") if measured else ""
    return f"auto {budget:g} ms{came_from}"


def _foreign_key_lines(result: GcResult, about: str = "") -> str:
    """Each foreign key: its rows kept or changed (unknown when its count was cancelled), and why
    its deletes are slow when its referencing columns have no index."""
    return "".join(
        f"; {name} ({fk['child']}, ON DELETE {fk['action'].upper()}): "
        + (f"{about}{fk['rows']:,} rows" if fk["rows"] is not None else f"rows unknown ({fk.get('unknown')})")
        + f" {fk['effect']}" + (f"; {fk['no_index']}" if fk.get("no_index") else "")
        for name, fk in result.foreign_keys.items())


def _checkpoint_line(result: GcResult) -> str:
    if (advice := result.checkpoint_advice) is None:
        return ""
    rate = advice["timed_wal_rate_bytes_per_s"]
    return (f"\n  its WAL forces ~{advice['forced_checkpoints']:,} checkpoints (one every"
            f" ~{_mib(advice['wal_between_checkpoints_bytes'])} with max_wal_size"
            f" {_mib(advice['max_wal_size_bytes'])}), and the application's commits wait longer during"
            f" them: raise max_wal_size to ~{_mib(advice['max_wal_size_to_avoid_them_bytes'])}, or pace"
            f" the run with --max-wal-rate {max(1, rate // 1024)}KB (checkpoints on their timer, about"
            f" {(result.predicted_wal_bytes or 0) / rate / 60:,.0f} min)")


def _partition_lines(result: GcResult) -> str:
    lines = "".join(f"\n  {leaf}: {'drop' if part['drop'] else part['strategy']} ({part['why']})"
                    for leaf, part in result.partitions.items())
    if (advice := result.partitioning_advice) is not None:
        lines += (f"\n  partitioned by day of {advice['column']}, {advice['droppable']:,} of"
                  f" {advice['partitions']:,} days would be wholly garbage: {advice['rows']:,} rows"
                  " dropped with their partitions instead of deleted")
    return lines


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def _reclaim_line(space: dict[str, Any]) -> str:
    before, after = space["after_gc"], space["after_vacuum"]
    return (f"vacuum {space['vacuum_s']:.1f}s:"
            f" dead tuples {before['dead_tuples']:,} -> {after['dead_tuples']:,},"
            f" table {_mib(before['table_bytes'])} -> {_mib(after['table_bytes'])},"
            f" indexes {_mib(before['index_bytes'])} -> {_mib(after['index_bytes'])}"
            + "".join(f" (server warning: {warning})" for warning in space.get("vacuum_warnings", ())))
