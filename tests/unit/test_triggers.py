"""When a scheduled GC is due: intervals from start, cron expressions in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.errors import UsageError
from engine.service.triggers import Cron, Every, trigger_of

NOON = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def test_an_interval_fires_at_start_then_one_interval_after_each_firing():
    every = Every(timedelta(hours=1))
    assert every.first(NOON) == NOON
    assert every.next_after(NOON) == NOON + timedelta(hours=1)


def test_a_daily_cron_waits_for_its_time_in_utc_and_never_repeats_the_time_it_fired_at():
    nightly = Cron("0 3 * * *")
    assert nightly.first(NOON) == datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    fired = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    assert nightly.next_after(fired) == datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


def test_a_six_field_cron_counts_seconds_first():
    assert Cron("*/10 * * * * *").next_after(NOON + timedelta(seconds=3)) == NOON + timedelta(seconds=10)


def test_weekday_and_step_fields_follow_cron():
    weekdays_at_9 = Cron("30 9 * * 1-5")
    saturday = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert weekdays_at_9.next_after(saturday) == datetime(2026, 11, 30, 9, 30, tzinfo=UTC)  # Monday


@pytest.mark.parametrize(("expression", "message"), [
    ("0 3 * *", "Wrong number of fields"),
    ("61 * * * *", "Bad minute"),
    ("every night", "invalid cron expression"),
])
def test_an_invalid_cron_expression_is_a_usage_error(expression, message):
    with pytest.raises(UsageError, match=message):
        Cron(expression)


def test_an_interval_under_a_second_is_refused():
    with pytest.raises(UsageError, match="at least 1s"):
        Every(timedelta(seconds=0.5))


def test_one_trigger_at_most():
    assert trigger_of(None, None) is None
    assert trigger_of(timedelta(minutes=5), None) == Every(timedelta(minutes=5))
    assert trigger_of(None, "0 3 * * *") == Cron("0 3 * * *")
    with pytest.raises(UsageError, match="exclude each other"):
        trigger_of(timedelta(minutes=5), "0 3 * * *")


def test_descriptions_name_the_trigger():
    assert Every(timedelta(hours=1)).describe() == "every 1:00:00"
    assert Cron("0 3 * * *").describe() == "cron '0 3 * * *' (UTC)"
