# Two commands on a fresh machine: `make demo` and `make test`.
# Each installs what is missing (system packages, .venv, the package with its test extras).

VENV   ?= .venv
PYTHON  = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test test-fast test-loaded bench system clean

demo: $(STAMP) system
	$(PYTHON) -m evse_tools.cli.demo

# MicroPython for the host (its WebAssembly port, from the npm registry) runs the core's
# MicroPython scenarios in `make test`.
MPY_HOST = tools/testkit/mpy/node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs

test: $(STAMP) system $(MPY_HOST)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest host_tests

# The fast lane: the portable core in process (host_tests/core, marker `core`), in seconds.
test-fast: $(STAMP)
	$(PYTHON) -m pytest host_tests/core -q

# The suite on a busy machine: two CPU-bound and one disk-bound worker run beside it (started
# and stopped here), and it must pass RUNS times in a row (tools/testkit/load.py; bounded to 3 hours).
RUNS ?= 3
test-loaded: $(STAMP) system $(MPY_HOST)
	$(PYTHON) -m evse_tools.testkit.load --cpu 2 --disk 1 --runs $(RUNS) --max-s 10800 -- $(PYTHON) -m pytest host_tests

bench: $(STAMP) system $(MPY_HOST)
	$(PYTHON) -m evse_tools.bench.main

system:
	@sh tools/bootstrap.sh

$(PYTHON):
	@sh tools/bootstrap.sh
	python3 -m venv $(VENV)

$(MPY_HOST): tools/testkit/mpy/package.json tools/testkit/mpy/package-lock.json | system
	npm ci --prefix tools/testkit/mpy --no-audit --no-fund
	@touch $(MPY_HOST)

$(STAMP): setup.cfg pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis tools/testkit/mpy/node_modules
