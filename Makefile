# flowlog: the two commands of the README.
#   make demo  — set up and run the end-to-end demo on the embedded in-memory store
#   make test  — set up (virtualenv, redis-server, prometheus) and run the whole test suite
PYTHON ?= python3
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
