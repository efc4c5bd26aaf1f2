# msggc: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench bench-small clean

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

demo: setup
	$(BIN)/msggc demo --rows 1000000

bench: setup
	$(BIN)/python -m benchmarks --rows 10000000

bench-small: setup
	$(BIN)/python -m benchmarks --rows 1000000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
