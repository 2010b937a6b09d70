"""Build and install nanofast (docs/install.md: which install line to use where).

`kernels/` is installed as the subpackage `nanofast.kernels` (never as a top-level `kernels`,
which would shadow the widely used package of that name, the Hugging Face kernel hub client the
`gpu` extra installs). Install with `--no-build-isolation` so the build sees the torch already in
the environment instead of fetching a multi-GB CUDA wheel; pyproject.toml holds only the build
system, every piece of metadata is here.

The CUDA sources under `csrc/` are built into `nanofast._C` as `cuda_ext_decision` says: by
default only where nvcc exists, torch is a CUDA build and nvcc's CUDA major version is torch's
(torch's extension builder refuses a major mismatch). Otherwise the install goes on without it
(one warning line where a CUDA torch is present), and nanofast.kernels.cuda_build builds the same
sources just in time on first use. NANOFAST_CUDA_EXT=0 skips the build, =1 forces it.

What installs what (docs/install.md): the bare distribution is what `nanofast.kernels` imports
(torch, triton on Linux, numpy); the `train` extra adds the training driver's dependencies (the
tokenizer, the data pipeline, the report's plots, the chat server). The CUDA sources ship inside
the package as `nanofast.kernels.csrc` (the repository's `csrc/`), so an installed wheel builds the
CUDA backend (just in time, or the CPU emulation) without a checkout.

Building writes nothing into the source tree: `build/` and `nanofast.egg-info/` go to a temporary
directory removed when the build process exits (out_of_tree_options).

Importing this file does nothing; only running it as __main__ (which setuptools' build backend
does) probes the machine and calls setup(), so tests/test_install.py can test the rules on CPU.
"""
from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
ENV_VAR = "NANOFAST_CUDA_EXT"

# The tested range ("Supported versions" in docs/install.md), all on CPU: torch 2.13 + triton 3.9
# in .venv (every test, `make test`); triton 3.6 + that torch 2.13 on the tests of every Triton
# kernel and of the model (`make compat`, which `make test` runs, so CI does); torch 2.11.0+cu130
# + triton 3.6, the GPU machines' pair, on the same tests once by hand (not in CI: a 4 GB download).
# Raise a floor together with the compat leg's pin (Makefile: COMPAT_TRITON) and drop the
# compatibility branches it no longer needs (kernels/interpreter.py, kernels/vendor.py).
MIN_TORCH = "2.11"
MIN_TRITON = "3.6"

# What nanofast.kernels imports, nothing else (tests/test_install.py checks both ways).
INSTALL_REQUIRES = [
    f"torch>={MIN_TORCH}",
    f"triton>={MIN_TRITON}; platform_system == 'Linux'",  # Linux wheels only (CPU users on Linux get it too)
    "numpy",
]

# The training driver (train.py, nanofast/ outside nanofast.kernels): every third-party module it
# imports, except wandb, which is imported only for --wandb (its own extra).
TRAIN = [
    "tiktoken>=0.7",
    "rustbpe>=0.1.0",
    "pyarrow>=15",
    "filelock",
    "pyyaml",  # the CORE eval bundle's core.yaml
    "tqdm",
    "matplotlib",  # the report's plots
    "fastapi>=0.110",  # the chat server (nanofast.serve); fastapi brings starlette and anyio
    "uvicorn>=0.29",
]

# Every extra installs from prebuilt wheels in seconds, except `fa2`. Keep each entry something the
# code imports or uses (tests/test_install.py checks it).
EXTRAS = {
    "train": TRAIN,
    # `dev`: the driver, its optional logger, and what the tests and benchmarks use.
    "dev": [*TRAIN, "wandb>=0.19", "pytest>=8", "pytest-benchmark>=4", f"triton>={MIN_TRITON}", "pybind11",
            "ninja", "httpx>=0.27", "selenium>=4.11", "openai>=1.40",
            "transformers==5.25.0"],  # transformers: tests/test_hf.py's tiny models
    "serve": TRAIN,  # the chat server needs the driver (model, tokenizer): the same as `train`
    "wandb": ["wandb>=0.19"],  # --wandb PROJECT: optional logging, imported only when asked for
    # GPU machines. `kernels`: the Hugging Face kernel hub client, which downloads a prebuilt FA3
    # for Hopper at run time (get_kernel). `ninja`: torch's extension builder needs it for the just
    # in time build of csrc/ (nanofast.kernels.cuda_build) and it makes the nanofast._C build fast.
    "gpu": ["kernels>=0.11.7", "ninja"],
    # FA2 for non-Hopper GPUs: flash-attn has no wheel for every torch, so pip compiles it from
    # source (up to hours; install ninja first, e.g. with the `gpu` extra, and cap MAX_JOBS).
    "fa2": ["flash-attn"],
}

# The CUDA sources, shipped as package data of nanofast.kernels.csrc (kernels/cuda_build.csrc_dir
# finds them there in an install, and beside kernels/ in a checkout).
CSRC_PATTERNS = ["*.cu", "*.cuh", "*.h", "*.cpp", "README.md"]

PACKAGES = ["nanofast", "nanofast.tasks", "nanofast.kernels", "nanofast.kernels.csrc"]
PACKAGE_DIR = {"nanofast": "nanofast", "nanofast.kernels": "kernels", "nanofast.kernels.csrc": "csrc"}
PACKAGE_DATA = {
    "nanofast": ["static/*.html", "dispatch_tables/*.json"],  # the chat page; the measured dispatch tables
    "nanofast.kernels.csrc": CSRC_PATTERNS,
}


def read_version() -> str:
    """nanofast.__version__, read from nanofast/__init__.py's text (the one place it is written),
    without importing nanofast (which would need torch in the build)."""
    with open(os.path.join(HERE, "nanofast", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if m is None:
        raise SystemExit('nanofast/__init__.py must set __version__ = "X.Y.Z" on a line of its own')
    return m.group(1)


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def out_of_tree_options() -> dict:
    """setup()'s `options` that keep the build out of the source tree: setuptools' build/ and
    nanofast.egg-info/ go into a temporary directory, removed when this process exits (pip and the
    build backend run each build step in a process of its own; the wheel is written elsewhere, and
    an editable install points at the sources, not at build/). Command-line options override."""
    tmp = tempfile.mkdtemp(prefix="nanofast-build-")
    atexit.register(shutil.rmtree, tmp, True)
    return {"build": {"build_base": os.path.join(tmp, "build")}, "egg_info": {"egg_base": tmp}}


NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]

JIT_HINT = (f"the CUDA backend of nanofast.kernels will be built just in time on first use instead "
            f"(nanofast.kernels.cuda_build; needs an nvcc of torch's CUDA major version, found through "
            f"CUDA_HOME or PATH); {ENV_VAR}=1 forces the build now")


def nvcc_cuda_version(nvcc_output: str | None) -> str | None:
    """The CUDA release `nvcc --version` reports ("... release 13.0, V13.0.88" -> "13.0"), or None."""
    m = re.search(r"release (\d+\.\d+)", nvcc_output or "")
    return m.group(1) if m else None


def _major(version: str) -> str:
    return version.split(".")[0]


def cuda_ext_decision(env: Mapping[str, str], nvcc_path: str | None, nvcc_cuda_version: str | None,
                      torch_cuda_version: str | None, has_sources: bool,
                      torch_importable: bool = True) -> tuple[bool, str]:
    """Whether to build nanofast._C, and why: (build, reason).

    env: the environment (NANOFAST_CUDA_EXT); nvcc_path: the nvcc torch's builder would use, or
    None; nvcc_cuda_version: its release ("13.0"), or None if unreadable; torch_cuda_version:
    torch.version.cuda (None for a CPU build, or when torch is not importable: torch_importable
    False, e.g. pip's build isolation); has_sources: csrc/*.cu exist.
    NANOFAST_CUDA_EXT=0 skips; =1 builds, and raises SystemExit where it cannot (no sources, no
    nvcc, no CUDA torch); any other non-empty value raises SystemExit. Unset or empty: build only
    when all are present and nvcc's CUDA major version equals torch's.
    """
    forced = env.get(ENV_VAR, "")
    if forced not in ("", "0", "1"):
        raise SystemExit(f"{ENV_VAR}={forced!r}: allowed values are 0 (skip the CUDA extension nanofast._C), "
                         f"1 (build it) or unset (build it where the CUDA toolkit matches torch)")
    if forced == "0":
        return False, f"{ENV_VAR}=0"
    torch_desc = ("torch is not importable by the build (pip's build isolation: install with "
                  "--no-build-isolation)" if not torch_importable else "torch is a CPU build")
    missing = None
    if not has_sources:
        missing = "no CUDA sources csrc/*.cu"
    elif torch_cuda_version is None:
        missing = torch_desc
    elif nvcc_path is None:
        missing = f"no nvcc found (CUDA_HOME or PATH); torch is built for CUDA {torch_cuda_version}"
    if forced == "1":
        if missing is not None:
            raise SystemExit(f"{ENV_VAR}=1 asks to build the CUDA extension nanofast._C, but {missing}; "
                             f"unset {ENV_VAR} or set it to 0 to install without it")
        if nvcc_cuda_version is not None and _major(nvcc_cuda_version) != _major(torch_cuda_version):
            return True, (f"forced by {ENV_VAR}=1 although nvcc is CUDA {nvcc_cuda_version} and torch CUDA "
                          f"{torch_cuda_version} (torch's builder refuses a major version mismatch)")
        return True, f"forced by {ENV_VAR}=1"
    if missing is not None:
        return False, missing
    if nvcc_cuda_version is None:
        return False, f"could not read the CUDA version of {nvcc_path} --version"
    if _major(nvcc_cuda_version) != _major(torch_cuda_version):
        return False, (f"nvcc is CUDA {nvcc_cuda_version} but torch is built for CUDA {torch_cuda_version}: "
                       f"torch's extension builder refuses a major version mismatch")
    return True, f"nvcc CUDA {nvcc_cuda_version} matches torch's CUDA {torch_cuda_version}"


def cuda_ext_warning(env: Mapping[str, str], nvcc_path: str | None, nvcc_cuda_version: str | None,
                     torch_cuda_version: str | None, has_sources: bool,
                     torch_importable: bool = True) -> str | None:
    """The one warning line to print when the extension is skipped, or None: no warning when it is
    built, skipped by NANOFAST_CUDA_EXT=0, or there is no CUDA here at all (no sources, a CPU build
    of torch, or neither torch nor nvcc in the build)."""
    build, reason = cuda_ext_decision(env, nvcc_path, nvcc_cuda_version, torch_cuda_version, has_sources,
                                      torch_importable)
    if build or env.get(ENV_VAR) == "0" or not has_sources:
        return None
    if torch_cuda_version is None and (torch_importable or nvcc_path is None):
        return None
    return f"nanofast: WARNING: not building the CUDA extension nanofast._C: {reason}; {JIT_HINT}"


def probe() -> dict:
    """This machine's inputs to cuda_ext_decision (imports torch, runs nvcc --version)."""
    has_sources = bool(glob.glob(os.path.join("csrc", "*.cu"), root_dir=HERE))
    torch_importable, torch_cuda, nvcc = True, None, None
    try:
        import torch
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_importable = False
    if torch_cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME  # the toolkit torch's builder will use
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        nvcc = candidate if candidate and os.path.exists(candidate) else None
    else:
        nvcc = shutil.which("nvcc")
    nvcc_version = None
    if nvcc is not None:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
            nvcc_version = nvcc_cuda_version(out)
        except (OSError, subprocess.SubprocessError):
            pass
    return dict(nvcc_path=nvcc, nvcc_cuda_version=nvcc_version, torch_cuda_version=torch_cuda,
                has_sources=has_sources, torch_importable=torch_importable)


def cuda_extensions(env: Mapping[str, str]) -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(): nanofast._C, or nothing (with at most one warning)."""
    if env.get(ENV_VAR) == "0":  # skip without importing torch
        return [], {}
    facts = probe()
    build, _ = cuda_ext_decision(env, **facts)
    if not build:
        warning = cuda_ext_warning(env, **facts)
        if warning:
            print(warning, file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    bindings = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=HERE))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"), root_dir=HERE))
    ext = CUDAExtension(name="nanofast._C", sources=bindings + sources,
                        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS})
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    from setuptools import setup

    ext_modules, cmdclass = cuda_extensions(os.environ)
    setup(
        name="nanofast",
        version=read_version(),
        description="Fast GPU kernels and a thin nanochat-style training driver",
        long_description=read_readme(),
        long_description_content_type="text/markdown",
        license="MIT",
        license_files=["LICENSE"],
        classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux",
                     "Environment :: GPU :: NVIDIA CUDA"],
        python_requires=">=3.10",
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data=PACKAGE_DATA,
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options=out_of_tree_options(),
    )
