# The two commands of the README. Each sets up .venv once (idempotent: redone only when setup.py
# changes), then runs. torch is pinned first so pip never pulls a different build as a dependency.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet triton==3.9.0
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The whole pipeline on CPU on the embedded corpus; prints where report.md is.
run: $(STAMP)
	$(BIN)/python train.py --stage all $(ARGS)

# The test suite (what .ci/run calls).
test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# Benchmarks (pytest-benchmark): see bench/README.md for saving and comparing baselines.
bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only $(ARGS)
