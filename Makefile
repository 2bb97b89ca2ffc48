# Two commands on a fresh machine: `make demo` and `make test`.
# Each installs what is missing (system packages, .venv, the package with its test extras).

VENV   ?= .venv
PYTHON  = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test bench system clean

demo: $(STAMP) system
	$(PYTHON) -m evse_tools.demo

test: $(STAMP) system
	$(PYTHON) -m pytest host_tests

bench: $(STAMP) system
	$(PYTHON) -m evse_tools.bench

system:
	@sh tools/bootstrap.sh

$(PYTHON):
	@sh tools/bootstrap.sh
	python3 -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
