# One target per habit. `make demo` and `make test` each set everything up first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all]"
	touch $@

.PHONY: install demo test test-all lint bench chaos
install: $(BIN)/.installed

demo: install  ## score the bundled digits through the embedded queue (no broker needed)
	$(BIN)/inferq demo

test: install  ## unit + integration tests (needs Redis and RabbitMQ on localhost)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install  ## ruff, mypy, the layer contracts (pyproject: importlinter) and size limits
	$(BIN)/ruff check shared producer workers api cli tests bench
	$(BIN)/mypy shared producer workers api cli bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layout.py

bench: install  ## measure limit, naive baseline, bulk, online and memory (BENCH_ARGS=--quick)
	$(BIN)/python -m bench run $(BENCH_ARGS)

chaos: install  ## fault injection into real processes, with a summary table (CHAOS_ARGS=--fast)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)
