"""One ``auto`` baseline per server: measured while none of the service's runs write there, shared
by the runs that start together or while others go. Pure logic: the measurement is handed in."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from engine.baseline import Baseline
from engine.service.baselines import REUSE_IDLE_S, ServerBaseline


class Measurer:
    """A measurement that counts itself and can be held open by the test."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> Baseline:
        self.calls += 1
        self.started.set()
        self.release.wait(5)
        time.sleep(self.seconds)
        return Baseline(p99_ms=2.0 * self.calls, p50_ms=1.0, samples=20, seconds=self.seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_runs_of_one_server_starting_together_share_one_measurement():
    server, measure = ServerBaseline("db:5432"), Measurer(seconds=0.2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(lambda n: server.baseline(f"wacore{n}", 1, measure), range(4)))
    assert measure.calls == server.measurements == 1
    assert len({id(f) for f in found}) == 1
    described = [found[0].describe(f"wacore{n}", 1) for n in range(4)]
    assert sorted(d["shared"] for d in described) == [False, True, True, True]
    assert {d["measured_for"]["node"] for d in described} == {found[0].node}


def test_a_run_starting_while_another_writes_takes_the_latest_however_old_and_an_idle_server_measures_again():
    clock = Clock()
    server, measure = ServerBaseline("db:5432", clock), Measurer()
    first = server.baseline("wacore1", 1, measure)
    with server.writing():
        clock.now += 10 * REUSE_IDLE_S
        assert server.baseline("wacore2", 1, measure) is first  # wacore1's run would be measured
    assert measure.calls == 1
    again = server.baseline("wacore2", 2, measure)  # nothing writes now, and the latest is old
    assert measure.calls == 2 and again is not first and again.found.p99_ms == 4.0
    clock.now += REUSE_IDLE_S / 2
    assert server.baseline("wacore3", 1, measure) is again  # fresh: taken as it is


def test_a_run_waits_to_start_while_its_servers_baseline_is_measured():
    server, measure = ServerBaseline("db:5432"), Measurer()
    measure.release.clear()
    started: list[float] = []

    def run() -> None:
        with server.writing():
            started.append(time.monotonic())

    with ThreadPoolExecutor(max_workers=2) as pool:
        measuring = pool.submit(server.baseline, "wacore1", 1, measure)
        assert measure.started.wait(5)
        writer = pool.submit(run)
        time.sleep(0.2)
        assert not started, "a run started while the server's baseline was measured"
        released = time.monotonic()
        measure.release.set()
        measuring.result(5)
        writer.result(5)
    assert started and started[0] >= released


def test_a_first_baseline_measured_beside_a_run_says_how_many_went_on():
    server = ServerBaseline("db:5432")
    with server.writing(), server.writing():
        found = server.baseline("wacore3", 7, Measurer())
    assert found.beside_runs == 2
    assert found.describe("wacore3", 7)["beside_runs"] == 2 and not found.describe("wacore3", 7)["shared"]
