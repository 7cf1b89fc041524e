# The two commands a newcomer needs: `make run` and `make test`. Everything else is for development.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The programs beyond Python (deploy/local/requirements.py): installed when missing, or one line
# saying what to run. Debian keeps nginx in /usr/sbin, which a user's PATH may lack.
export PATH := $(PATH):/usr/sbin:/usr/local/sbin
REQUIRE := $(PY) -m deploy.local.requirements

.PHONY: help run test bench bench-smoke lint fmt typecheck audit migrate rollback clean venv

help:
	@echo "make run        start the system at http://127.0.0.1:8080 (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)"
	@echo "make test       run every test"
	@echo "make bench      benchmark nginx + services with wrk (~15 min; BENCH_ARGS='--scale 10 ...')"
	@echo "make bench-smoke  the benchmark, small and short (what CI runs; about 2 min)"
	@echo "make lint       ruff + mypy (strict)"
	@echo "make fmt        format with ruff"
	@echo "make audit      known vulnerabilities in requirements.lock (pip-audit, PyPI's vulnerability data)"
	@echo "make migrate    apply migrations to DATABASE_URL"
	@echo "make rollback   roll every migration back on DATABASE_URL"

# The virtual environment, with exactly the versions in requirements.lock.
$(STAMP): requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@$(REQUIRE) nginx
	$(PY) -m deploy.local.run

test: $(STAMP)
	@$(REQUIRE) nginx chromium wrk
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark (tests/perf/bench.py): a fresh database with the dataset, then nginx + the services
# on 127.0.0.1 driven by wrk; the report under .artifacts/bench/latest/ (the last 5 runs are kept).
# Needs nginx and wrk (installed when missing), and PostgreSQL/Redis at DATABASE_URL/REDIS_URL
# (default: the local servers). `python -m tests.perf -h`.
bench: $(STAMP)
	@$(REQUIRE) nginx wrk
	$(PY) -m tests.perf $(BENCH_ARGS)

bench-smoke: $(STAMP)
	@$(REQUIRE) nginx wrk
	$(PY) -m tests.perf --smoke $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

typecheck: $(STAMP)
	$(PY) -m mypy

fmt: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# pip-audit on the exact pins: no resolution, no pip, nothing built; each pin is looked up in PyPI's
# vulnerability data (https://pypi.org/pypi/<name>/<version>/json). --strict: a pin that could not
# be looked up fails the audit instead of passing unaudited. Exit 1 on any known vulnerability.
# To accept one advisory (not exploitable here, no fix yet): put its id (PYSEC-..., GHSA-...) on a
# line of .pip-audit-ignore, with the reason and a date to look again in a comment.
AUDIT_IGNORE = $(foreach id,$(shell sed -e 's/\#.*//' .pip-audit-ignore 2>/dev/null),--ignore-vuln $(id))

audit: $(STAMP)
	$(PY) -m pip_audit --requirement requirements.lock --no-deps --disable-pip --strict \
		--progress-spinner off --timeout 15 --desc on $(AUDIT_IGNORE)

migrate: $(STAMP)
	$(PY) -m services.auth migrate
	$(PY) -m services.referral migrate

rollback: $(STAMP)
	$(PY) -m services.referral rollback
	$(PY) -m services.auth rollback

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
