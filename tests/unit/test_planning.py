"""Pure planning logic: strategy choice, slicing and batch sizing, without a database."""

from __future__ import annotations

import dataclasses
import os

import pytest

from engine.errors import UsageError
from engine.planner import (
    MAX_AUTO_WORKERS,
    PARALLEL_FROM_BLOCKS,
    Plan,
    TableFacts,
    choose_strategy,
    workers_for,
)
from engine.sizer import BatchSizer
from engine.strategies import DenseKeyStrategy, KeyStrategy, PhysicalStrategy, split, strategy_for

FACTS = TableFacts(oid=1, blocks=1000, rows_estimate=30000, garbage_fraction=0.8,
                   garbage_index="ix_messages_garbage", key_indexed=True, key_min=1,
                   key_max=30000, server_version=150000, key=("id",), integer_key=True)


def facts(**changes: object) -> TableFacts:
    return dataclasses.replace(FACTS, **changes)


def test_dense_garbage_walks_the_heap_when_the_key_is_scattered_over_it():
    assert choose_strategy(facts(), "auto")[0] == "physical"


def test_dense_garbage_walks_key_ranges_when_the_key_follows_the_heap_order():
    strategy, reason = choose_strategy(facts(key_in_heap_order=True), "auto")
    assert strategy == "key"
    assert "no sweep" in reason


def test_sparse_garbage_without_the_partial_index_walks_key_ranges_in_heap_order():
    in_order = facts(garbage_fraction=0.01, garbage_index=None, key_in_heap_order=True)
    assert choose_strategy(in_order, "auto")[0] == "key"


def test_a_key_in_heap_order_that_is_not_one_integer_leaves_dense_garbage_to_the_heap_walk():
    uuid = facts(key_in_heap_order=True, integer_key=False)
    assert choose_strategy(uuid, "auto")[0] == "physical"


@pytest.mark.parametrize(("blocks", "host", "workers"), [
    (1000, "/run/postgresql", 1),
    (PARALLEL_FROM_BLOCKS, "127.0.0.1", min(MAX_AUTO_WORKERS, os.cpu_count() or 1)),
    (PARALLEL_FROM_BLOCKS, "/tmp/socket-dir", min(MAX_AUTO_WORKERS, os.cpu_count() or 1)),
    (PARALLEL_FROM_BLOCKS, "db.example.internal", 2),
])
def test_auto_workers_pay_off_only_on_a_large_table_and_count_the_cores_they_can_see(blocks, host, workers):
    plan = Plan("physical", "", facts(blocks=blocks), None)
    assert workers_for([plan], host) == workers


def test_auto_workers_add_up_the_leaves_of_a_partitioned_table():
    leaves = [Plan("physical", "", facts(blocks=PARALLEL_FROM_BLOCKS // 4), None) for _ in range(4)]
    assert workers_for(leaves, "db.example.internal") == 2
    assert workers_for(leaves[:3], "db.example.internal") == 1


def test_sparse_garbage_walks_the_partial_index():
    strategy, reason = choose_strategy(facts(garbage_fraction=0.01), "auto")
    assert strategy == "index"
    assert "ix_messages_garbage" in reason


def test_sparse_garbage_without_the_partial_index_walks_the_heap():
    assert choose_strategy(facts(garbage_fraction=0.01, garbage_index=None), "auto")[0] == "physical"


def test_old_servers_without_tid_range_scans_fall_back_to_key_ranges():
    old = facts(server_version=130000, garbage_index=None)
    assert choose_strategy(old, "auto")[0] == "key"


@pytest.mark.parametrize(
    ("requested", "changes", "message"),
    [
        ("index", {"garbage_index": None, "key_indexed": False}, "needs a btree index led by the key"),
        ("physical", {"server_version": 130000}, "PostgreSQL 14"),
        ("key", {"key_indexed": False}, "btree index led by the key"),
    ],
)
def test_a_forced_strategy_the_table_cannot_serve_is_refused(requested, changes, message):
    with pytest.raises(UsageError, match=message):
        choose_strategy(facts(**changes), requested)


UUID_KEY = {"key": ("id",), "integer_key": False, "key_min": None, "key_max": None}


def test_a_uuid_key_walks_the_heap_when_dense_and_its_partial_index_when_sparse():
    assert choose_strategy(facts(**UUID_KEY), "auto")[0] == "physical"
    assert choose_strategy(facts(**UUID_KEY, garbage_fraction=0.01), "auto")[0] == "index"
    unindexed = facts(**UUID_KEY, garbage_fraction=0.01, garbage_index=None)
    assert choose_strategy(unindexed, "auto")[0] == "physical"


def test_key_ranges_need_one_integer_key_and_say_so():
    with pytest.raises(UsageError, match=r"strategy key cannot walk this table: it cuts ranges of one"
                                         r" integer key; the key \(id\) is not one"):
        choose_strategy(facts(**UUID_KEY), "key")
    with pytest.raises(UsageError, match=r"key \(tenant, id\) is not one"):
        choose_strategy(facts(key=("tenant", "id"), integer_key=False), "key")


def test_a_table_without_a_key_walks_the_heap_and_refuses_keyed_walks():
    keyless = facts(key=(), integer_key=False, key_indexed=False, garbage_index=None, garbage_fraction=0.01)
    assert choose_strategy(keyless, "auto")[0] == "physical"
    assert choose_strategy(keyless, "physical")[0] == "physical"
    for walk in ("index", "key"):
        with pytest.raises(UsageError, match="the table has no primary key"):
            choose_strategy(keyless, walk)


def test_a_dense_integer_key_is_walked_by_arithmetic_ranges_and_a_gappy_one_by_probed_ranges():
    dense = facts(key_in_heap_order=True)
    assert type(strategy_for("key", dense)) is DenseKeyStrategy
    assert "cut by arithmetic" in choose_strategy(dense, "auto")[1]
    gappy = facts(key_in_heap_order=True, key_max=30000 * 2)
    assert type(strategy_for("key", gappy)) is KeyStrategy
    assert "bounded by an index probe" in choose_strategy(gappy, "auto")[1]
    assert type(strategy_for("key", facts(key_min=None, key_max=None))) is KeyStrategy


def test_split_covers_the_range_with_disjoint_slices():
    slices = split(0, 10, 3)
    assert [(s.position, s.end) for s in slices] == [(0, 4), (4, 8), (8, 10)]
    assert split(5, 5, 2)[0].done


def test_physical_batch_size_converts_rows_to_blocks():
    # 30 rows per block, 80% garbage: 24 garbage rows per block
    assert PhysicalStrategy().units_for_rows(2400, FACTS) == 100


def test_sizer_moves_toward_the_target_duration_within_a_factor_of_two():
    sizer = BatchSizer(initial=1000, maximum=100_000, target_s=0.05, target_rows=None)
    sizer.observe(0.01, rows=1000)
    assert sizer.size == 2000
    sizer.observe(0.05, rows=1000)
    assert sizer.size == 2000
    sizer.observe(1.0, rows=1000)
    assert sizer.size == 1000


def test_a_fixed_batch_size_steers_units_toward_that_many_rows_whatever_the_time():
    sizer = BatchSizer(initial=400, maximum=4096, target_s=0.05, target_rows=1000)
    assert sizer.size == 100  # a quarter of the table-wide estimate first
    sizer.observe(0.001, rows=2500)  # 100 blocks held 2,500 garbage rows: walk 40 next
    assert sizer.size == 40
    sizer.observe(5.0, rows=1000)
    assert sizer.size == 40
    sizer.observe(0.001, rows=0)
    assert sizer.size == 160


def test_a_sizer_halves_after_a_timeout_down_to_one():
    sizer = BatchSizer(initial=8, maximum=100, target_s=0.05, target_rows=None)
    assert sizer.shrink() and sizer.size == 4
    sizer.size = 1
    assert not sizer.shrink()
