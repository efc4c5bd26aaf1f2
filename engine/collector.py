"""One GC run: ``check -> lock -> plan -> walk (delete + checkpoint) -> close``.

Everything that can be checked is checked before the run's row exists, so a usage error leaves
no trace; from the moment the row exists, every way out of the run goes through
:func:`engine.finish.close`, so no run is left ``running`` by an error and none is reported
``complete`` unless its walk reached the end of every slice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from engine import archive_file, partitions, progress, reclaim, runs
from engine.archive import resolve as resolve_archive
from engine.archive_file import ArchiveFile
from engine.compact.choice import chosen as compaction_chosen
from engine.compact.dryrun import predict as predict_compaction
from engine.compact.flow import compact
from engine.compact.recover import recover_table as compact_recover
from engine.config import GcOptions, StrategyName
from engine.db import Connection, connect, require_bookkeeping
from engine.dryrun import dry_run
from engine.errors import GcAlreadyRunning
from engine.finish import Closed, Finisher, SilentFinisher, close, decide
from engine.planner import (
    LEAF_SAMPLE_BLOCKS,
    Plan,
    cutoff_of,
    leaf_plan,
    make_plan,
    partitioned_reason,
    take_sample,
    whole_leaf_plan,
    workers_for,
)
from engine.probe_record import ProbeSite, require_probe_table
from engine.queries import Archive, Statements
from engine.result import GcResult, Progress, percentile
from engine.status import RunStatus
from engine.strategies import SWEEP, Slice, extended, strategy_for
from engine.target import Target, filter_refused_on_rows
from engine.target import resolve as resolve_target
from engine.throttle import Limits, Throttle
from engine.walk import Leg, Walk, guarded, reconnect, walk_run


@dataclass(frozen=True)
class Checked:
    """What a run may rely on once checked: the table, where deleted rows go, and the tables it
    deletes from: the table itself, or each leaf partition of a partitioned one."""

    target: Target
    archive: Archive | None
    legs: dict[str | None, tuple[Target, Statements]]
    """By leaf name; None: the (plain) table itself."""

    @property
    def oid(self) -> int:
        return self.target.oid


def check(conn: Connection, options: GcOptions) -> Checked:
    """Everything that can be refused before a run exists: schema, table, archive, file target."""
    require_bookkeeping(conn)
    if options.max_app_latency_ms:
        require_probe_table(conn)
    target = resolve_target(conn, options.table, with_retention=options.older_than is not None)
    archive = None
    if options.archive and options.strategy != "compact":  # a compaction keeps its old table instead
        archive = resolve_archive(conn, options.table, target.oid)
    elif options.archive_to:
        resuming = runs.resumable_archive_file(conn, options.table.qualified, options.node)
        archive_file.check_target(options.archive_to, resuming)
        archive_file.prepare(conn, options.table)
        archive = archive_file.outgoing_archive(tuple(target.columns))

    def statements(table: Target) -> Statements:
        child_archives = {ref.name: resolve_archive(conn, ref.child, ref.child_oid)
                          for ref in table.references if options.archive
                          and (ref.removes_children or (ref.blocks and options.delete_dependents))}
        return Statements.for_target(table, options.older_than is not None, archive,
                                     options.delete_dependents, child_archives)

    tables: dict[str | None, Target] = {leaf.qualified: leaf for leaf in target.leaves}
    if not target.leaves:
        tables[None] = target
    return Checked(target, archive, {name: (table, statements(table)) for name, table in tables.items()})


def lock_table(conn: Connection, options: GcOptions, oid: int) -> None:
    """One GC per table: taken before the planner samples, so a waiting run costs nothing."""
    if not runs.try_lock_table(conn, oid):
        holder = runs.lock_holder(conn, oid)
        raise GcAlreadyRunning(
            f"another GC is already running on {options.table.qualified}"
            + (f" (backend pid {holder})" if holder else "")
        )


def resume_or_start(conn: Connection, options: GcOptions, plans: dict[str | None, Plan],
                    run_id: int | None, garbage: str) -> tuple[runs.Run, str]:
    """Continue the latest unfinished run of this table and node with its own recorded walk
    (extended to what the table gained past its end), or start the planned walk; returns the
    run and why it walks the way it does.

    ``run_id`` names a queued run to promote (the API's worker); if it had already walked part of
    the table before its worker died, it goes on in place from its checkpoint.
    """
    if run_id is not None and (in_place := runs.walked_so_far(conn, run_id)) is not None:
        return in_place, f"continues its own {in_place.strategy} walk from its checkpoint"
    table = options.table.qualified
    previous = runs.latest_resumable(conn, table, options.node, exclude=run_id)
    plan = plans.get(None)
    key = plan.facts.key if plan else ()
    resumable = previous is not None and previous.continues_with(key)
    if previous is not None and resumable and options.strategy in ("auto", previous.strategy):
        walked = [part for part in previous.slices if part.strategy != SWEEP]  # this run sweeps anew
        slices = (extended(walked, previous.strategy, plan.facts) if plan
                  else _with_new_leaves(walked, plans, options.worker_count))
        run = runs.start(conn, table, options.node, previous.strategy, slices, options.describe(),
                         resumed_from=previous.id, run_id=run_id, garbage=garbage, key=key)
        run.continues = True
        return run, f"resumes run {previous.id}'s {previous.strategy} walk from its checkpoint"
    strategy = plan.strategy if plan else _commonest(plans)
    run = runs.start(conn, table, options.node, strategy, _planned_slices(plans, options.worker_count),
                     options.describe(), resumed_from=previous.id if previous else None, run_id=run_id,
                     garbage=garbage, key=key)
    return run, plan.reason if plan else partitioned_reason(plans.values())


def _planned_slices(plans: dict[str | None, Plan], workers: int) -> list[Slice]:
    """Every leg's slices; the workers spread over a partitioned table's leaves, and split a leaf
    only when there are fewer leaves than workers. A leaf walked by its sweep alone has none; one
    to be dropped whole has one, so that one worker owns its drop."""
    per_leg = max(1, workers // max(1, len(plans)))
    slices = []
    for leaf, plan in plans.items():
        if plan.sweep_only:
            continue
        parts = 1 if plan.drop_whole else per_leg
        for part in strategy_for(plan.strategy, plan.facts).slices(plan.facts, parts):
            if leaf is not None:
                part.leaf, part.strategy = leaf, plan.strategy
            slices.append(part)
    return slices


def _with_new_leaves(slices: list[Slice], plans: dict[str | None, Plan], workers: int) -> list[Slice]:
    """A resumed partitioned walk: its slices, finished where their leaf is gone, and the planned
    walk of every leaf created since."""
    for part in slices:
        part.finished = part.finished or part.leaf not in plans
    walked = {part.leaf for part in slices}
    return [*slices, *_planned_slices({leaf: plan for leaf, plan in plans.items() if leaf not in walked},
                                      workers)]


def _commonest(plans: dict[str | None, Plan]) -> StrategyName:
    return Counter(plan.strategy for plan in plans.values()).most_common(1)[0][0] if plans else "physical"


def legs_of(run: runs.Run, checked: Checked, plans: dict[str | None, Plan]) -> dict[str | None, Leg]:
    """Each leaf walked the way its slices recorded (the run's own way for a plain table)."""
    recorded = {part.leaf: part.strategy or run.strategy for part in run.slices if part.strategy != SWEEP}
    legs = {}
    for leaf, (_table, statements) in checked.legs.items():
        plan = plans[leaf]
        strategy = strategy_for(recorded.get(leaf, run.strategy), plan.facts)
        legs[leaf] = Leg(plan, strategy, statements)
    return legs


def collect(
    dsn: str,
    options: GcOptions | None = None,
    finisher: Finisher | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    run_id: int | None = None,
) -> GcResult:
    """Run one GC on ``dsn`` and return what it did. Raises :class:`MsggcError` on bad input,
    before any run exists; ``finisher`` is told of the run's end (default: nobody).

    ``stop`` ends the run after the batch in flight (resumable); ``run_id`` executes a run
    queued by :func:`engine.runs.enqueue` instead of opening a new one.
    """
    options = options or GcOptions()
    conn = connect(dsn)
    try:
        target = check(conn, options)
        if options.dry_run:
            walking = replace(options, strategy="auto") if options.strategy == "compact" else options
            legs = {leaf: statements for leaf, (_table, statements) in target.legs.items()}
            with filter_refused_on_rows(options.table):  # the planner's samples, the sample batches
                plans, whole = _plans(conn, walking, target)
                walked = dry_run(conn, plans, whole, legs, with_workers(conn, walking, plans), target.target)
                chosen = compaction_chosen(conn, options, target.target, plans)
                if options.strategy != "compact" and chosen is None:
                    return walked
                cutoff = cutoff_of(conn, options)
                return predict_compaction(conn, target.target, legs.get(None), walked, cutoff,
                                          refused=[] if chosen else None)
        lock_table(conn, options, target.oid)
        if partitions.recover(conn, target.oid, options.lock_timeout_ms):
            target = check(conn, options)  # the leaves attached again are walked with the others
        if compact_recover(conn, target.oid, options.lock_timeout_ms, finisher, continuing=run_id):
            target = check(conn, options)  # a swap finished: the table is the compacted one
        if options.strategy == "compact":
            plain = target.legs.get(None, (None, None))[1]
            return compact(conn, dsn, options, target.target, plain, finisher or SilentFinisher(),
                           stop or threading.Event(), run_id)
        with filter_refused_on_rows(options.table):  # before the run exists: past it, the run fails
            plans, whole = _plans(conn, options, target)
        if (why := compaction_chosen(conn, options, target.target, plans)) is not None:
            plain = target.legs[None][1]
            return compact(conn, dsn, options, target.target, plain, finisher or SilentFinisher(),
                           stop or threading.Event(), run_id, reason=why, checked=True)
        options = with_workers(conn, options, plans)
        before = reclaim.health(conn, target.oid)
        run, reason = resume_or_start(conn, options, plans, run_id, target.target.describe())
        walk = Walk(options=options, run=run, legs=legs_of(run, target, plans), oid=target.oid,
                    dsn=dsn, stop=stop or threading.Event(), on_progress=on_progress,
                    throttle=Throttle(_limits(options), target.oid,
                                      ProbeSite(dsn, run.id, options.table.qualified, options.node)))
        progress.record_plan(conn, run.id, walk.garbage_estimate, reason, options.worker_count,
                             [ref.name for ref in target.target.references
                              if ref.effect(options.delete_dependents) == "kept"])
        conn, closed = _walk_and_close(conn, walk, target, whole, finisher or SilentFinisher())
        result = _result(walk, closed, reason, target.target)
        if closed.recorded and not conn.closed:
            result.reclaim = _reclaim_after(conn, options, target.oid, before, run.id)
            runs.unlock_table(conn, target.oid)
        return result
    finally:
        conn.close()


def _plans(conn: Connection, options: GcOptions,
           checked: Checked) -> tuple[dict[str | None, Plan], dict[str, partitions.Leaf]]:
    """Each table's plan, and the leaves that will be dropped whole. A leaf is planned from one
    small sample (``LEAF_SAMPLE_BLOCKS``) that also tells whether it may be wholly garbage (then
    checked exactly), so a table of many leaves does not pay a full planning sample per leaf."""
    cutoff = cutoff_of(conn, options)
    plans: dict[str | None, Plan] = {}
    whole = {}
    for leaf, (table, statements) in checked.legs.items():
        if leaf is None:
            plans[leaf] = make_plan(conn, options, table, statements, cutoff)
            continue
        sample = take_sample(conn, statements, LEAF_SAMPLE_BLOCKS, cutoff)
        if (dropped := partitions.whole_leaf(conn, options, checked.target, sample.all_garbage, statements,
                                             cutoff)) is not None:
            whole[leaf] = dropped
            plans[leaf] = whole_leaf_plan(conn, table, cutoff, sample)
        else:
            plans[leaf] = leaf_plan(conn, options, table, statements, cutoff, sample)
    return plans, whole


def with_workers(conn: Connection, options: GcOptions, plans: dict[str | None, Plan]) -> GcOptions:
    """The options with ``--workers auto`` resolved by the planner (recorded with the run)."""
    if options.workers:
        return options
    return replace(options, workers=workers_for(plans.values(), conn.info.host))


def _limits(options: GcOptions) -> Limits:
    return Limits(options.max_wal_rate, options.max_replica_lag, options.pause_for_vacuum,
                  options.max_app_latency_ms, options.latency_budget_auto)


def _walk_and_close(conn: Connection, walk: Walk, target: Checked, whole: dict[str, partitions.Leaf],
                    finisher: Finisher) -> tuple[Connection, Closed]:
    """From here on the run exists: any error closes it as failed, never leaves it running."""
    if walk.options.archive_to and target.archive:
        archive = target.archive

        def open_file() -> None:
            walk.archive_file = ArchiveFile.open(conn, Path(str(walk.options.archive_to)),
                                                 walk.options.table, archive.columns, walk.run)

        guarded(walk, open_file)
    legs = {leaf: leg.statements for leaf, leg in walk.legs.items() if leaf is not None}
    walk.drops = dict(partitions.drops(whole, legs, walk.options, walk.run, walk.params))
    if walk.error is None:
        try:
            conn = walk_run(conn, walk)
        finally:
            walk.throttle.stop()  # the latency probe's figures are final before the run closes

    def reconnected() -> Connection:
        """The lock holder's connection again, and the walk as the server kept it."""
        fresh = reconnect(walk, holds_lock=True)
        walk.rewind(fresh)
        return fresh

    closed = close(conn, walk.run.id, walk.options.node,
                   lambda: decide(walk.walked_to_end, walk.error, walk.stop_reason), finisher,
                   reconnect=reconnected, deleted_so_far=walk.deleted,
                   throttle_pauses=walk.throttle.pauses, throttled_s=walk.throttle.paused_s)
    if closed.conn is not conn:
        conn.close()
    return closed.conn, closed


def _result(walk: Walk, closed: Closed, reason: str, target: Target) -> GcResult:
    outcome = closed.outcome
    latencies = sorted(walk.latencies_ms)
    return GcResult(
        status=outcome.status,
        strategy=walk.run.strategy,
        reason=reason + _drops_missed(walk),
        garbage_estimate=walk.garbage_estimate,
        rows_estimate=sum(leg.plan.facts.rows_estimate for leg in walk.legs.values()),
        run_id=walk.run.id,
        resumed_from=walk.run.resumed_from,
        workers=walk.options.worker_count,
        stop_reason=walk.stop_reason if outcome.status is RunStatus.STOPPED else None,
        error=outcome.failure if outcome.status is RunStatus.FAILED else None,
        messages_deleted=outcome.messages_deleted,
        rows_skipped_locked=walk.skipped,
        batches=walk.batches,
        elapsed_s=time.monotonic() - walk.started,
        batch_ms_p50=percentile(latencies, 50),
        batch_ms_p99=percentile(latencies, 99),
        batch_ms_max=latencies[-1] if latencies else None,
        notification_error=closed.notification_error,
        throttle_pauses=walk.throttle.pauses,
        throttled_s=walk.throttle.paused_s,
        throttle_reasons=walk.throttle.reasons,
        **walk.throttle.report(),
        garbage=target.describe(),
        partitions=_partitions(walk),
        **_foreign_keys(walk, target),
    )


def _drops_missed(walk: Walk) -> str:
    """The plan said "dropped whole"; what happened to the leaves that were walked instead."""
    missed = sum(1 for leaf, leg in walk.legs.items() if leg.plan.drop_whole and leaf not in walk.dropped
                 and walk.by_leaf[str(leaf)])
    return (f"; {missed} of the leaves to drop walked row by row instead (the table's lock not granted"
            " within lock_timeout, or a row not garbage)") if missed else ""


def _partitions(walk: Walk) -> dict[str, dict[str, Any]]:
    """Per leaf: how it was walked (``sweep``: by its sweep alone), its rows deleted, dropped?"""
    walked = {part.leaf: part.strategy for part in walk.run.slices if part.strategy != SWEEP}
    return {leaf: {"strategy": walked.get(leaf, SWEEP), "deleted": walk.by_leaf[leaf],
                   "dropped": leaf in walk.dropped}
            for leaf in walk.legs if leaf is not None}


def _foreign_keys(walk: Walk, target: Target) -> dict[str, Any]:
    """Every foreign key onto the table with what the run did about it, and the rows kept."""
    delete_dependents = walk.options.delete_dependents
    reports = {ref.name: ref.report(walk.foreign_keys[ref.name], delete_dependents)
               for ref in target.references}
    kept = {name: int(report["rows"]) for name, report in reports.items() if report["effect"] == "kept"}
    return {"foreign_keys": reports, "kept_referenced": kept}


def _reclaim_after(conn: Connection, options: GcOptions, oid: int, before: dict[str, Any],
                   run_id: int) -> dict[str, Any]:
    """The space report of a closed run: a failure here (a VACUUM cancelled, the server gone)
    is reported with it and changes nothing of the run's outcome."""
    try:
        space = reclaim_space(conn, options, oid, before)
        runs.record_reclaim(conn, run_id, space)
    except psycopg.Error as exc:
        return {"before": before, "error": str(exc).strip()}
    return space


def reclaim_space(conn: Connection, options: GcOptions, oid: int,
                  before: dict[str, Any]) -> dict[str, Any]:
    """Sizes and dead tuples before and after the run, and after VACUUM when asked for."""
    space: dict[str, Any] = {"before": before, "after_gc": reclaim.health(conn, oid)}
    if options.vacuum:
        space.update(reclaim.vacuum(conn, options.table, oid))
    return space
