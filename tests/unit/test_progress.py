"""The progress series' arithmetic: its sampling step, its rates and the rate an ETA uses."""

from __future__ import annotations

from engine import progress


def test_the_sampling_step_doubles_so_a_run_of_any_length_keeps_a_short_series():
    assert progress.step_s(0) == progress.step_s(120) == 1.0
    assert progress.step_s(121) == 2.0
    assert progress.step_s(3600) == 32.0
    for hours in (1, 10, 100):
        elapsed = hours * 3600
        assert progress.MAX_POINTS / 4 <= elapsed / progress.step_s(elapsed) <= progress.MAX_POINTS / 2


def test_the_sampler_lets_one_checkpoint_a_step_carry_a_sample():
    now = [100.0]
    sampler = progress.Sampler(clock=lambda: now[0])
    assert not sampler.due()
    now[0] = 100.5
    assert not sampler.due()
    now[0] = 101.0
    assert sampler.due()
    assert not sampler.due()  # the next worker's checkpoint in the same step carries none


def test_rates_are_per_interval_between_samples_and_skip_an_empty_one():
    series = [[0.0, 0, 1000], [2.0, 500, 5000], [2.0, 500, 5000], [4.0, 1500, 5000]]
    assert progress.rates(series) == [
        {"t_s": 2.0, "rows_per_s": 250.0, "wal_bytes_per_s": 2000.0},
        {"t_s": 4.0, "rows_per_s": 500.0, "wal_bytes_per_s": 0.0},
    ]


def test_the_recent_rate_spans_the_last_thirty_seconds_or_the_last_interval():
    assert progress.recent_rate([[0.0, 0, 0]]) is None
    steady_then_fast = [[0.0, 0, 0], [60.0, 600, 0], [70.0, 1600, 0], [90.0, 3600, 0]]
    assert progress.recent_rate(steady_then_fast) == 3000 / 30
    sparse = [[0.0, 0, 0], [64.0, 6400, 0]]
    assert progress.recent_rate(sparse) == 100.0
