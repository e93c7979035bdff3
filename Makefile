# Two commands: `make run` (everything, no configuration) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test test-fast bench clean browser tls-redis nginx lock upgrade

install: $(VENV)/.installed

# Exactly the versions in the lock (every file checked against its hash), then the project itself.
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The locks, from pyproject.toml's bounds (uv's resolver: fast, and universal: one lock for every
# platform and Python >= 3.11). `make lock` keeps what it can; `make upgrade` takes the newest
# versions the bounds allow, then runs the suite and the benchmark's floor ratio on them.
UV = $(PY) -m uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(UV) $(LOCK_ARGS) -o requirements.lock
	$(UV) $(LOCK_ARGS) --extra dev -o requirements-dev.lock

upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade
	$(MAKE) test
	$(MAKE) bench BENCH_ARGS='--only hot-ws,floor'

run: install
	$(PY) -m server.dev

# The whole suite, then the transport, lifecycle, fault and browser tests again with FAST_PATH=off:
# what a user gets on library versions whose private names the fast path does not find.
STOCK_PATH_TESTS = tests/test_fastpath.py tests/test_progress.py tests/test_request_reply.py tests/test_lifecycle.py \
	tests/test_faults.py tests/test_slow_clients.py tests/test_drain.py tests/test_topology.py tests/test_browser.py
test: install browser tls-redis nginx node_modules/.installed
	$(PY) -m pytest $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,FAST_PATH=off $(PY) -m pytest $(STOCK_PATH_TESTS))

# The inner loop: unit and contract tests and one of each transport, about ten seconds.
FAST_TESTS = tests/test_contract.py tests/test_output.py tests/test_scripts.py tests/test_queue.py \
	tests/test_connections.py tests/test_protocols.py tests/test_fastpath.py
test-fast: install
	$(PY) -m pytest $(PYTEST_ARGS) $(FAST_TESTS)

# The pinned TypeScript (package-lock.json) for tests/test_typescript.py; needs Node.js and npm.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# Headless Chromium for tests/test_browser.py, from Debian (Playwright's own downloads do not run here).
# Where apt cannot install it (not root, not Debian), make test stops here: install chromium by hand.
browser:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium) \
	  || (echo "error: could not install chromium (Debian's package) for tests/test_browser.py"; exit 1)

# Debian's redis-server (built with TLS, which the embedded Valkey is not) for tests/test_tls.py,
# which fails without it. Only the binary is used: no service is started.
tls-redis:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y --no-install-recommends redis-server) \
	  || echo "warning: could not install redis-server; tests/test_tls.py will fail"

# Debian's nginx for tests/test_nginx.py (two replicas behind deploy/nginx.conf's directives), which
# fails without it. Only the binary is used: each test runs its own on a free loopback port, no service.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx \
	  || (apt-get update && (apt-get install -y --no-install-recommends nginx-light \
	      || apt-get install -y --no-install-recommends nginx)) \
	  || (echo "error: could not install nginx (Debian's package) for tests/test_nginx.py"; exit 1)

clean:
	rm -rf $(VENV) data test-artifacts

# The benchmark (bench/RESULTS.md): Redis, server, workers and load generators on loopback, ~8 minutes.
# `make bench BENCH_ARGS=--quick` runs each scenario briefly; `BENCH_ARGS='--only hot-ws'` picks some.
bench: install
	ulimit -n $$(ulimit -Hn) 2>/dev/null || true; $(PY) -m bench $(BENCH_ARGS)
