# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint format bench aot clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tpu]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m launch.inspect --config experiments/tiny.py --mesh data=2,expert=4
	$(PY) -m launch.demo --config experiments/tiny.py --workdir workdir/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m slow $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed
	$(PY) benchmarks/step_latency.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serving_latency.py
	PYTHONPATH=. $(PY) benchmarks/server_load.py  # ~4 min: 32 live sessions, a slow reader, a drain

aot: $(VENV)/.installed
	$(PY) benchmarks/aot_report.py  # ~20 min: compiles the 276B config for TPU slices

clean:
	rm -rf $(VENV) .pytest_cache workdir
