"""Build and install nanofast.

`kernels/` is installed as the subpackage `nanofast.kernels` (never as a top-level `kernels`,
which would shadow the widely used package of that name). CUDA sources under `csrc/` are built
into `nanofast._C` only when a CUDA toolchain and a CUDA build of torch are both present, so
`pip install -e .` succeeds on a CPU-only machine. Install with `--no-build-isolation` so the
build sees the torch already in the environment instead of fetching a multi-GB CUDA wheel.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:  # CPU build of torch: nothing to link the kernels against
        return [], {}
    bindings = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    ext = CUDAExtension(
        name="nanofast._C",
        sources=bindings + sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a",
                                                     "-gencode=arch=compute_80,code=sm_80"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="nanofast",
    version="0.1.0",
    description="Fast GPU kernels and a thin nanochat-style training driver",
    python_requires=">=3.10",
    packages=["nanofast", "nanofast.kernels", "nanofast.tasks"],
    package_dir={"nanofast": "nanofast", "nanofast.kernels": "kernels"},
    package_data={"nanofast": ["static/*.html"]},  # the chat page served by nanofast.serve
    install_requires=[
        "torch>=2.5",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "tiktoken>=0.7",
        "rustbpe>=0.1.0",
        "pyarrow>=15",
        "filelock",
        "pyyaml",  # the CORE eval bundle's core.yaml
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.4", "pybind11", "ninja",
                "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "selenium>=4.11",
                "wandb>=0.19"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "wandb": ["wandb>=0.19"],  # --wandb PROJECT: optional logging, imported only when asked for
        "gpu": ["flash-attn", "transformer-engine[pytorch]", "triton>=3.4", "ninja", "pybind11"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
