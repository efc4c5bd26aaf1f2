"""The statuses of a run, spelled once: the schema's check constraint, the queue and results use them."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    """Written by the API; a worker claims it."""
    RUNNING = "running"
    STOPPED = "stopped"
    """A budget or a signal ended the walk early: the next run resumes it."""
    COMPLETE = "complete"
    """Every slice of the walk reached its end: the garbage the walk covered is gone."""
    FAILED = "failed"
    SUPERSEDED = "superseded"
    """A later run took over its walk."""
    DRY_RUN = "dry-run"
    """A result only, never stored: the run was planned and estimated, nothing was deleted."""


STORED = tuple(s.value for s in RunStatus if s is not RunStatus.DRY_RUN)
RESUMABLE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.STOPPED, RunStatus.FAILED)
ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
FINISHED = (RunStatus.COMPLETE, RunStatus.STOPPED, RunStatus.FAILED)
"""How a run ends; the newest of these is a node's last run, which alerts watch."""
