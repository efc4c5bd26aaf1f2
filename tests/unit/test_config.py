"""Option validation, durations, table names and DSN masking."""

from __future__ import annotations

from datetime import timedelta

import pytest

from engine.config import GcOptions, TableSpec, mask_dsn, parse_duration
from engine.errors import UsageError


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200),
                                              ("30d", 2592000), ("2w", 1209600), ("0.5h", 1800)])
def test_durations_parse_with_units(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "-5m", "5x"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


def test_table_names_split_schema_from_name():
    assert TableSpec.parse("messages") == TableSpec(name="messages")
    assert TableSpec.parse("app.messages") == TableSpec(name="messages", schema="app")
    with pytest.raises(UsageError):
        TableSpec.parse("app.")


@pytest.mark.parametrize(
    "changes",
    [{"batch_size": 0}, {"max_rows": 0}, {"max_seconds": 0}, {"sleep": -1}, {"workers": 0},
     {"lock_timeout_ms": 0}, {"strategy": "fastest"}, {"older_than": timedelta(seconds=-1)}],
)
def test_invalid_options_are_refused(changes):
    with pytest.raises(UsageError):
        GcOptions(**changes)


def test_passwords_never_leave_a_masked_dsn():
    assert "hunter2" not in mask_dsn("postgresql://app:hunter2@db:5432/prod")
    assert "hunter2" not in mask_dsn("host=db password=hunter2 dbname=prod")
    assert "password=***" in mask_dsn("host=db password=hunter2 dbname=prod")
