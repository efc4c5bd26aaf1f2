"""The error hierarchy: every failure msggc expects carries a message a user can act on.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; anything outside
this hierarchy is a bug and keeps its traceback.
"""

from __future__ import annotations


class MsggcError(Exception):
    """Base of every error msggc raises on purpose."""

    exit_code = 1


class UsageError(MsggcError):
    """The caller asked for something that cannot work: fix the input and retry."""

    exit_code = 2


class DatabaseUnreachable(UsageError):
    """No connection could be made to the database named by the DSN."""


class SchemaMissing(UsageError):
    """msggc's own tables are absent: the database was never migrated."""


class TargetTableError(UsageError):
    """The table to collect is missing or lacks the columns msggc needs."""


class PermissionMissing(UsageError):
    """The database role may not do what the command needs (DELETE, CREATE ...)."""


class GcAlreadyRunning(MsggcError):
    """Another GC holds the table's advisory lock; only one may run per table."""

    exit_code = 4


class EmbeddedServerError(MsggcError):
    """The embedded PostgreSQL could not be started or stopped."""


class DeliveryFailed(MsggcError):
    """A notification could not be delivered this time; it stays queued for a retry."""


class BudgetCannotHold(MsggcError):
    """The application is already over the latency budget before the run writes anything:
    whatever the run does, the budget cannot hold, so the run deletes nothing."""
