"""The benchmark's contender names and shapes mean what their docs say."""

from benchmarks.contenders import parse_contender
from benchmarks.dataset import layout


def test_msggc_compact_names_the_compaction_strategy_with_its_modifiers():
    spec = parse_contender("msggc_compact_a1")
    assert (spec.kind, spec.strategy, spec.archive) == ("msggc", "compact", True)


def test_the_backlog_shape_is_the_aged_shape_at_99_percent_garbage():
    backlog = layout("backlog")
    assert (backlog.garbage, backlog.fraction, backlog.table) == ("aged", 0.99, "messages")
