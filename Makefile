# ember: `make run` serves a sample function, `make test` runs every test, `make bench` measures.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 9000

.PHONY: install deps run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

deps:
	@scripts/install-deps.sh

run: install
	@scripts/install-deps.sh run
	$(PY) examples/run.py --port $(PORT) --data-dir .ember

lint: install
	$(VENV)/bin/ruff check src tests bench examples $(wildcard spec)
	$(VENV)/bin/mypy

test: install deps lint
	$(PY) -m pytest -q

bench: install deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .ember .pytest_cache .hypothesis
