# The two commands of the README. Each sets up .venv once (idempotent: redone only when setup.py
# changes), then runs. torch is pinned first so pip never pulls a different build as a dependency.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench guard gpu-check browser

$(STAMP): setup.py pyproject.toml
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
test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest bench -m guard -q

# Debian's chromium + chromedriver for tests/test_web_ui.py, installed once when apt-get is there
# (as root, or through passwordless sudo). Never fatal: without them that one test file skips.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "no apt-get: install chromium and chromedriver yourself, or tests/test_web_ui.py skips"; \
	  else \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    echo "installing chromium chromium-driver with apt-get (for tests/test_web_ui.py)"; \
	    ( $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        chromium chromium-driver >/dev/null ) \
	      || echo "could not install chromium: tests/test_web_ui.py will skip"; \
	  fi; \
	fi

# Benchmarks (pytest-benchmark): see bench/README.md for saving and comparing baselines.
bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-only $(ARGS)

# The throughput guard alone: same-run ratios, kernel machine-code facts (and GPU peak fractions).
guard: $(STAMP)
	$(BIN)/python -m pytest bench -m guard -q $(ARGS)

# On one CUDA GPU: compiled numerics, the model end to end and speed vs the vendor paths, in 5
# minutes; writes bench/baselines/<class>/gpu_check.json and the performance page (README).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(ARGS)
