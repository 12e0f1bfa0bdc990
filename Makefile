# p2ptrain — two commands: `make demo` and `make test`. Each installs what it needs.
#
# TORCH_SPEC picks the PyTorch build. The default is the CPU build that CI uses;
# GPU users: make demo TORCH_SPEC="torch" (pulls the CUDA build from PyPI).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-swarm bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m p2ptrain.demo

# Two pytest-xdist workers: a multi-peer test spends most of its time waiting for round
# boundaries and matchmaking windows (a one-process run of the suite kept the 2 cores 33 %
# busy). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST) --durations=25 tests

test-fast: $(STAMP)
	$(PYTEST) -m "not swarm" tests

test-swarm: $(STAMP)
	$(PYTEST) -m swarm tests

# Every benchmark, then the simulator's validation against real loopback swarms (over
# an hour on 2 cores). Tables print to the terminal; JSON and PNG go to bench-out/.
BENCHMARKS = $(sort $(wildcard benchmarks/bench_*.py))

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed
	for script in $(BENCHMARKS); do $(PY) $$script || exit 1; done
	$(PY) benchmarks/simulate.py --validate
	$(PY) benchmarks/simulate.py

# The same scripts in their smoke modes: each runs end to end in a minute or two.
bench-quick: $(VENV)/.bench-installed
	for script in $(BENCHMARKS) benchmarks/simulate.py; do $(PY) $$script --quick || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info demo-home bench-out
