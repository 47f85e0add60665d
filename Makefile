PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: quickstart test lint format bench profile venv clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-extras.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) -m pasta_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --dist loadscope -q $(PYTEST_ARGS) tests

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.run --output=runs/bench/results.json

profile: $(VENV)/.installed-test
	$(PY) -m benchmarks.profile --output=runs/bench/profile.json

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs
