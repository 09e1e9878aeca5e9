# maml-service: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# This machine carries a local CPU wheel of torch 2.13.0; installing it first keeps pip from
# pulling a multi-GB CUDA build. Users elsewhere get any torch>=2.13 from pyproject.toml.
TORCH_PIN ?= torch==2.13.0
# The datasets (Omniglot) beside the repository; the service, the demo and the tests that read real
# data (marker `data`) take them from these settings, never from a path in the code.
SHARED_DATA     ?= $(abspath ../shared/data)
MAML_DATA_ROOT  ?= $(SHARED_DATA)
MAML_DATA_ROOTS ?= $(SHARED_DATA)
export MAML_DATA_ROOT MAML_DATA_ROOTS

.PHONY: venv run serve test test-fast test-e2e lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv  ## start the service (embedded Ray + SQLite), run the sinusoid demo end to end
	$(PY) -m cli.demo

serve: venv
	$(VENV)/bin/maml serve

test: venv  ## the whole suite, end-to-end tests included (what CI runs)
	$(VENV)/bin/pytest -q

test-fast: venv
	$(VENV)/bin/pytest -q -m "not e2e and not ray and not data"

lint: venv
	$(VENV)/bin/ruff check service workers api cli tests benchmarks

bench: venv
	$(PY) -m benchmarks.speed

clean:
	rm -rf $(VENV) .data .pytest_cache
