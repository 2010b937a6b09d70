# The two commands of the README. Each sets up .venv once (idempotent: redone only when setup.py
# changes), then runs. torch is pinned first so pip never pulls a different build as a dependency.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test compat bench guard gpu-check browser

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

# The test suite (what .ci/run calls), then the triton 3.6 leg (compat, below).
test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest bench -m guard -q
	$(MAKE) --no-print-directory compat

# The compatibility leg (issue 31; docs/install.md): the tests of every Triton kernel, the model
# and the engine's kernel path under the lowest triton setup.py allows (MIN_TRITON; 3.6 is also
# the GPU machines' triton), run by its interpreter on CPU. triton $(COMPAT_TRITON) is installed
# alone (--no-deps, once: the stamp) into $(COMPAT_DIR) and put first on PYTHONPATH, so `import
# triton` finds it while everything else (torch 2.13, numpy, nanofast) comes from .venv; a
# PYTHONPATH already set comes after it (how torch 2.11 was tried). Left out (-k): the compile
# gates (`compile_gate` tests: sm_90/sm_80 machine code, with register caps and instruction counts
# measured with triton 3.9; they compile under 3.6 too, but 3.6 spends more registers: three fp8
# cast+transpose configs need 93 against the cap of 64; they run in the main leg), the fp8 training test,
# which runs no Triton code (torch._scaled_mm) and takes 4 minutes; of test_engine.py only the
# tests that run the Triton kernels. About 4 minutes on 2 idle cores (6 on busy ones).
COMPAT_TRITON := 3.6.0
COMPAT_DIR := .venv-compat/triton-$(COMPAT_TRITON)
COMPAT_STAMP := $(COMPAT_DIR)/.installed
COMPAT_TESTS := tests/test_rms_norm.py tests/test_qk_norm_rope.py tests/test_paged_attention.py \
	tests/test_newton_schulz_triton.py tests/test_newton_schulz.py tests/test_fp8_gemm.py \
	tests/test_fp8_quant.py tests/test_fp8_linear.py tests/test_linear_cross_entropy.py \
	tests/test_kernel_defaults.py tests/test_tile_config.py tests/test_dispatch.py tests/test_ops.py \
	tests/test_model.py tests/test_compat.py tests/test_registry.py \
	'tests/test_engine.py::test_kernel_backends_in_the_engine[triton]' \
	'tests/test_engine.py::test_the_in_place_qk_norm_rope_kernel_runs_on_the_kernel_path[triton]' \
	tests/test_engine.py::test_decode_plans_from_the_engines_host_lengths
COMPAT_DESELECT := not compile_gate and not test_tiny_model_trains_in_fp8_and_fp16_about_as_well_as_bf16
COMPAT_ENV := PYTHONPATH=$(CURDIR)/$(COMPAT_DIR)$${PYTHONPATH:+:$$PYTHONPATH}

$(COMPAT_STAMP): | $(STAMP)
	rm -rf $(COMPAT_DIR)
	$(BIN)/pip install --quiet --no-deps --target $(COMPAT_DIR) triton==$(COMPAT_TRITON)
	touch $(COMPAT_STAMP)

compat: $(COMPAT_STAMP)
	$(COMPAT_ENV) $(BIN)/python -c "import sys, torch, triton; print('compat leg: triton', triton.__version__, \
	  'from', triton.__file__, '| torch', torch.__version__); sys.exit(triton.__version__ != '$(COMPAT_TRITON)')"
	$(COMPAT_ENV) $(BIN)/python -m pytest $(COMPAT_TESTS) -q -k '$(COMPAT_DESELECT)' $(ARGS)

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

# On one CUDA GPU: compiled numerics, the model end to end and speed vs what the model runs without
# each kernel, in 9 minutes; writes bench/baselines/<class>/gpu_check.json and the performance page.
# On a bare GPU machine (no venv, no network) run `python3 -m bench.gpu_check --out-dir DIR` instead.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(ARGS)
