"""The latency guard's controller and its budget flag, as pure logic: no database, no clock."""

from __future__ import annotations

import pytest

from engine.config import GcOptions, parse_latency
from engine.errors import UsageError
from engine.guard import AIMD_DECREASE, AIMD_INCREASE, MIN_SHARE, STEP_SAMPLES, Aimd, percentile


def feed(aimd: Aimd, latency_ms: float, steps: int, start: float = 0.0) -> float:
    """``steps`` control steps of samples all at ``latency_ms``, 0.1 s apart; returns the clock."""
    now = start
    for _ in range(steps * STEP_SAMPLES):
        now += 0.1
        aimd.observe(latency_ms, now)
    return now


def test_a_p99_over_the_budget_halves_the_share_of_time_the_run_works():
    aimd = Aimd(budget_ms=20)
    feed(aimd, 35, steps=1)
    assert aimd.share == pytest.approx(AIMD_DECREASE)
    feed(aimd, 35, steps=1)
    assert aimd.share == pytest.approx(AIMD_DECREASE**2)


def test_one_slow_commit_among_fast_ones_is_the_p99_of_its_step():
    aimd = Aimd(budget_ms=20)
    for n in range(STEP_SAMPLES):
        aimd.observe(80 if n == 2 else 1, n * 0.1)
    assert aimd.share == pytest.approx(AIMD_DECREASE)


def test_the_share_never_falls_below_its_floor_so_a_run_always_finishes():
    aimd = Aimd(budget_ms=0.001)
    feed(aimd, 5, steps=50)
    assert aimd.share == MIN_SHARE
    assert aimd.pause_after(1.0) == pytest.approx((1 - MIN_SHARE) / MIN_SHARE)


def test_room_under_the_budget_raises_the_share_additively_up_to_all_the_time():
    aimd = Aimd(budget_ms=20, share=0.25)
    feed(aimd, 2, steps=1)
    assert aimd.share == pytest.approx(0.25 + AIMD_INCREASE)
    feed(aimd, 2, steps=1)
    assert aimd.share == pytest.approx(0.25 + 2 * AIMD_INCREASE)
    feed(aimd, 2, steps=20)
    assert aimd.share == 1.0


def test_a_p99_just_under_the_budget_holds_the_share():
    aimd = Aimd(budget_ms=20, share=0.5)
    feed(aimd, 19, steps=3)
    assert aimd.share == 0.5


def test_a_probe_write_stuck_past_the_budget_decreases_without_waiting_for_it():
    aimd = Aimd(budget_ms=20)
    aimd.stalled(waiting_ms=500, now=10.0)
    assert aimd.share == pytest.approx(AIMD_DECREASE)
    aimd.stalled(waiting_ms=600, now=10.1)  # the same stall, within one step: no second halving
    assert aimd.share == pytest.approx(AIMD_DECREASE)
    aimd.stalled(waiting_ms=1000, now=10.6)
    assert aimd.share == pytest.approx(AIMD_DECREASE**2)


def test_a_worker_at_full_share_never_pauses_and_at_half_pauses_as_long_as_it_worked():
    assert Aimd(budget_ms=20).pause_after(0.05) == 0.0
    assert Aimd(budget_ms=20, share=0.5).pause_after(0.05) == pytest.approx(0.05)


def test_percentiles_of_few_samples_are_their_worst():
    assert percentile([1.0, 2.0, 50.0], 99) == 50.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([], 99) is None


@pytest.mark.parametrize(("text", "ms"), [("20ms", 20.0), ("1.5ms", 1.5), ("0.2s", 200.0), ("7", 7.0),
                                          ("0.001ms", 0.001)])
def test_latencies_parse_to_milliseconds(text, ms):
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["abc", "0ms", "-5ms", "0", "ms", "", "nanms", "infms", "20 parsecs"])
def test_bad_latencies_are_usage_errors(text):
    with pytest.raises(UsageError, match="invalid latency"):
        parse_latency(text)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_a_latency_budget_must_be_positive_and_finite(value):
    with pytest.raises(UsageError, match="max app latency"):
        GcOptions(max_app_latency_ms=value)


def test_the_service_config_takes_a_latency_budget_with_or_without_a_unit():
    from engine.service.settings import gc_values

    assert gc_values({"max_app_latency_ms": "20ms"}) == {"max_app_latency_ms": 20.0}
    assert gc_values({"max_app_latency_ms": 15}) == {"max_app_latency_ms": 15}


@pytest.mark.parametrize("value", [0, -3, "20ms"])
def test_the_api_refuses_a_latency_budget_that_is_not_a_positive_number_of_ms(value):
    from pydantic import ValidationError

    from engine.service.api_models import GcRequest

    with pytest.raises(ValidationError):
        GcRequest(max_app_latency_ms=value)
    assert GcRequest(max_app_latency_ms=20).overrides() == {"max_app_latency_ms": 20}
