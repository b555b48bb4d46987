# Two commands: `make demo` (set up, then run the whole loop) and `make test` (set up, then test).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench serve clean redis-server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed redis-server

# Tests start a private redis-server on a free port (or use $$REDIS_URL); install one if missing.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q --no-install-recommends redis-server; \
	  else \
	    echo "redis-server not found: install it (apt-get install redis-server, brew install redis) or set REDIS_URL" >&2; \
	  fi; }

demo: setup
	$(BIN)/router demo

serve: setup
	$(BIN)/router serve

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/engine_bench.py

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
