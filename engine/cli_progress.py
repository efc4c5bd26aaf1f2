"""What the CLI shows while a command works: a progress bar on a terminal (rich, imported only
once there is something to show), and SIGINT/SIGTERM turned into a clean stop."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.result import Progress


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM finish the batch in flight, checkpoint and stop."""

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def gc_progress(enabled: bool) -> Iterator[Callable[[Progress], None] | None]:
    """A progress bar on a terminal, shown from the first batch on: rich takes ~100 ms to import,
    which a GC with nothing to delete (or a dry run) never pays."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with ExitStack() as stack:
        shown: list[Callable[[Progress], None]] = []
        lock = threading.Lock()  # workers report from their own threads

        def update(progress: Progress) -> None:
            with lock:
                if not shown:
                    shown.append(stack.enter_context(gc_bar()))
                shown[0](progress)

        yield update


@contextmanager
def gc_bar() -> Iterator[Callable[[Progress], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("deleting"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn())
    with Bar(*columns, transient=True) as bar:
        task = bar.add_task("gc", total=None, rate="0")

        def update(progress: Progress) -> None:
            rate = progress.deleted / progress.elapsed_s if progress.elapsed_s else 0
            bar.update(task, completed=progress.deleted, rate=f"{rate:,.0f}",
                       total=max(progress.garbage_estimate, progress.deleted))

        yield update


@contextmanager
def phase_progress() -> Iterator[Callable[[str, float], None] | None]:
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
             transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def update(phase: str, fraction: float) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=1.0)
            bar.update(tasks[phase], completed=fraction)

        yield update
