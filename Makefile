# msggc: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-pg16 lint demo bench bench-guard bench-small bench-real bench-partitions bench-huge soak soak-3 soak-ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/pytest

# The core, partition, archive, guard and fault tests on PostgreSQL 16 (a private server from the
# pgserver wheel, started for the session and removed after it; tests/pg16.py). Not tests/unit (no
# server) nor tests/faults/test_restart.py (it restarts a private embedded server of its own).
PG16_TESTS := tests/test_strategies.py tests/test_resume.py tests/test_batch_atomicity.py \
	tests/test_predicate_db.py tests/test_promise.py tests/test_complete_under_writes.py \
	tests/test_concurrency.py tests/test_finish.py tests/test_foreign_keys.py tests/test_real_tables.py \
	tests/test_reclaim.py tests/test_throttle.py tests/test_migrations.py \
	tests/test_partitions.py tests/test_partitions_recovery.py tests/test_promise_partitions.py \
	tests/test_archive.py tests/test_archive_exact.py tests/test_archive_file.py tests/test_archive_for.py \
	tests/test_archive_formats.py tests/test_archive_roundtrip.py tests/test_guard.py tests/faults \
	tests/test_compact.py tests/test_compact_kill.py tests/test_compact_undo.py tests/test_compact_carry.py \
	tests/test_compact_copy.py

test-pg16: setup  ## the core, partition, archive, guard and fault tests on PostgreSQL 16 (pgserver wheel)
	env -u MSGGC_TEST_DSN MSGGC_TEST_SERVER=pg16 $(BIN)/pytest $(PG16_TESTS) \
	    --ignore tests/faults/test_restart.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

demo: setup
	$(BIN)/msggc demo --rows 1000000

bench: setup  ## 10M rows x dense/sparse/aged/hidden, 3 rounds, scale curve, planner crossover (~55 min), then bench-guard
	$(BIN)/python -m benchmarks --rows 10000000 --shapes dense,sparse,aged,hidden --repeats 3 \
	    --scale 1000000,3000000 --crossover 0.01,0.02,0.05,0.1 --crossover-rows 3000000
	$(MAKE) bench-guard

GUARD_ROWS ?= 10000000
bench-guard: setup  ## the latency budget beside pgbench (an application nobody here wrote): 10M dense/aged/sparse, one DELETE vs default vs budgets 2x and 3x its p99 alone, each against its dry run's prediction
	$(BIN)/python -m benchmarks --rows $(GUARD_ROWS) --shapes dense,aged,sparse --app pgbench --load-rate 200 \
	    --baseline-seconds 10 --contenders single,msggc_default,msggc_guard_2x,msggc_guard_3x \
	    --out benchmarks/results/guard --markdown benchmarks/results/guard/BENCHMARKS.md

bench-small: setup  ## 1M rows, the four synthetic shapes and every contender, one round (5-8 min), under benchmarks/results/tmp
	$(BIN)/python -m benchmarks --rows 1000000 --shapes dense,sparse,aged,hidden \
	    --out benchmarks/results/tmp --markdown benchmarks/results/tmp/BENCHMARKS.md

bench-real: setup  ## an application's own tables (uuid key, cascading child), 10M rows, single vs msggc auto
	$(BIN)/python -m benchmarks --rows 10000000 --shapes uuid-dense,uuid-sparse,cascade --repeats 1 \
	    --contenders single,msggc_auto --out benchmarks/results/tmp --markdown benchmarks/results/tmp/BENCHMARKS.md

bench-partitions: setup  ## a table partitioned by day, 10M rows: single vs msggc auto (drops) vs --no-drop
	$(BIN)/python -m benchmarks --rows 10000000 --shapes part-mixed,part-retention --repeats 1 \
	    --contenders single,msggc_auto,msggc_auto_n1 \
	    --out benchmarks/results/tmp --markdown benchmarks/results/tmp/BENCHMARKS.md

bench-huge: setup  ## aged at 100M rows (+1M, 10M for the curve): single vs msggc default, one round, a seed per contender (~34 GiB free needed, checked first; about 1 h)
	$(BIN)/python -m benchmarks --rows 100000000 --shapes aged --contenders single,msggc_default --repeats 1 \
	    --seed-per-contender --scale 1000000,10000000 --contender-timeout 7200 --load-max-seconds 7200 \
	    --out benchmarks/results/tmp --markdown benchmarks/results/tmp/BENCHMARKS.md

SOAK_OUT ?= benchmarks/results/tmp/soak
SOAK_PG_BIN ?= $(firstword $(wildcard /usr/lib/postgresql/15/bin))

soak: setup  ## msggc serve --every 20s beside 300 messages/s for an hour, private PostgreSQL (15 when installed), autovacuum on; checks accounting, webhooks, ledger, size and RSS
	$(BIN)/python -m benchmarks.soak --minutes 60 $(if $(SOAK_PG_BIN),--pg-bin $(SOAK_PG_BIN)) --out $(SOAK_OUT)/1h

soak-3: setup  ## the same with three nodes (100 messages/s each), the last stopped for a minute in the middle (15 min)
	$(BIN)/python -m benchmarks.soak --minutes 15 --nodes 3 $(if $(SOAK_PG_BIN),--pg-bin $(SOAK_PG_BIN)) --out $(SOAK_OUT)/3-nodes

soak-ci: setup  ## the CI version: 3 minutes with one node, then 3 with three (tests/test_soak.py, ~8 min)
	MSGGC_SOAK=1 MSGGC_SOAK_PG_BIN=$(SOAK_PG_BIN) $(BIN)/pytest -q tests/test_soak.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
