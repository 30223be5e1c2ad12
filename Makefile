# flowlog: the two commands of the README.
#   make demo  — set up and run the end-to-end demo on the embedded in-memory store
#   make test  — set up (virtualenv, redis-server, prometheus) and run the whole test suite
# The virtualenv is built from the distribution's CPython when it is 3.11 or newer (Debian
# builds it with profile-guided and link-time optimisation, as the python image the services
# ship in is built), else from python3 on PATH, which a version manager may have made a plain
# build (see "Benchmarks" in the README). `make PYTHON=...` picks another.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup setup-test system-packages lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

setup-test: $(BIN)/python system-packages
	$(BIN)/python -m pip install --quiet -e '.[test]'

system-packages:
	@bash scripts/install-system-packages.sh

demo: setup
	$(BIN)/flowlog demo

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/flowlog bench append -o json
	$(BIN)/flowlog bench replay -o json
	$(BIN)/flowlog bench e2e -o json
