# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m rshash.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check rshash tests benchmarks
	$(VENV)/bin/ruff format --check rshash tests benchmarks
	$(VENV)/bin/mypy rshash

clean:
	rm -rf $(VENV) .cache
