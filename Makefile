# `make demo` and `make test` set everything up in ./.venv on first use (Python >= 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

# The demo needs less than the tests: its own stamp, so that `make demo` installs only that.
$(VENV)/.demo-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e ".[demo]"
	touch $@

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e ".[test]"
	$(PY) -m pip install -qq --no-deps nuscenes-devkit==1.2.0
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(PY) -m experiments.demo

test: $(VENV)/.installed
	JAX_NUM_CPU_DEVICES=8 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

bench: $(VENV)/.installed
	$(PY) -m experiments.bench

clean:
	rm -rf $(VENV) .pytest_cache .pytest_xla_cache
