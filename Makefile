# Two commands: `make run` (everything, no configuration) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test bench clean browser tls-redis

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(PY) -m server.dev

test: install browser tls-redis
	$(PY) -m pytest $(PYTEST_ARGS)

# Headless Chromium for tests/test_browser.py, from Debian (Playwright's own downloads do not run here).
# Where apt cannot install it (not root, not Debian), the browser tests are skipped with that reason.
browser:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium) \
	  || echo "warning: could not install chromium; tests/test_browser.py will be skipped"

# Debian's redis-server (built with TLS, which the embedded Valkey is not) for tests/test_tls.py,
# which fails without it. Only the binary is used: no service is started.
tls-redis:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y --no-install-recommends redis-server) \
	  || echo "warning: could not install redis-server; tests/test_tls.py will fail"

clean:
	rm -rf $(VENV) data test-artifacts

# The benchmark (bench/RESULTS.md): Redis, server, workers and load generators on loopback, ~8 minutes.
# `make bench BENCH_ARGS=--quick` runs each scenario briefly; `BENCH_ARGS='--only hot-ws'` picks some.
bench: install
	ulimit -n $$(ulimit -Hn) 2>/dev/null || true; $(PY) -m bench $(BENCH_ARGS)
