# The two commands: `make demo` and `make test` (README.md). Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml | cksum | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO_DEVICES ?= 200
SIM_DEVICES  ?= 20

# The test suite runs against the real PostgreSQL and Redis of this machine.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/ota
TEST_REDIS_URL    ?= redis://127.0.0.1:6379/15
PYTEST_WORKERS    ?= auto

# The embedded mode: SQLite and files under var/, no other service, whatever the shell has set.
EMBEDDED := DATABASE_URL= DATABASE_REPLICA_URL= REDIS_URL= STORAGE=local CELERY_BROKER_URL=
# Its own test database name per checkout, so two checkouts on one machine never collide.
TEST_DB_NAME      ?= test_ota_$(shell printf %s "$(CURDIR)" | cksum | cut -d' ' -f1)
# Rate limits off: the tests make many requests from 127.0.0.1; tests/test_rate_limits.py and
# tests/client/test_rate_limit_client.py turn them on themselves. No replica: tests read what they
# wrote in their own transaction (tests/test_replica.py makes its own).
TESTENV  := DATABASE_URL=$(TEST_DATABASE_URL) DATABASE_TEST_NAME=$(TEST_DB_NAME) \
	DATABASE_REPLICA_URL= REDIS_URL=$(TEST_REDIS_URL) OTA_VAR_DIR=$(CURDIR)/var/test \
	RATE_LIMIT_DEVICE=off RATE_LIMIT_IP=off

# Real tools the tests drive, from Debian (as root, which this machine's sessions and CI are).
# softhsm2: a software PKCS#11 token for the HSM signing-key tests (tests/test_signing_hsm.py);
# nginx: `nginx -t` checks the shipped configuration (tests/test_deploy_config.py), and
# `make prod-local` runs it (tests/test_prod_local.py);
# chromium: the console's browser test (tests/test_console_browser.py, through Playwright).
# swupdate: the real hawkBit DDI client (suricatta) in tests/ddi/ (docs/ddi.md).
# prometheus: `promtool check rules` on the shipped alert rules (tests/test_observability.py).
# wrk: the HTTP load of `make bench` (tests/bench/bench_http.py, bench_downloads.py).
# postgresql-client: pg_dump and pg_restore for `make backup` (tests/test_backup.py).
# faketime: devices with wrong clocks (tests/client/test_clocks.py).
DEBIAN_PACKAGES := libubootenv-tool softhsm2 nginx chromium swupdate prometheus wrk postgresql-client faketime

.PHONY: install debian-packages demo serve serve-demo prod-local test screenshots bench load backup lint format clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" -e ./client
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get install -y -q $$missing >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }; \
	fi

demo: install
	$(EMBEDDED) $(PY) manage.py migrate --noinput
	$(EMBEDDED) $(PY) manage.py collectstatic --noinput --verbosity 0
	$(EMBEDDED) $(PY) manage.py demo_setup --host $(HOST) --port $(PORT) --devices $(DEMO_DEVICES) \
		--sim-token-file var/demo/sim-token
	$(MAKE) --no-print-directory serve-demo

# The whole embedded product in one terminal: the web server, daphne for the live streams on
# $(WS_PORT) (pages connect there: CONSOLE_STREAM_URL), a Celery worker with beat (the rollout
# engine, on the filesystem broker) and a simulated fleet of $(SIM_DEVICES) devices.
# Ctrl-C stops them all. Rate limits: the whole simulated fleet comes from one address, so no
# address limit; each device polls every 5 s (12 a minute) and an update adds about a dozen
# requests, so 60 a minute per device keeps the limit on without slowing the demo.
DEMO_LIMITS := RATE_LIMIT_IP=0 RATE_LIMIT_DEVICE=60/min
WS_PORT ?= $(shell echo $$(($(PORT) + 1)))
serve-demo: install
	@trap 'trap - INT TERM EXIT; kill 0' INT TERM EXIT; \
	$(EMBEDDED) $(VENV)/bin/daphne -b $(HOST) -p $(WS_PORT) --access-log /dev/null \
		ota_site.asgi:application & \
	$(EMBEDDED) $(VENV)/bin/celery -A ota_site worker -B --pool=solo --loglevel=WARNING \
		-s var/demo/beat-schedule & \
	( sleep 4; $(VENV)/bin/ota-client simulate --devices $(SIM_DEVICES) \
		--server http://$(HOST):$(PORT) --enrollment-token-file var/demo/sim-token \
		--device-type demo-board --state-dir var/demo/sim --poll-interval 5 \
		--tuf-root var/demo/tuf-root.json --quiet ) & \
	$(EMBEDDED) $(DEMO_LIMITS) CONSOLE_STREAM_URL=ws://$(HOST):$(WS_PORT) \
		$(VENV)/bin/gunicorn ota_site.wsgi --bind $(HOST):$(PORT) \
		--workers 2 --graceful-timeout 5 --no-control-socket

# The production process set without Docker (docs/deployment.md#prod-local): nginx (TLS on
# PROD_LOCAL_PORT, plain HTTP too), gunicorn x2, daphne, a Celery worker and beat, on the local
# PostgreSQL (database ota_prod_local) and Redis (db 14). Logs under var/prod-local/logs/.
prod-local: install debian-packages
	$(PY) -m ota_site.deploy.prod_local

serve: install
	$(EMBEDDED) $(VENV)/bin/gunicorn ota_site.wsgi --bind $(HOST):$(PORT) --workers 2 \
		--access-logfile - --graceful-timeout 5 --no-control-socket

test: install debian-packages
	$(EMBEDDED) OTA_VAR_DIR=$(CURDIR)/var/test $(PY) manage.py makemigrations --check --dry-run
	$(TESTENV) $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The console's pictures in docs/screenshots/ (shown by README.md and docs/console.md): the browser
# test takes them from a real run of the servers when OTA_SCREENSHOTS=1.
screenshots: install debian-packages
	$(TESTENV) OTA_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_console_browser.py

bench: install debian-packages
	$(TESTENV) $(PY) tests/bench/bench_rollouts.py
	$(TESTENV) $(PY) tests/bench/bench_rate_limits.py
	$(TESTENV) $(PY) tests/bench/bench_sessions.py
	$(TESTENV) $(PY) tests/bench/bench_poll_cache.py
	$(TESTENV) $(PY) tests/bench/bench_http.py
	$(TESTENV) $(PY) tests/bench/bench_downloads.py

# The load test at full size (tests/load/fleet.py): LOAD_DEVICES virtual devices through a whole
# rollout on the production process set, then the consistency query; writes docs/reliability.md's
# "Load" section. The suite runs a short version (tests/test_load.py).
LOAD_DEVICES ?= 5000
load: install debian-packages
	$(TESTENV) $(PY) tests/load/fleet.py --devices $(LOAD_DEVICES) --write-docs

# The database and every stored firmware file, into $(OTA_VAR_DIR)/backups/<UTC time> (or OUT=dir),
# for the installation the environment names. Restore: docs/operations.md "Backup and restore".
backup: install
	$(PY) manage.py backup create $(if $(OUT),--out $(OUT))

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf var/test var/cache .pytest_cache .mypy_cache .ruff_cache
