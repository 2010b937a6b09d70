# The two commands of the README. Each sets up .venv once (idempotent: redone only when setup.py
# changes), then runs. torch is pinned first so pip never pulls a different build as a dependency.
PYTHON ?= python3
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.9.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test compat wheel-test bench guard gpu-check browser

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet triton==$(TRITON_VERSION)
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The whole pipeline on CPU on the embedded corpus; prints where report.md is.
run: $(STAMP)
	$(BIN)/python train.py --stage all $(ARGS)

# The test suite (what .ci/run calls), then the install as a kernel user gets it (wheel-test) and
# the triton 3.6 leg (compat), both below.
test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest bench -m guard -q
	$(MAKE) --no-print-directory wheel-test
	$(MAKE) --no-print-directory compat

# The light install (issue 33; docs/install.md): the wheel of this working tree (built in place
# without the CUDA extension; setup.py keeps build/ and the egg-info out of the tree, and this
# checks that the ignored files `git status --porcelain --ignored` lists are the same before and
# after: build/ and *.egg-info/ are ignored, so that is where they would appear), installed into a
# fresh venv in a temporary directory with torch and triton pinned as in .venv and nothing else.
# Installing the wheel may add only what install_requires names (so nothing of the `train` extra;
# its filelock comes with torch itself), and tiktoken and pyarrow must not import. Then, from
# outside the repository: the installed nanofast.kernels runs every op on every CPU backend
# against its reference (the smoke; the CUDA sources shipped in the wheel run through the CPU
# emulation where g++ exists) and its report compiles one Triton configuration. About 2 minutes
# on 2 shared cores, most of it installing torch (not byte-compiled: the venv is thrown away);
# the CUDA emulation builds are cached (NANOFAST_CACHE, else ~/.cache/nanofast), so after the
# main suite they are not rebuilt.
WHEEL_ADDED_ONLY_BASE := import re, sys, importlib.util as u; s = u.spec_from_file_location('nf_setup', 'setup.py'); \
	m = u.module_from_spec(s); s.loader.exec_module(m); \
	canon = lambda name: re.sub(r'[-_.]+', '-', name).lower(); \
	reqs = {canon(re.match(r'[A-Za-z0-9._-]+', r).group(0)) for r in m.INSTALL_REQUIRES}; \
	names = lambda f: {canon(line.split('==')[0].split(' @ ')[0].strip()) for line in open(f) if line.strip()}; \
	added = names(sys.argv[2]) - names(sys.argv[1]); extra = added - reqs - {'nanofast'}; \
	print('wheel-test: the wheel added', *sorted(added), '(nothing of the train extra)' if not extra else ''); \
	sys.exit(f'wheel-test: FAIL: the wheel installed more than install_requires: {sorted(extra)}' if extra else 0)
WHEEL_REPORT_CONFIG := fwd D=768 bf16 BLOCK

wheel-test: $(STAMP)
	@set -eu; start=$$(date +%s); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	before=$$(git status --porcelain --ignored | grep '^!!' || true); \
	echo "wheel-test: building the wheel of the working tree"; \
	NANOFAST_CUDA_EXT=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w "$$tmp/dist" .; \
	after=$$(git status --porcelain --ignored | grep '^!!' || true); \
	if [ "$$after" != "$$before" ]; then \
	  echo "wheel-test: FAIL: building the wheel left files in the source tree:"; \
	  printf '%s\n' "$$after" | grep -vxF "$$before" || true; exit 1; fi; \
	whl=$$(ls "$$tmp"/dist/nanofast-*.whl); echo "wheel-test: $$(basename $$whl), $$(du -k $$whl | cut -f1) KB"; \
	echo "wheel-test: a fresh venv with torch $(TORCH_VERSION), triton $(TRITON_VERSION) and the wheel"; \
	$(PYTHON) -m venv "$$tmp/venv"; py="$$tmp/venv/bin/python"; \
	"$$py" -m pip install --quiet --no-compile torch==$(TORCH_VERSION); \
	"$$py" -m pip install --quiet --no-compile triton==$(TRITON_VERSION); \
	"$$py" -m pip list --format=freeze > "$$tmp/before.txt"; \
	"$$py" -m pip install --quiet "$$whl"; \
	"$$py" -m pip list --format=freeze > "$$tmp/after.txt"; \
	$(BIN)/python -c "$(WHEEL_ADDED_ONLY_BASE)" "$$tmp/before.txt" "$$tmp/after.txt"; \
	if "$$py" -c "import tiktoken" 2>/dev/null || "$$py" -c "import pyarrow" 2>/dev/null; then \
	  echo "wheel-test: FAIL: tiktoken or pyarrow importable in the light install"; exit 1; fi; \
	cd "$$tmp"; unset PYTHONPATH NANOFAST_CSRC; \
	TRITON_INTERPRET=1 "$$py" -m nanofast.kernels.smoke; \
	"$$py" -m nanofast.kernels.report --no-cuda --only '$(WHEEL_REPORT_CONFIG)' >/dev/null; \
	echo "wheel-test: passed in $$(( $$(date +%s) - start )) s"

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
# tests that run the Triton kernels, and the static decode step's test on them. About 4 minutes
# on 2 idle cores (6 on busy ones).
COMPAT_TRITON := 3.6.0
COMPAT_DIR := .venv-compat/triton-$(COMPAT_TRITON)
COMPAT_STAMP := $(COMPAT_DIR)/.installed
COMPAT_TESTS := tests/test_rms_norm.py tests/test_qk_norm_rope.py tests/test_paged_attention.py \
	tests/test_newton_schulz_triton.py tests/test_newton_schulz.py tests/test_fp8_gemm.py \
	tests/test_fp8_quant.py tests/test_fp8_linear.py tests/test_linear_cross_entropy.py \
	tests/test_kernel_defaults.py tests/test_tile_config.py tests/test_dispatch.py tests/test_ops.py \
	tests/test_rotary.py tests/test_model.py tests/test_compat.py tests/test_registry.py \
	'tests/test_engine.py::test_kernel_backends_in_the_engine[triton]' \
	'tests/test_engine.py::test_the_in_place_qk_norm_rope_kernel_runs_on_the_kernel_path[triton]' \
	tests/test_engine.py::test_decode_plans_without_reading_lengths_back \
	tests/test_decode_graph.py::test_the_kernels_static_step_equals_the_general_path
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
