"""The latency guard's controller and its budget flag, as pure logic: no database, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from engine.budget_prediction import predict_under_budget, ramp_seconds
from engine.cleaning import DirtyBucket, cleaning_pace
from engine.config import GcOptions, parse_latency
from engine.errors import UsageError
from engine.guard import BEFORE_SAMPLES
from engine.guard_series import SERIES_POINTS, Series
from engine.rate_control import (
    DECREASE,
    INCREASE_SHARE,
    INITIAL_RATE,
    MIN_RATE,
    PROBE_INTERVAL_S,
    STEP_SAMPLES,
    MiB,
    RateControl,
    percentile,
)
from engine.sizer import BatchSizer


def feed(control: RateControl, latencies_ms: list[float], start: float = 0.0,
         used: float | None = None, **signals: Any) -> float:
    """Probe samples 0.1 s apart, a control step after every ``STEP_SAMPLES`` of them (as the
    probe takes it); returns the clock."""
    now = start
    for latency in latencies_ms:
        now += 0.1
        if control.observe(latency):
            control.step(now, used, **signals)
    return now


def calm(steps: int, ms: float = 1.0) -> list[float]:
    return [ms] * (steps * STEP_SAMPLES)


def test_a_guarded_run_starts_gentle_and_doubles_its_rate_each_calm_step():
    control = RateControl(budget_ms=20)
    assert control.rate == INITIAL_RATE
    feed(control, calm(3))
    assert control.rate == pytest.approx(INITIAL_RATE * 8)


def test_a_step_over_the_budget_halves_the_rate_within_that_step_and_ends_slow_start():
    control = RateControl(budget_ms=20)
    feed(control, calm(4))  # 16 MiB/s
    feed(control, [1, 1, 45, 1, 1])  # one commit over the budget: the step's p99
    assert control.rate == pytest.approx(8 * MiB)
    assert control.decreases == 1
    feed(control, calm(1))  # past slow start: additive growth, a share of the rate at the decrease
    assert control.rate == pytest.approx(8 * MiB * (1 + INCREASE_SHARE))


def test_a_synthetic_probe_series_over_the_budget_brings_the_rate_down_to_what_it_needs():
    """A probe whose p99 is the budget's twice over as long as the run writes more than 2 MiB/s:
    the rate settles just under that, halving on each step over and growing back slowly."""
    control = RateControl(budget_ms=10)
    rates = []
    now = 0.0
    for _ in range(60):
        p99 = 20.0 if control.rate > 2 * MiB else 3.0
        now = feed(control, calm(1, p99), start=now)
        rates.append(control.rate)
    assert max(rates[-20:]) <= 2 * MiB * (1 + INCREASE_SHARE) ** 2
    assert min(rates[-20:]) >= MiB * DECREASE


def test_halving_starts_from_the_rate_the_server_really_wrote_not_an_unused_grant():
    control = RateControl(budget_ms=20, rate=64 * MiB)
    feed(control, calm(1, 50), used=4 * MiB)
    assert control.rate == pytest.approx(2 * MiB)


def test_the_rate_grows_no_further_than_twice_what_the_run_really_wrote():
    control = RateControl(budget_ms=20, rate=4 * MiB)
    feed(control, calm(5), used=3 * MiB)
    assert control.rate == pytest.approx(6 * MiB)


def test_a_requested_checkpoint_holds_the_rate_where_it_is():
    control = RateControl(budget_ms=20, rate=8 * MiB)
    feed(control, calm(2), checkpoint_requested=True)
    assert control.rate == pytest.approx(8 * MiB)


def test_halving_that_leaves_the_p99_as_high_stops_after_three_steps():
    """Another load (not the run) keeps the probe at 60 ms: three halvings, then the rate holds
    so the run still completes; once a step comes under the budget the controller is back."""
    control = RateControl(budget_ms=20, rate=8 * MiB)
    feed(control, calm(10, 60))
    assert control.rate == pytest.approx(8 * MiB * DECREASE**3)
    assert control.futile == 7
    feed(control, calm(1, 2))
    assert control.rate > 8 * MiB * DECREASE**3
    feed(control, calm(1, 60))  # over the budget again: halving is tried again
    assert control.decreases == 4


def test_halving_goes_on_while_it_lowers_the_p99():
    control = RateControl(budget_ms=20, rate=8 * MiB)
    now = 0.0
    for p99 in (200, 150, 100, 70, 50, 30):
        now = feed(control, calm(1, p99), start=now)
    assert control.decreases == 6 and control.futile == 0


def test_backends_evicting_dirty_pages_hold_the_rate_however_calm_the_probe():
    """10M dense beside pgbench, budget 14.5 ms: the probe's p99 under 6 ms most steps while
    backends wrote 15,000 buffers a second and pgbench's p99 was 94.6 ms: the eviction is the
    signal the probe's one-row commit cannot give; the rate grows no further while it lasts,
    and grows again once a step is calm and free of it."""
    control = RateControl(budget_ms=20, rate=8 * MiB)
    feed(control, calm(4, 1.0), evicting=15_000.0)
    assert control.rate == pytest.approx(8 * MiB) and control.decreases == 0
    feed(control, calm(1, 1.0))
    assert control.rate > 8 * MiB


def test_the_rate_goes_as_low_as_its_floor_and_never_stops_the_run():
    control = RateControl(budget_ms=0.001)
    now = 0.0
    for step in range(40):  # each halving helps a little, never enough
        now = feed(control, calm(1, 1000 * 0.8**step), start=now)
    assert control.rate == MIN_RATE
    assert control.lowest == MIN_RATE


def test_a_p99_just_under_the_budget_holds_the_rate():
    control = RateControl(budget_ms=20, rate=3 * MiB)
    feed(control, calm(3, 19))
    assert control.rate == 3 * MiB


def test_a_probe_write_stuck_past_the_budget_decreases_without_waiting_for_it():
    control = RateControl(budget_ms=20)
    control.stalled(waiting_ms=500, now=10.0)
    assert control.rate == pytest.approx(INITIAL_RATE * DECREASE)
    control.stalled(waiting_ms=600, now=10.1)  # the same stall, within one step: no second halving
    assert control.rate == pytest.approx(INITIAL_RATE * DECREASE)
    control.stalled(waiting_ms=1000, now=10.6)
    assert control.rate == pytest.approx(INITIAL_RATE * DECREASE**2)


def test_the_series_keeps_a_bounded_number_of_points_over_a_long_run():
    series = Series()
    for step in range(SERIES_POINTS * 5):
        series.add({"t_s": step * 0.5, "rate_bytes_per_s": 1000.0, "p99_ms": float(step % 7),
                    "wal_bytes_per_s": 900.0, "checkpoints_requested": step // 100, "backend_writes": 0})
    points = series.all()
    assert len(points) <= SERIES_POINTS
    assert points[-1]["t_s"] == (SERIES_POINTS * 5 - 1) * 0.5
    assert points[-1]["checkpoints_requested"] == (SERIES_POINTS * 5 - 1) // 100
    assert max(p["p99_ms"] or 0 for p in points) == 6.0  # merged points keep their worst p99


def test_a_batch_never_writes_more_wal_than_the_guards_bound():
    sizer = BatchSizer(initial=400, maximum=10_000, target_s=0.05, target_rows=None)
    sizer.observe(0.01, 400, cost=400 * 360, cost_cap=36_000)  # fast: would double, WAL says 100
    assert sizer.size == 100
    sizer.observe(0.01, 100, cost=100 * 360, cost_cap=None)  # no guard: toward the duration
    assert sizer.size == 200


def test_the_dry_run_says_a_budget_under_the_p99_alone_cannot_hold_and_why():
    verdict = predict_under_budget(5.0, [4.0] * 20 + [6.0], [30.0] * 5, 100 * MiB, 10.0, None)
    assert verdict.verdict.startswith("cannot hold: the application's commit p99 alone is 6.0 ms")
    assert verdict.alone_p99_ms == 6.0
    assert verdict.rate == MIN_RATE


def test_the_dry_run_predicts_the_duration_at_the_rate_the_budget_allows():
    # alone 2 ms, 20 ms beside full speed (50 MiB/s): a 10 ms budget, aimed at 9 ms, allows 7/18 of it
    verdict = predict_under_budget(10.0, [2.0] * 20, [20.0] * 10, 500 * MiB, 10.0, None)
    assert verdict.verdict.startswith("holds: WAL at ~19.44 MB/s")
    assert verdict.rate == pytest.approx(50 * MiB * 7 / 18)
    # slow start: 0.5 s at each of 1, 2, 4, 8, 16 MiB/s (15.5 MiB), then the rest at the rate
    alone_s = BEFORE_SAMPLES * PROBE_INTERVAL_S
    assert verdict.seconds == pytest.approx(alone_s + 2.5 + (500 - 15.5) * MiB / verdict.rate)


def test_slow_start_writes_little_before_the_rate_is_reached():
    assert ramp_seconds(0.25 * MiB, 8 * MiB) == pytest.approx(0.25)
    assert ramp_seconds(3.5 * MiB, 8 * MiB) == pytest.approx(1.5)  # 0.5 + 1 + 2 MiB
    assert ramp_seconds(3.5 * MiB + 8 * MiB, 8 * MiB) == pytest.approx(2.5)
    assert ramp_seconds(MiB, 0.5 * MiB) == pytest.approx(2.0)  # a rate under the initial one


def test_the_dry_run_paces_a_run_that_would_force_checkpoints_one_timed_cycle_after_another():
    # 1,000 MiB of WAL, a checkpoint requested every 400 MiB, timed every 300 s: two paced
    # cycles (800 MiB), then the last 200 MiB at the rate the budget allows (here full speed)
    verdict = predict_under_budget(10.0, [2.0] * 20, [3.0] * 10, 1000 * MiB, 10.0, (400 * MiB, 300.0))
    assert verdict.rate == pytest.approx(100 * MiB)
    assert verdict.seconds == pytest.approx(BEFORE_SAMPLES * PROBE_INTERVAL_S + 2 * 300 + 200 / 100)
    assert "2 x checkpoint_timeout (300 s)" in verdict.verdict
    fits = predict_under_budget(10.0, [2.0] * 20, [3.0] * 10, 300 * MiB, 10.0, (400 * MiB, 300.0))
    assert "checkpoint" not in fits.verdict


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


def test_past_slow_start_the_rate_climbs_back_by_a_share_of_itself_each_calm_step():
    control = RateControl(budget_ms=20, rate=8 * MiB)
    now = 0.0
    for p99 in (200, 150, 100, 70, 50, 30):  # six halvings that each helped: 128 kB/s
        now = feed(control, calm(1, p99), start=now)
    assert control.rate == pytest.approx(8 * MiB * DECREASE**6)
    feed(control, calm(40), start=now, used=64 * MiB)
    assert control.rate == pytest.approx(8 * MiB * DECREASE**6 * (1 + INCREASE_SHARE) ** 40)


def test_the_dry_run_says_a_run_would_be_refused_when_a_tenth_of_the_commits_alone_are_over():
    verdict = predict_under_budget(5.0, [4.0] * 17 + [6.0] * 3, [30.0] * 5, 100 * MiB, 10.0, None)
    assert verdict.verdict.startswith("cannot hold")
    assert "a run now would be refused: its 90th percentile alone is 6.0 ms" in verdict.verdict


def test_a_budgeted_run_dirtying_more_than_shared_buffers_is_predicted_at_the_cleaning_pace() -> None:
    """10M dense rows dirty ~2.8 GB of heap through 128 MB of shared_buffers: at the default
    background writer's 100 pages per 200 ms (and the 64 a second the guard lets backends write)
    that is ~620 s (546 s measured on PostgreSQL 15), not the WAL rate's few seconds."""
    pace = cleaning_pace(2860 * MiB, 128 * MiB, 8192, 100, 0.2)
    assert pace.clean_bytes_per_s == pytest.approx(564 * 8192)
    verdict = predict_under_budget(10.0, [2.0] * 20, [3.0] * 10, 1000 * MiB, 10.0, None, pace)
    floor = (2860 - 64) * MiB / (564 * 8192)
    assert verdict.seconds == pytest.approx(BEFORE_SAMPLES * PROBE_INTERVAL_S + floor)
    assert "more than half of shared_buffers" in verdict.verdict and "at least 635 s" in verdict.verdict


def test_a_run_whose_dirtied_pages_fit_in_shared_buffers_keeps_its_wal_paced_prediction() -> None:
    fits = cleaning_pace(64 * MiB, 128 * MiB, 8192, 100, 0.2)
    assert fits.floor_seconds is None
    assert predict_under_budget(10.0, [2.0] * 20, [3.0] * 10, 100 * MiB, 10.0, None, fits) == \
        predict_under_budget(10.0, [2.0] * 20, [3.0] * 10, 100 * MiB, 10.0, None)


def test_a_guarded_run_dirties_half_of_shared_buffers_at_once_then_goes_at_the_cleaning_pace():
    pace = cleaning_pace(0, 128 * MiB, 8192, 100, 0.2)
    bucket = DirtyBucket.full(pace, now=0.0)
    bucket.charge(64 * MiB)
    assert bucket.wait_s(0.0) == 0.0  # the burst: what shared_buffers absorbs
    bucket.charge(10 * pace.clean_bytes_per_s)
    assert bucket.wait_s(0.0) == pytest.approx(10.0)  # then at the pace the server cleans
    assert bucket.wait_s(4.0) == pytest.approx(6.0)
    assert bucket.wait_s(1000.0) == 0.0 and bucket.credit == pytest.approx(64 * MiB)  # never banks more
