# Two commands a newcomer needs: `make run` and `make test`. Each does all of its own set-up
# (virtualenv, pinned dependencies, database, migrations) and is quick the second time.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Settings found or started by `ensure` (DATABASE_URL, REDIS_URL).
LOAD_ENV := set -a; . .run/env; set +a
export PORT ?= 5000
# Procfile commands (gunicorn, celery, alembic) come from the virtualenv.
export PATH := $(CURDIR)/$(BIN):$(PATH)
TENANT ?= demo
SCOPE ?= write

.PHONY: install services migrate run key test faults bench lint clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade 'pip>=24'
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

services: install
	@$(BIN)/python -m tests.support.servers ensure

migrate: services
	@$(LOAD_ENV); $(BIN)/alembic -c migrations/alembic.ini upgrade head

# Every Procfile process in the foreground (release runs first, as on the PaaS). Email goes to a local
# SMTP sink that prints each message here (unless SMTP_URL names a real server), and webhooks may
# point at this machine.
SMTP_SINK := 127.0.0.1:1025
run: migrate
	@$(LOAD_ENV); export FLOWER_BASIC_AUTH="$${FLOWER_BASIC_AUTH:-admin:admin}"; \
	  export NOTIFY_ALLOW_PRIVATE_URLS="$${NOTIFY_ALLOW_PRIVATE_URLS:-1}"; \
	  if [ -z "$${SMTP_URL:-}" ]; then \
	    export SMTP_URL="smtp://$(SMTP_SINK)"; \
	    $(BIN)/python -m aiosmtpd -n -l $(SMTP_SINK) -c aiosmtpd.handlers.Debugging & sink=$$!; \
	    trap 'kill $$sink 2>/dev/null' EXIT; \
	  fi; \
	  echo "API on http://127.0.0.1:$$PORT  Flower on http://127.0.0.1:$${FLOWER_PORT:-5555} (user and password: FLOWER_BASIC_AUTH)  email to $$SMTP_URL"; \
	  $(BIN)/honcho start web worker notifier beat flower

# A new API key for $(TENANT) (SCOPE=read for a read-only one); the key is the last line.
key: migrate
	@$(LOAD_ENV); $(BIN)/flask --app api keys create --tenant "$(TENANT)" --name "make key" --scope "$(SCOPE)"

# Everything but the fault scenarios on every core (pytest-xdist: each process has its own database
# and queues), then the fault scenarios alone: they bound lateness, and a neighbour's load would skew
# them. A selection in PYTEST_ARGS with nothing of one kind is not a failure (pytest's exit 5).
# Redis stays down 30 s in scenario 13 here, not a minute as in `make reliability`: still twice the
# longest delay it holds, and the suite stays within CI's 20 minutes.
TEST_PROCESSES ?= auto
test: services
	@$(LOAD_ENV); set -e; $(BIN)/ruff check .; \
	  $(BIN)/pytest -m "not faults" -n $(TEST_PROCESSES) $(PYTEST_ARGS) || [ $$? -eq 5 ]; \
	  FAULTS_S13_DOWN_S=$${FAULTS_S13_DOWN_S:-30} $(BIN)/pytest -m faults -p no:xdist $(PYTEST_ARGS) \
	    || [ $$? -eq 5 ]

faults: services
	@$(LOAD_ENV); $(BIN)/pytest -m faults $(PYTEST_ARGS)

# The fault suite, then docs/RELIABILITY.md written from that very run (figures, machine, versions).
reliability: services
	@$(LOAD_ENV); rows=$$(mktemp); start=$$(date +%s); status=0; \
	  RELIABILITY_REPORT=$$rows $(BIN)/pytest -m faults $(PYTEST_ARGS) || status=$$?; \
	  $(BIN)/python -m tests.faults.report $$rows docs/RELIABILITY.md --wall $$(( $$(date +%s) - start )) \
	    --extra tests/faults/findings.md; \
	  rm -f $$rows; exit $$status

bench: services
	@$(LOAD_ENV); $(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache *.egg-info
