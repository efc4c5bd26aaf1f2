"""What a GC run is asked to do, and where: options, target table and DSN resolution."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

from engine.errors import UsageError

StrategyName = Literal["auto", "physical", "index", "key", "compact"]
STRATEGIES: tuple[StrategyName, ...] = ("auto", "physical", "index", "key", "compact")
ARCHIVE_FORMATS = ("gzip", "zstd", "parquet")


@dataclass(frozen=True)
class TableSpec:
    """The table to collect and what makes a row of it garbage, as the operator names them.

    Names are identifiers, never SQL: they only reach the database through ``psycopg.sql``; the
    ``where`` filter is SQL, accepted only once :mod:`engine.predicate` has parsed and checked it.
    """

    name: str = "messages"
    schema: str | None = None
    key: tuple[str, ...] = ()
    """The key columns the keyset walks order by; empty: the table's primary key (or none)."""
    processed_column: str | None = None
    """Garbage once it IS NOT NULL; None: ``processed_at`` when the table has one."""
    where: str | None = None
    """An operator's filter added to the processed column's test (or garbage's only definition)."""

    @classmethod
    def parse(cls, qualified: str, key: str | None = None, processed_column: str | None = None,
              where: str | None = None) -> TableSpec:
        """``messages`` or ``app.messages`` (a dot separates the schema, as in SQL); ``key`` is
        ``COLUMN[,COLUMN]``."""
        schema, dot, name = qualified.rpartition(".")
        if not name or (dot and not schema):
            raise UsageError(f"invalid table name {qualified!r}: expected NAME or SCHEMA.NAME")
        columns = tuple(part.strip() for part in key.split(",")) if key else ()
        if any(not column for column in columns):
            raise UsageError(f"invalid --key {key!r}: expected COLUMN or COLUMN,COLUMN")
        return cls(name=name, schema=schema or None, key=columns,
                   processed_column=processed_column or None, where=where or None)

    def describe(self) -> dict[str, Any]:
        return {"key": list(self.key) or None, "processed_column": self.processed_column,
                "where": self.where}

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class GcOptions:
    """Everything that shapes one GC run; defaults are safe for a live service."""

    table: TableSpec = field(default_factory=TableSpec)
    strategy: StrategyName = "auto"
    batch_size: int | None = None
    """Fixed rows per batch; ``None`` adapts the size toward ``target_batch_ms``."""
    target_batch_ms: float = 50.0
    max_rows: int | None = None
    max_seconds: float | None = None
    sleep: float = 0.0
    older_than: timedelta | None = None
    lock_timeout_ms: int = 100
    statement_timeout_ms: int = 5000
    workers: int | None = None
    """Parallel workers; None: as many as pay off on this table and server (the planner's)."""
    dry_run: bool = False
    node: str = ""
    archive: bool = False
    no_drop: bool = False
    """Walk a partitioned table's wholly-garbage leaves row by row instead of dropping them."""
    delete_dependents: bool = False
    """Delete (and with ``archive`` archive) the child rows of NO ACTION/RESTRICT foreign keys that
    hold a garbage row, in the batch's transaction, instead of keeping the row."""
    """Move deleted rows to ``<table>_archive`` in the same statement (``msggc restore`` undoes)."""
    archive_to: str | None = None
    archive_format: str | None = None
    """``gzip`` or ``zstd`` (CSV), or ``parquet``; None: told by the file name (``.zst``/``.zstd``,
    ``.parquet``), else gzip."""
    """Stream deleted rows with COPY into this new gzip CSV file (``msggc restore --file`` undoes)."""
    max_wal_rate: float | None = None
    """Bytes of WAL per second the run may cause on average; batches wait beyond it."""
    max_replica_lag: timedelta | None = None
    pause_for_vacuum: bool = False
    max_app_latency_ms: float | None = None
    """Keep a probe's commit latency (p99 of the last ~0.5 s) under this: the run slows down
    (additive increase, multiplicative decrease) while it is over (:mod:`engine.guard`)."""
    latency_budget_auto: bool = False
    """``max_app_latency_ms`` was measured before the run (``auto``): if the application alone is
    over it before the run writes anything, it is measured again from those commits rather than
    the run refused (the application is slower than when it was measured, not the budget wrong)."""
    vacuum: bool = False
    """``VACUUM (ANALYZE)`` the table after the run, reporting sizes before and after."""
    async_commit: bool = True
    """Batch commits do not wait for their WAL flush (``--sync-commit``: they do). Safe: a
    batch's delete and checkpoint are lost together in a server crash (the resumed run redoes
    them), and the run's closing transaction is synchronous, so its flush covers every batch."""

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (self.batch_size is None or self.batch_size >= 1, "batch size must be >= 1"),
            (0 < self.target_batch_ms < math.inf, "target batch duration must be > 0 ms and finite"),
            (self.max_rows is None or self.max_rows >= 1, "max rows must be >= 1"),
            (self.max_seconds is None or 0 < self.max_seconds < math.inf,
             "max seconds must be > 0 and finite"),
            (0 <= self.sleep < math.inf, "sleep must be >= 0 and finite"),
            (self.older_than is None or self.older_than >= timedelta(0), "older-than must be >= 0"),
            (self.lock_timeout_ms >= 1, "lock timeout must be >= 1 ms"),
            (self.statement_timeout_ms >= 10, "statement timeout must be >= 10 ms"),
            (self.workers is None or 1 <= self.workers <= 16, "workers must be between 1 and 16"),
            (not (self.archive and self.archive_to), "choose --archive or --archive-to, not both"),
            (self.archive_format is None or self.archive_format in ARCHIVE_FORMATS,
             f"archive format must be one of {', '.join(ARCHIVE_FORMATS)}"),
            (self.archive_format is None or self.archive_to is not None,
             "--archive-format needs --archive-to"),
            (self.max_wal_rate is None or self.max_wal_rate > 0, "max WAL rate must be > 0"),
            (self.max_replica_lag is None or self.max_replica_lag > timedelta(0),
             "max replica lag must be > 0"),
            (self.max_app_latency_ms is None or 0 < self.max_app_latency_ms < math.inf,
             "max app latency must be > 0 ms and finite"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.archive_to is not None:
            archive_format_for(self.archive_to, self.archive_format)

    @property
    def worker_count(self) -> int:
        """``workers`` once the planner resolved ``auto`` (1 before it has)."""
        return self.workers or 1

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the options, stored with the run."""
        record = asdict(self)
        record["table"] = self.table.qualified
        record["target"] = self.table.describe()
        for name in ("older_than", "max_replica_lag"):
            value = getattr(self, name)
            record[name] = value.total_seconds() if value else None
        return record


def given_dsn(dsn: str | None) -> str | None:
    """An explicit DSN, else ``$MSGGC_DSN``, checked for syntax; None when neither is set (the
    CLI then falls back to the embedded server: the core never starts one)."""
    chosen = dsn or os.environ.get("MSGGC_DSN")
    if not chosen:
        return None
    from psycopg import conninfo  # here, not at the top: `import engine.cli` stays free of psycopg

    try:
        conninfo.conninfo_to_dict(chosen)
    except Exception as exc:
        raise UsageError(f"invalid DSN {mask_dsn(chosen)!r}: {scrub_dsn(str(exc), chosen)}") from None
    return chosen


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced, safe for logs and error messages."""
    from psycopg import conninfo

    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    if params.get("password"):
        params["password"] = "***"
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


_URI_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)[^@\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]+)", re.IGNORECASE)


def scrub_dsn(text: str, dsn: str) -> str:
    """A driver message about ``dsn`` on one line, without the DSN's password: libpq quotes a
    DSN it cannot parse verbatim ("... in URI: "postgresql://u:secret@[::1/db"")."""
    text = " ".join(text.replace(dsn, mask_dsn(dsn)).split())
    return _KEYWORD_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***@", text))


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def archive_format_for(name: str | None, requested: str | None) -> str:
    """The format of an ``--archive-to`` file: as asked, or told by its name, else gzip; a name
    that says another format than the one asked is refused."""
    lower = (name or "").lower().rstrip("/" + os.sep)
    implied = ("zstd" if lower.endswith((".zst", ".zstd")) else "parquet" if lower.endswith(".parquet")
               else "gzip" if lower.endswith(".gz") else None)
    if requested is not None and implied is not None and requested != implied:
        raise UsageError(f"archive file {name} is named as {implied}, not {requested}:"
                         f" name it {SUFFIX_HINTS[requested]} or drop --archive-format")
    return requested or implied or "gzip"


SUFFIX_HINTS = {"gzip": "*.csv.gz", "zstd": "*.csv.zst", "parquet": "*.parquet"}


def parse_size(text: str) -> int:
    """``512KB``, ``50MB``, ``1GB`` or a bare number of bytes."""
    number = text.rstrip("KMGBkmgb")
    unit = text[len(number):].upper()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in SIZE_UNITS or not 0 < amount < math.inf:
        raise UsageError(f"invalid size {text!r}: use e.g. 512KB, 50MB, 1GB")
    return round(amount * SIZE_UNITS[unit])


LATENCY_UNITS = {"ms": 1.0, "s": 1000.0}


def parse_latency(text: str) -> float:
    """``20ms``, ``1.5ms``, ``0.2s`` (a bare number is milliseconds), in milliseconds, > 0."""
    unit = next((unit for unit in LATENCY_UNITS if text.endswith(unit)), "")
    try:
        amount = float(text[: len(text) - len(unit)] if unit else text)
    except ValueError:
        amount = -1.0
    if not 0 < amount < math.inf:
        raise UsageError(f"invalid latency {text!r}: use e.g. 20ms, 1.5ms, 0.2s (more than zero)")
    return amount * LATENCY_UNITS.get(unit, 1.0)


AUTO_LATENCY: Literal["auto"] = "auto"
LatencySetting = float | Literal["auto"] | None
"""A service's latency budget: milliseconds, ``auto`` (measured before each run), None (off)."""


def parse_latency_setting(value: object) -> LatencySetting:
    """``auto``, ``off``, or a latency (``20ms``, ``0.2s``, a number of milliseconds): the
    service's ``max_app_latency_ms``. Anything else is a one-line usage error."""
    if isinstance(value, str) and value.strip().lower() in (AUTO_LATENCY, "off"):
        return AUTO_LATENCY if value.strip().lower() == AUTO_LATENCY else None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"invalid max_app_latency_ms {value!r}: use auto, off, or a latency such as 20ms")
    try:
        return parse_latency(str(value).strip())
    except UsageError:
        raise UsageError(f"invalid max_app_latency_ms {value!r}: use auto, off, or a latency such as 20ms"
                         " (more than zero)") from None


def parse_workers(text: str) -> int | None:
    """``auto`` (None: the planner decides) or a count from 1 to 16."""
    if text == "auto":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise UsageError(f"invalid workers {text!r}: use auto or a number from 1 to 16")
    return int(text)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` (a bare number is seconds)."""
    value, unit = (text[:-1], text[-1]) if text and text[-1] in DURATION_UNITS else (text, "s")
    try:
        amount = float(value)
    except ValueError:
        raise UsageError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 30d") from None
    if amount < 0:
        raise UsageError(f"invalid duration {text!r}: must not be negative")
    try:
        return timedelta(seconds=amount * DURATION_UNITS[unit])
    except (OverflowError, ValueError):  # inf, nan, or beyond timedelta's ~2.7 million years
        raise UsageError(f"invalid duration {text!r}: must be a finite, reasonable length") from None
