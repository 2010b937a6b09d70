"""Building, loading and calling the CUDA-source kernels of csrc/.

The same csrc/*.cu file runs in two ways, behind the same `extern "C"` launch functions declared in
csrc/nf_abi.h (each takes a pointer to its argument struct, mirrored in cuda_abi.py, and a stream;
it returns 0 or an error code):

* CUDA tensors: the real kernels, from the extension `nanofast._C` that setup.py builds where nvcc
  and a CUDA torch exist, else JIT-built once with torch.utils.cpp_extension (csrc/bindings.cpp only
  hands the launch functions' addresses to Python; ctypes calls them on the current stream).
* CPU tensors: the very same source compiled with g++ -std=c++20 against csrc/cuda_emu.h, which runs
  every CUDA thread of a block as a std::thread (see that header). Built on first use into a user
  cache directory keyed by a hash of the sources and flags, then loaded with ctypes. This is how the
  kernels are *executed* on machines without a GPU; it is slow and meant for small test shapes.

Locations: the CUDA sources are $NANOFAST_CSRC when set, else the package data `csrc/` inside this
package (an installed wheel: setup.py ships the repository's csrc/ as nanofast.kernels.csrc), else
the checkout's csrc/ beside kernels/ (an editable install or a checkout on sys.path); builds go
under NANOFAST_CACHE, else $XDG_CACHE_HOME/nanofast, else ~/.cache/nanofast. Never into the source
tree.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from .cuda_abi import ABI, ERROR_FN

__all__ = ["csrc_dir", "csrc_candidates", "csrc_headers", "cache_dir", "sources_digest", "EMU_CXXFLAGS", "emulation_library", "launch"]


# A file every csrc/ has: tells the sources apart from an unrelated folder named csrc.
CSRC_MARKER = "nf_abi.h"


def csrc_candidates(package_dir: Path | None = None) -> list[Path]:
    """Where the CUDA sources may be, in order: inside the package (an installed wheel), then beside
    it (a checkout: csrc/ next to kernels/)."""
    here = package_dir or Path(__file__).resolve().parent
    return [here / "csrc", here.parent / "csrc"]


def csrc_dir(package_dir: Path | None = None) -> Path:
    """The CUDA sources: $NANOFAST_CSRC, else the first of csrc_candidates() that holds them."""
    env = os.environ.get("NANOFAST_CSRC")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"CUDA sources not found at {path} (NANOFAST_CSRC): point NANOFAST_CSRC at "
                                    "the csrc/ directory, or unset it to use the sources installed with nanofast")
        return path
    candidates = csrc_candidates(package_dir)
    for path in candidates:
        if (path / CSRC_MARKER).is_file():
            return path
    raise FileNotFoundError(f"CUDA sources not found (looked for {CSRC_MARKER} in {', '.join(map(str, candidates))}): "
                            "this nanofast was installed without its csrc/ package data; reinstall it from a "
                            "wheel or checkout that has them, or set NANOFAST_CSRC to a csrc/ directory")


def cache_dir(kind: str) -> Path:
    """Per-user build cache for `kind` ("cuda_emu", "cuda_jit"): $NANOFAST_CACHE, else the XDG cache."""
    root = os.environ.get("NANOFAST_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanofast"
    path = base / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def csrc_headers(src_dir: Path) -> list[Path]:
    """The headers every csrc source may include: part of each build's cache key."""
    return sorted(p for p in src_dir.iterdir() if p.suffix in (".h", ".cuh"))


# -O2 without -ffast-math: the emulation must round like IEEE fp32 (the fp16 conversion relies on it).
# -fno-strict-aliasing: kernels reinterpret element arrays as aligned packs, as CUDA code does.
EMU_CXXFLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-fno-fast-math"]

_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()
_emu_libs: dict[str, ctypes.CDLL] = {}


def _lock_for(key: str) -> threading.Lock:
    with _build_locks_guard:
        return _build_locks.setdefault(key, threading.Lock())


def sources_digest(paths: list[Path], extra: list[str]) -> str:
    """A short hash of the files' names and contents and of `extra` (flags, tool versions): a build key."""
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode() + b"\0")
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else cxx


def emulation_library(source_name: str) -> ctypes.CDLL:
    """Build (once, cached) and load the CPU-emulation shared library of csrc/`source_name`."""
    with _lock_for("emu:" + source_name):
        if source_name in _emu_libs:
            return _emu_libs[source_name]
        src_dir = csrc_dir()
        src = src_dir / source_name
        if not src.is_file():
            raise FileNotFoundError(f"no CUDA source {src}")
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None:
            raise RuntimeError(f"the CPU emulation of {source_name} needs a C++20 compiler; {cxx!r} was not found "
                               "(set CXX)")
        headers = csrc_headers(src_dir)
        digest = sources_digest([src, *headers], [*EMU_CXXFLAGS, _compiler_version(cxx)])
        out = cache_dir("cuda_emu") / f"{src.stem}-{digest}.so"
        if not out.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cxx, *EMU_CXXFLAGS, f"-I{src_dir}", "-x", "c++", str(src), "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                os.unlink(tmp)
                raise RuntimeError(f"building the CPU emulation of {source_name} failed:\n{' '.join(cmd)}\n"
                                   f"{res.stderr[-6000:]}")
            os.replace(tmp, out)  # atomic: a concurrent builder of the same digest just wins or loses the race
        lib = ctypes.CDLL(str(out))
        for name, (file, args_type) in ABI.items():
            if file == source_name:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = [ctypes.POINTER(args_type), ctypes.c_void_p], ctypes.c_int
        err = getattr(lib, ERROR_FN[source_name])
        err.argtypes, err.restype = [ctypes.c_int], ctypes.c_char_p
        _emu_libs[source_name] = lib
        return lib


_cuda_fns: dict[str, Callable] | None = None


def _cuda_symbols() -> dict[str, int]:
    """Addresses of the launch functions in the real CUDA build: nanofast._C, else a JIT build."""
    try:
        # Optional compiled extension of the nanofast package (setup.py builds it where CUDA exists).
        # Only its launch-function addresses are used, so nanofast.kernels still works on its own.
        mod = importlib.import_module("nanofast._C")
        if hasattr(mod, "symbols"):
            return dict(mod.symbols())
    except ImportError:
        pass
    from torch.utils import cpp_extension

    src_dir = csrc_dir()
    sources = [src_dir / "bindings.cpp", *sorted(src_dir.glob("*.cu"))]
    headers = csrc_headers(src_dir)
    flags = ["-O3", "-std=c++17"]
    digest = sources_digest([*sources, *headers], [*flags, torch.__version__, str(torch.version.cuda)])
    build = cache_dir("cuda_jit") / digest
    build.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(name=f"nanofast_cuda_ops_{digest}", sources=[str(s) for s in sources],
                             extra_cflags=["-O3"], extra_cuda_cflags=flags, extra_include_paths=[str(src_dir)],
                             build_directory=str(build), verbose=False)
    return dict(mod.symbols())


def _cuda_functions() -> dict[str, Callable]:
    global _cuda_fns
    with _lock_for("cuda"):
        if _cuda_fns is None:
            syms = _cuda_symbols()
            fns = {name: ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(args_type), ctypes.c_void_p)(syms[name])
                   for name, (_, args_type) in ABI.items()}
            for err in ERROR_FN.values():
                fns[err] = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(syms[err])
            _cuda_fns = fns
        return _cuda_fns


def launch(name: str, device: torch.device, args: ctypes.Structure) -> None:
    """Call launch function `name` with its argument struct (cuda_abi.ABI[name]) for tensors on
    `device`: the CUDA build on the current stream, else the CPU emulation. RuntimeError on a
    non-zero return."""
    source = ABI[name][0]
    if device.type == "cuda":
        fns = _cuda_functions()
        with torch.cuda.device(device):
            rc = fns[name](ctypes.byref(args), ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream))
        err = fns[ERROR_FN[source]]
    else:
        lib = emulation_library(source)
        rc = getattr(lib, name)(ctypes.byref(args), None)
        err = getattr(lib, ERROR_FN[source])
    if rc != 0:
        msg = err(rc)
        raise RuntimeError(f"{name} failed ({rc}): {msg.decode() if msg else 'unknown error'}")

