# make test : create .venv, install dsv3 with its test extras, run the tests
# make demo : the main job on built-in data (see README)
PYTHON ?= python3
VENV   ?= .venv
# A CPU build of torch is enough for everything but the GPU paths; override with
# `make TORCH=torch test` (or any pip spec) to get another build.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plot]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -x -p no:cacheprovider tests

demo: venv
	$(PY) -m dsv3.demo

bench: venv
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_load_memory.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
