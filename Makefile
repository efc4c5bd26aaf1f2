# msggc: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench bench-small bench-real bench-partitions bench-huge clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

demo: setup
	$(BIN)/msggc demo --rows 1000000

bench: setup  ## 10M rows x dense/sparse/aged/hidden, 3 rounds, scale curve, planner crossover (~55 min)
	$(BIN)/python -m benchmarks --rows 10000000 --shapes dense,sparse,aged,hidden --repeats 3 \
	    --scale 1000000,3000000 --crossover 0.01,0.02,0.05,0.1 --crossover-rows 3000000

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
