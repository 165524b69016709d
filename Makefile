# `make demo` and `make test` work on a fresh machine with only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev
# Large XLA buffers on transparent huge pages, and OpenBLAS on one thread under XLA's own worker threads (see
# experiments/runtime/entry.py: tune_process).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: demo test test-slow test-interop bench lint format clean device-wheels

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

$(VENV)/.interop: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,interop]"
	@touch $@

demo: $(STAMP)
	$(PY) -m theorax.experiments.demo --workdir=results/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-interop: $(VENV)/.interop
	$(PY) -m pytest -q -m interop

bench: $(VENV)/.interop
	@for f in experiments/bench_*.py; do \
	  echo "== $$f"; $(PY) -m theorax.experiments.$$(basename $$f .py) --out=results/bench || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The pure-Python wheels the accelerator machine lacks (experiments/device_check.py says how they travel there).
DEVICE_WHEELS ?= ml-collections==1.1.0 tensorboardX==2.6.5
device-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(DEVICE_WHEELS)

clean:
	rm -rf $(VENV) results .pytest_cache
