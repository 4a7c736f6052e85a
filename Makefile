# winback — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# No usage telemetry leaves this machine (MLflow would otherwise call home from every process).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.DEFAULT_GOAL := help

## help: list the targets
.PHONY: help
# Each description wrapped at a word to fit 80 columns, its continuation lines under its first.
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed -e 's/^## //' | awk -F': ' '{ \
	  name = $$1; words = split(substr($$0, length($$1) + 3), word, " "); line = ""; \
	  for (i = 1; i <= words; i++) { \
	    if (line != "" && length(line) + 1 + length(word[i]) > 69) { printf "  %-8s %s\n", name, line; name = ""; line = word[i] } \
	    else line = (line == "" ? word[i] : line " " word[i]) } \
	  printf "  %-8s %s\n", name, line }'

# Debian's chromium is the browser of the end-to-end tests (playwright cannot download its own here).
SYSTEM_STAMP := $(VENV)/.system-stamp
$(SYSTEM_STAMP):
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }; }
	@mkdir -p $(VENV) && touch $(SYSTEM_STAMP)

# constraints.txt pins every library to the version CI and the benchmarks ran (`make lock` renews it).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "winback needs Python >= 3.11, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## install: create .venv and install winback with its dev tools
.PHONY: install
install: $(STAMP)

## demo: simulate, train + register a model, then run the live recovery loop on 127.0.0.1:8000 (embedded defaults; DEMO_ARGS to pass knobs)
DEMO_ARGS ?=
.PHONY: demo
demo: $(STAMP)
	$(BIN)/winback demo --workdir demo $(DEMO_ARGS)

## lint: ruff (lint + format check), mypy on model/, service/ and pipelines/, import-linter contracts
.PHONY: lint
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model service pipelines
	$(BIN)/lint-imports

## test: lint, then the whole test suite
.PHONY: test
test: lint $(SYSTEM_STAMP)
	$(BIN)/pytest -n 2 --dist loadgroup

# wrk is the load generator of the API benchmark (C, light on the CPU the servers need); Debian's package.
.PHONY: bench-tools
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -q wrk || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q wrk; }; }

## bench: benchmarks on this machine, each with its same-run reference (~2.5 h on 2 cores; BENCH_ARGS to narrow)
BENCH_ARGS ?=
.PHONY: bench
bench: $(STAMP) bench-tools
	$(BIN)/winback bench --out bench-out $(BENCH_ARGS)

## lock: renew constraints.txt: the newest versions pyproject.toml allows, installed in a fresh venv (commit it)
LOCK_VENV := .venv-lock
.PHONY: lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf $(LOCK_VENV)

## format: apply ruff fixes and formatting
.PHONY: format
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## clean: remove generated files (keeps .venv)
.PHONY: clean
clean:
	rm -rf demo bench-out history evaluation mlruns winback.db winback-spool .pytest_cache .mypy_cache .ruff_cache
