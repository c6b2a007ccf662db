# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := node_modules/.installed-stamp

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Leaflet for the web page's map, from the npm registry (served by the app, never committed).
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

setup: $(STAMP) $(NODE_STAMP)

demo: setup
	$(PY) -m rshash.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check rshash tests benchmarks
	$(VENV)/bin/ruff format --check rshash tests benchmarks
	$(VENV)/bin/mypy rshash

clean:
	rm -rf $(VENV) .cache node_modules
