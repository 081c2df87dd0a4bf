# Two entry points (see README): `make repro` runs the pipeline, `make test` runs every test.
# While coding: `make check` (lint + the fast tests). All create/refresh .venv first and are safe to rerun.
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test check lint

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,spark]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	pytest $(PYTEST_ARGS)

lint: $(STAMP)
	ruff check .
	ruff format --check .

check: lint
	pytest -m "not slow" $(PYTEST_ARGS)
