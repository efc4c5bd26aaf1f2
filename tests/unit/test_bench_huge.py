"""The benchmark runner on very large tables (``make bench-huge``), without a database: the disk
estimate it refuses a run on, and which database each measurement of ``--seed-per-contender``
runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from benchmarks import dataset, report, run, space
from benchmarks.server import BenchmarkError

GIB = 2**30
AGED_100M = 100_000_000 * dataset.layout("aged").bytes_per_row


def test_seeding_each_contender_holds_one_database_at_a_time():
    need = space.need([10 * GIB, 3 * GIB], GIB, seed_each=True)
    assert (need.databases, need.wal, need.margin) == (10 * GIB, 2 * GIB, GIB)
    assert need.total == 13 * GIB


def test_copies_of_a_template_hold_the_template_beside_its_copy():
    assert space.need([10 * GIB, 3 * GIB], GIB).databases == 20 * GIB


def test_kept_templates_stay_beside_the_copy_and_reused_ones_cost_nothing():
    assert space.need([10 * GIB, 3 * GIB], GIB, kept=[10 * GIB, 3 * GIB]).databases == 23 * GIB
    assert space.need([10 * GIB, 3 * GIB], GIB, kept=[]).databases == 10 * GIB


def test_the_margin_is_a_tenth_of_the_largest_dataset_and_at_least_a_gib():
    assert space.need([100 * GIB], 0, seed_each=True).margin == 10 * GIB
    assert space.need([GIB], 0, seed_each=True).margin == GIB


def test_seeding_each_contender_needs_one_database_less_than_copies_of_a_template():
    copies, seeds = space.need([AGED_100M], GIB), space.need([AGED_100M], GIB, seed_each=True)
    assert copies.total - seeds.total == AGED_100M


def test_a_run_that_does_not_fit_is_refused_saying_what_it_needs_and_what_is_free():
    refusal = space.shortfall(space.need([AGED_100M], GIB, seed_each=True), 20 * GIB, "/var/lib/pg")
    assert refusal is not None
    assert "needs 33.8 GiB" in refusal
    assert "databases 28.9 GiB: one database at a time" in refusal
    assert "20.0 GiB free in /var/lib/pg" in refusal


def test_the_scale_curve_is_measured_on_the_first_shape():
    settings, _ = run.parse_args(["--rows", "1e8", "--shapes", "aged", "--scale", "1e6,1e7,1e8",
                                  "--seed-per-contender"])
    assert run.planned(settings) == [("aged", 100_000_000, None), ("aged", 1_000_000, None),
                                     ("aged", 10_000_000, None)]


def test_seeding_each_contender_keeps_no_template(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--seed-per-contender", "--keep-templates"])
    assert "keeps no template" in capsys.readouterr().err


@dataclass
class FakeServer:
    """Records what the runner asks of the server."""

    calls: list[str] = field(default_factory=list)

    def create_database(self, name: str, template: str | None = None) -> float:
        self.calls.append(f"copy {template}")
        return 0.0

    def drop_database(self, name: str) -> None:
        self.calls.append("drop")

    def checkpoint(self) -> float:
        self.calls.append("checkpoint")
        return 0.0

    def database(self, name: str) -> str:
        return f"dbname={name}"


def _template(garbage: int = 80) -> dataset.Template:
    return dataset.Template(run.COPY_NAME, "aged", 100, None, garbage, {}, reused=False)


@pytest.fixture
def seeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each seed's garbage count, in the order the runner asks for them."""
    counts: list[int] = []

    def build(server: Any, shape: str, rows: int, reuse: bool, fraction: Any, name: str) -> dataset.Template:
        server.calls.append("seed")
        return _template(counts.pop(0))

    monkeypatch.setattr(dataset, "build", build)
    monkeypatch.setattr(dataset, "conditions", lambda dsn, table: {})
    return counts


def test_seeding_each_the_load_alone_and_the_first_contender_share_the_first_seed(seeds):
    server = FakeServer()
    databases = run.Databases(server, _template(), seed_each=True, unused=True)  # type: ignore[arg-type]
    seeds.append(80)
    databases.make()  # the load alone
    databases.release(reuse=True)
    databases.make()  # the first contender
    databases.release()
    databases.make()  # the second contender
    assert server.calls == ["checkpoint", "checkpoint", "drop", "seed", "checkpoint"]
    assert len(databases.seed_s) == 1


def test_copies_of_a_template_are_made_fresh_for_the_load_alone_and_every_contender(seeds):
    server = FakeServer()
    databases = run.Databases(server, _template(), seed_each=False)  # type: ignore[arg-type]
    databases.make()
    databases.release(reuse=True)
    databases.make()
    assert server.calls == [f"copy {run.COPY_NAME}", "checkpoint", "drop", f"copy {run.COPY_NAME}",
                            "checkpoint"]


def test_a_seed_with_another_garbage_count_aborts_the_run(seeds):
    databases = run.Databases(FakeServer(), _template(), seed_each=True)  # type: ignore[arg-type]
    seeds.append(79)
    with pytest.raises(BenchmarkError, match="found 79 garbage rows, the first 80"):
        databases.make()


def _result(shape: str, rows: int) -> dict[str, Any]:
    """A shape's result as the runner stores it: single, and msggc with a batch timeline."""
    timeline = [[k * 0.1, k * rows // 20] for k in range(21)]
    entry = {"rows_per_s": 2.0, "wal_bytes_per_row": 300.0, "tenth_ratio": 1.0, "batch_ms": {"p99": 40.0},
             "rss_mb": 38.0, "backend_block_writes": None}
    return {"shape": shape, "rows": rows, "seed": {"heap_bytes": rows * 230},
            "contenders": [{**entry, "label": "single", "kind": "single", "timeline": [[1.0, rows]]},
                           {**entry, "label": "msggc_default", "kind": "msggc", "timeline": timeline}]}


def test_the_scale_curve_ends_with_the_runs_own_result_on_its_shape():
    scale = [_result("aged", 1_000_000), _result("aged", 10_000_000)]
    points = report.scale_points(scale, _result("aged", 100_000_000))
    assert report.scale_shape(scale) == "aged"
    assert [p["rows"] for p in points] == [1_000_000] * 2 + [10_000_000] * 2 + [100_000_000] * 2
    assert {(p["batch_ms_p99"], p["rss_mb"]) for p in points} == {(40.0, 38.0)}


def test_rows_per_s_by_tenth_are_plotted_only_for_contenders_that_commit_as_they_go(tmp_path):
    assert report.plot_tenths(tmp_path / "walk.png", _result("aged", 1_000_000))
    single_only = {**_result("aged", 1_000_000), "contenders": _result("aged", 1_000_000)["contenders"][:1]}
    assert not report.plot_tenths(tmp_path / "single.png", single_only)
    assert (tmp_path / "walk.png").exists() and not (tmp_path / "single.png").exists()


def test_a_100m_seed_is_not_judged_against_the_10m_seed_target():
    doc = {**_result("aged", 100_000_000), "seed": {"seed_wall_s": 900.0}}
    assert report._seed_target({"aged": doc}).ok is None


def test_the_applications_p99_is_also_given_per_window_of_the_run():
    """A long guarded run's p99 over the whole window hides where it was felt: the report gives
    it per ``P99_WINDOW_S`` from the run's start too."""
    began = 1000.0
    log = [(began + 1, 4.0), (began + 2, 4.0), (began + 31, 50.0), (began + 95, 3.0)]
    assert run.p99_by_window(log, began) == [
        {"from_s": 0.0, "ops": 2, "p99_ms": 4.0}, {"from_s": 30.0, "ops": 1, "p99_ms": 50.0},
        {"from_s": 90.0, "ops": 1, "p99_ms": 3.0}]


def test_a_contenders_wal_is_unknown_where_the_loads_estimate_is_most_of_it():
    """Beside a load, the contender's WAL is the server's less the load's estimate; where that
    estimate is half of everything or more (a long run: the load's full-page images come once per
    checkpoint, not at the baseline's rate) it is not reported as a difference near 0."""
    assert run.gc_wal(100_000, 20_000.0) == 80_000
    assert run.gc_wal(100_000, 60_000.0) is None
