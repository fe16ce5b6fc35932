# Marketo <-> Dynamics 365 sync: the commands a user starts with (README "Commands").
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MARKETO_PORT ?= 8710
DATAVERSE_PORT ?= 8711
export MARKETO_PORT DATAVERSE_PORT

.PHONY: help venv test demo console bench sandbox sync activity clean

help:
	@echo "make demo      run the sync demo end to end (sets everything up)"
	@echo "make console   the operator console on the demo's runs, under airflow standalone (after make demo)"
	@echo "make test      run the whole test suite (sets everything up, PostgreSQL included)"
	@echo "make bench     time the plan stage at 100k/1M, a first sync end to end at 100k (PERSONS=1000000), the console at 1M rows, the first sync on one and two Celery workers"
	@echo "make sandbox   run the Marketo and Dataverse emulators in the foreground"
	@echo "make sync      run one sync cycle now against the configured connections"

venv: $(STAMP)

# Created when missing, reused when present; rebuilt when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip sync --quiet --python $(PY) requirements.txt
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	@touch $(STAMP)

# Two workers, a test file each at a time (a file's module-scoped sandbox worlds stay on one worker): the suite
# mostly waits on the sandboxes and on Airflow, so two files at once take about half the time on two cores.
TEST_WORKERS ?= 2

test: venv
	@bash scripts/ensure-postgres.sh
	@bash scripts/ensure-chromium.sh
	@bash scripts/ensure-redis.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: venv
	$(PY) -m sandbox.demo

console: venv
	$(PY) -m sandbox.console

bench: venv
	$(PY) bench/engine_bench.py
	$(PY) bench/e2e_bench.py --persons $(or $(PERSONS),100000)
	$(PY) bench/console_bench.py
	@bash scripts/ensure-postgres.sh
	@bash scripts/ensure-redis.sh
	$(PY) bench/deployment_bench.py --persons $(or $(PERSONS),100000)

sandbox: venv
	$(PY) -m sandbox --dir .sandbox

# One cycle now: a manual run of the DAG, against the connections in the environment or, when none are set,
# the running sandbox's (.sandbox/connections.env). Exits non-zero when the run fails.
sync: venv
	@bash scripts/sync.sh $(if $(CONF),--conf '$(CONF)')

activity: venv
	@test -n "$(EMAIL)$(PERSON)$(RUN)" || { echo "usage: make activity EMAIL=someone@example.com (or PERSON=<Marketo id>, RUN=<run id>)" >&2; exit 2; }
	AIRFLOW_HOME=$${AIRFLOW_HOME:-$(CURDIR)/.airflow} $(PY) -m mdsync.activity $(if $(EMAIL),--email "$(EMAIL)",$(if $(PERSON),--person "$(PERSON)",--run "$(RUN)"))

clean:
	rm -rf .sandbox .staging .state .pytest_cache .hypothesis
