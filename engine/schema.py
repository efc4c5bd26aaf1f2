"""The single description of msggc's schema; Alembic autogenerates its migrations from it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from engine.status import STORED

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

RUN_STATUSES = STORED
"""``stopped`` runs (budget or signal) and ``failed`` ones are resumed by the next run."""

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("message_id", sa.Text, nullable=False, unique=True),
    sa.Column("chat_id", sa.Text, nullable=False),
    sa.Column("direction", sa.SmallInteger, nullable=False),
    sa.Column("status", sa.SmallInteger, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
    # The garbage index: small (only processed rows), it lets the index strategy find
    # sparse garbage without reading the live rows around it.
    sa.Index(
        "ix_messages_garbage",
        "id",
        postgresql_where=sa.text("processed_at IS NOT NULL"),
    ),
)

messages_archive = sa.Table(
    "messages_archive",
    metadata,
    # The columns of `messages`, without identity or uniqueness: a row may be archived, restored
    # and archived again. `--archive` moves rows here in the statement that deletes them.
    sa.Column("id", sa.BigInteger, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("chat_id", sa.Text, nullable=False),
    sa.Column("direction", sa.SmallInteger, nullable=False),
    sa.Column("status", sa.SmallInteger, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("run_id", sa.BigInteger, nullable=False),
    # BRIN: both columns only grow as rows arrive (see migration 0009)
    sa.Index("ix_messages_archive_run_id", "run_id", postgresql_using="brin",
             postgresql_with={"autosummarize": "on"}),
    sa.Index("ix_messages_archive_archived_at", "archived_at", postgresql_using="brin",
             postgresql_with={"autosummarize": "on"}),
)

gc_runs = sa.Table(
    "gc_runs",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("node", sa.Text, nullable=False, server_default=""),
    sa.Column("table_name", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("strategy", sa.Text, nullable=True),
    sa.Column("cursor", postgresql.JSONB, nullable=True),
    sa.Column("options", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("messages_deleted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_skipped_locked", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("batches", sa.Integer, nullable=False, server_default="0"),
    sa.Column("throttle_pauses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("throttled_seconds", sa.Float, nullable=False, server_default="0"),
    # --max-app-latency: the probe's commit latency over the run, and the time the guard held it back.
    sa.Column("app_latency_p50_ms", sa.Float, nullable=True),
    sa.Column("app_latency_p99_ms", sa.Float, nullable=True),
    sa.Column("app_probes", sa.Integer, nullable=True),
    sa.Column("held_back_seconds", sa.Float, nullable=False, server_default="0"),
    # The probe's p99 in the second before the workers started (the application alone), and the
    # guard's time series: per control step the WAL rate granted and written, the probe's p99,
    # the checkpoints requested and the buffers backends wrote since the start (migration 0011).
    sa.Column("app_latency_before_p99_ms", sa.Float, nullable=True),
    sa.Column("guard_series", postgresql.JSONB, nullable=True),
    # What the status page draws (engine.progress, migration 0012): the plan's garbage estimate
    # and reason, live throttle figures, and samples of (seconds, rows deleted, WAL position).
    sa.Column("progress", postgresql.JSONB, nullable=True),
    sa.Column("reclaim", postgresql.JSONB, nullable=True),
    # --archive-to: the file and its length as of the last committed batch (a longer file is cut back).
    sa.Column("archive_file", sa.Text, nullable=True),
    sa.Column("archive_bytes", sa.BigInteger, nullable=True),
    # Per foreign key onto the table: garbage rows it kept, or child rows deleted or changed.
    sa.Column("foreign_keys", postgresql.JSONB, nullable=True),
    # The garbage predicate in force (processed column and --where), as the operator reads it.
    sa.Column("garbage", sa.Text, nullable=True),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("resumed_from", sa.BigInteger, sa.ForeignKey("gc_runs.id"), nullable=True),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in RUN_STATUSES) + ")", name="status"
    ),
    sa.Index("ix_gc_runs_table_name_node_status", "table_name", "node", "status"),
)

gc_outbox = sa.Table(
    "gc_outbox",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("gc_runs.id"), nullable=False),
    sa.Column("target_url", sa.Text, nullable=False),
    # Text, not JSONB: the body is delivered byte for byte as it was written (key order kept).
    sa.Column("body", sa.Text, nullable=False),
    # Signed by the process that queued the notice, with its secret: whoever delivers it later
    # sends this header unchanged (NULL: the notice is unsigned).
    sa.Column("signature", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column(
        "next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Index(
        "ix_gc_outbox_pending",
        "next_attempt_at",
        postgresql_where=sa.text("delivered_at IS NULL"),
    ),
)

gc_sweep = sa.Table(
    "gc_sweep",
    metadata,
    # The keys of the garbage a finished walk may have passed by (rows the application moved
    # behind a heap walk, or changed where an earlier run of a resumed walk had been), read in
    # one statement after the walk; the run's sweep slice deletes them by key, n by n. Kept
    # here, not in memory, so a sweep resumes after a reconnect like any slice.
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("gc_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("leaf", sa.Text, nullable=False),  # '' for a plain table
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("key", postgresql.JSONB, nullable=False),  # {column: value}; {"ctid": ...} without a key
    sa.PrimaryKeyConstraint("run_id", "leaf", "n"),
)

gc_probe = sa.Table(
    "gc_probe",
    metadata,
    # The latency guard's probe row, one per table and node (one GC at a time on each): the run's
    # probe commits an update of it every ~100 ms with synchronous_commit on and times it. It
    # also carries the live figures (recent p50/p99, time held back, the share of time the
    # workers may work), so a scrape sees them while the run goes on.
    sa.Column("table_name", sa.Text, nullable=False),
    sa.Column("node", sa.Text, nullable=False, server_default=""),
    sa.Column("run_id", sa.BigInteger, nullable=True),
    sa.Column("beats", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("beat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("p50_ms", sa.Float, nullable=True),
    sa.Column("p99_ms", sa.Float, nullable=True),
    sa.Column("held_back_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("rate_share", sa.Float, nullable=False, server_default="1"),
    # The WAL rate the guard grants and the server's measured one (bytes/s), the checkpoints
    # requested since the run began, and the probe's p99 before the workers started (0011).
    sa.Column("rate_bytes_per_s", sa.Float, nullable=True),
    sa.Column("wal_bytes_per_s", sa.Float, nullable=True),
    sa.Column("checkpoints_requested", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("before_p99_ms", sa.Float, nullable=True),
    sa.PrimaryKeyConstraint("table_name", "node"),
)

gc_restored = sa.Table(
    "gc_restored",
    metadata,
    # What `msggc restore --file` has put back: one row per archived batch and table, written in
    # the transaction that inserts the batch's rows, so a rerun (after a crash too, or on another
    # copy of the file) skips it: a table without a key would otherwise take its rows twice. A
    # batch is known by the SHA-256 of its rows, which hold their run id and archived_at.
    sa.Column("table_name", sa.Text, nullable=False),  # schema.table as the catalog spells it
    sa.Column("batch_sha256", sa.LargeBinary, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("file", sa.Text, nullable=False),  # where it was read from, and its batch number
    sa.Column("batch", sa.Integer, nullable=False),
    sa.Column("restored_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.PrimaryKeyConstraint("table_name", "batch_sha256"),
)
