# The one way to set up, run and test gathering-tasks. README and CI call these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench bench-quick bench-pipelines chaos-long clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

setup: $(BIN)/.installed

## Run beat + a worker + Flower on the embedded SQLite database, with demo actions.
demo: setup
	@scripts/demo.sh

## Lint, type-check, and run the whole test suite against throwaway Redis and PostgreSQL.
test: setup
	@scripts/test.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict gathering_tasks

# The harness's peers (RedBeat, sqlalchemy-celery-beat, django-celery-beat) and matplotlib.
$(BIN)/.bench-installed: pyproject.toml $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

## The benchmark harness (bench/README.md): beat next to its peers, workers, lateness,
## pipelines; writes bench/results/<date>/. Extra arguments: make bench BENCH_ARGS=--quick
bench: setup $(BIN)/.bench-installed
	@scripts/ensure-services.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## The harness's smoke run (under 2 minutes), nothing written.
bench-quick: setup $(BIN)/.bench-installed
	@scripts/ensure-services.sh
	$(BIN)/python bench/run.py --quick

## Per-node overhead of our pipeline executor next to Celery canvas (chain and chord).
bench-pipelines: setup
	@scripts/ensure-services.sh
	$(BIN)/python bench/pipelines.py

chaos-long: setup
	@scripts/ensure-services.sh
	$(BIN)/python -m tests.acceptance.chaos --long

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
