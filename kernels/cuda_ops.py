"""Launchers for the CUDA-source kernels in csrc/: RMSNorm, fused QK-norm + rotary, paged decode attention.

The same csrc/*.cu file runs in two ways, behind the same `extern "C"` launch functions (raw
pointers, sizes, element strides, dtype codes, scalars, a stream; they return 0 or an error code):

* CUDA tensors: the real kernels, from the extension `nanofast._C` that setup.py builds where nvcc
  and a CUDA torch exist, else JIT-built once with torch.utils.cpp_extension (csrc/bindings.cpp only
  hands the launch functions' addresses to Python; ctypes calls them on the current stream).
* CPU tensors: the very same source compiled with g++ -std=c++20 against csrc/cuda_emu.h, which runs
  every CUDA thread of a block as a std::thread (see that header). Built on first use into a user
  cache directory keyed by a hash of the sources and flags, then loaded with ctypes. This is how the
  kernels are *executed* on machines without a GPU; it is slow and meant for small test shapes.

`nvcc_facts` compiles a csrc file with `nvcc -cubin -Xptxas -v` for a target (sm_90a, sm_80) and
parses registers, spill stores/loads, stack and shared memory per kernel, so tests can hold every
kernel to "no spills, bounded registers" without a GPU.

Locations: csrc/ is found next to this package's parent directory (kernels/ is installed in editable
mode as nanofast.kernels) unless NANOFAST_CSRC points elsewhere; builds go under NANOFAST_CACHE, else
$XDG_CACHE_HOME/nanofast, else ~/.cache/nanofast. Never into the source tree.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .compile_gate import MachineFacts, count_instructions
from .launch import sm_count

__all__ = [
    "rms_norm_fwd_cuda", "rms_norm_bwd_cuda", "qk_norm_rope_fwd_cuda", "qk_norm_rope_bwd_cuda",
    "qk_norm_rope_inplace_cuda", "paged_decode_attention_cuda", "paged_kv_write_cuda", "nvcc_facts", "NvccFacts",
    "emulation_library", "csrc_dir", "cache_dir",
    "ABI",
]

# dtype codes of the launch ABI (csrc/common.cuh, enum nf::DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_S3 = [_I64, _I64, _I64]  # (batch, time, head) element strides of a (B, T, H, D) operand

# name -> (source file, argument ctypes). Must match the C definitions (tests parse and compare them).
ABI: dict[str, tuple[str, list]] = {
    "nf_rms_norm_fwd": ("rms_norm.cu", [_I32, _I64, _I64, _P, _I64, _P, _I64, _P, _I32, _P, _I64, _P, _I64, _P,
                                        _F32, _P]),
    "nf_rms_norm_bwd": ("rms_norm.cu", [_I32, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I32, _P, _I64, _P, _I64,
                                        _P, _I64, _P, _P]),
    "nf_qk_norm_rope_fwd": ("qk_norm_rope.cu", [_I32, _I64, _I64, _I64, _I64, _I64, _P, *_S3, _P, *_S3, _P, *_S3,
                                                _P, *_S3, _P, _P, _P, _I64, _P, _I64, _I32, _P, _P, _I32, _P, _I32,
                                                _F32, _F32, _I32, _P]),
    "nf_qk_norm_rope_bwd": ("qk_norm_rope.cu", [_I32, _I64, _I64, _I64, _I64, _I64, _P, *_S3, _P, *_S3, _P, *_S3,
                                                _P, *_S3, _P, *_S3, _P, *_S3, _P, _P, _P, _I64, _P, _I64, _I32, _P,
                                                _I32, _P, _I32, _P, _P, _I64, _P, _P, _F32, _I32, _P]),
    "nf_paged_attention_fwd": ("paged_attention.cu", [_I32, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64,
                                                      _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64,
                                                      _P, _I64, _I64, _F32, _I64, _P, _P, _P, _I64, _I64, _P]),
    "nf_paged_kv_write": ("paged_attention.cu", [_I32, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _I64,
                                                 _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _I32, _P]),
}
_ERROR_FN = {"rms_norm.cu": "nf_rms_norm_error_string", "qk_norm_rope.cu": "nf_qk_norm_rope_error_string",
             "paged_attention.cu": "nf_paged_attention_error_string"}

_WARPS_PER_BLOCK_QK = 4  # kWarps in csrc/qk_norm_rope.cu: the backward's partial rows per block
_EMU_PERSISTENT_BLOCKS = 3  # CPU emulation: a few persistent blocks, so each one loops over rows/items


# ----------------------------------------------------------------------------------------------------------
# locations and builds

def csrc_dir() -> Path:
    """The csrc/ directory: $NANOFAST_CSRC, else the repository root next to this package."""
    env = os.environ.get("NANOFAST_CSRC")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "csrc"
    if not path.is_dir():
        raise FileNotFoundError(f"CUDA sources not found at {path}: set NANOFAST_CSRC to the csrc/ directory")
    return path


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


# -O2 without -ffast-math: the emulation must round like IEEE fp32 (the fp16 conversion relies on it).
# -fno-strict-aliasing: kernels reinterpret element arrays as aligned packs, as CUDA code does.
EMU_CXXFLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-fno-fast-math"]

_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()
_emu_libs: dict[str, ctypes.CDLL] = {}


def _lock_for(key: str) -> threading.Lock:
    with _build_locks_guard:
        return _build_locks.setdefault(key, threading.Lock())


def _sources_digest(paths: list[Path], extra: list[str]) -> str:
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
        headers = [p for p in src_dir.iterdir() if p.suffix in (".h", ".cuh")]
        digest = _sources_digest([src, *headers], [*EMU_CXXFLAGS, _compiler_version(cxx)])
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
        for name, (file, argtypes) in ABI.items():
            if file == source_name:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
        err = getattr(lib, _ERROR_FN[source_name])
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
    headers = [p for p in src_dir.iterdir() if p.suffix in (".h", ".cuh")]
    flags = ["-O3", "-std=c++17"]
    digest = _sources_digest([*sources, *headers], [*flags, torch.__version__, str(torch.version.cuda)])
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
            fns = {name: ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(syms[name]) for name, (_, argtypes) in ABI.items()}
            for err in _ERROR_FN.values():
                fns[err] = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(syms[err])
            _cuda_fns = fns
        return _cuda_fns


def _launch(name: str, device: torch.device, *args) -> None:
    """Call launch function `name` for tensors on `device`; raise RuntimeError on a non-zero return."""
    source = ABI[name][0]
    if device.type == "cuda":
        fns = _cuda_functions()
        with torch.cuda.device(device):
            rc = fns[name](*args, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream))
        err = fns[_ERROR_FN[source]]
    else:
        lib = emulation_library(source)
        rc = getattr(lib, name)(*args, None)
        err = getattr(lib, _ERROR_FN[source])
    if rc != 0:
        msg = err(rc)
        raise RuntimeError(f"{name} failed ({rc}): {msg.decode() if msg else 'unknown error'}")


# ----------------------------------------------------------------------------------------------------------
# argument checks

def _check_tensor(name: str, t, ndim: int, *, float_dtype: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if float_dtype and t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    if t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _check_opt_tensor(name: str, t, ndim: int) -> None:
    if t is not None:
        _check_tensor(name, t, ndim)


def _check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_dtype(name: str, t: Tensor, dtype: torch.dtype, ref: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {ref} ({dtype}), got {t.dtype}")


def _check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


def _check_real(name: str, v, *, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (nonneg and v < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if nonneg else ''} float, got {v}")
    return v


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _wcode(t: Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def _persistent_blocks(device: torch.device, work: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = sm_count(device)
        return max(1, min(work, per_sm * sms))
    return max(1, min(work, _EMU_PERSISTENT_BLOCKS))


# ----------------------------------------------------------------------------------------------------------
# RMSNorm

def _rms_norm_fwd_into(x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float, y: Tensor,
                       rstd: Tensor, h: Tensor | None) -> None:
    """Forward into caller-provided outputs (row strides free, last dim contiguous; rstd contiguous)."""
    N, D = x.shape
    if N == 0:
        return
    _launch("nf_rms_norm_fwd", x.device, DTYPE_CODES[x.dtype], N, D, x.data_ptr(), x.stride(0), _ptr(residual),
            residual.stride(0) if residual is not None else 0, _ptr(weight), _wcode(weight), y.data_ptr(),
            y.stride(0), _ptr(h), h.stride(0) if h is not None else 0, rstd.data_ptr(), eps)


def _check_rms_fwd(x, weight, residual, eps) -> float:
    _check_tensor("x", x, 2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have a non-empty last dimension D, got shape {tuple(x.shape)}")
    _check_opt_tensor("weight", weight, 1)
    _check_opt_tensor("residual", residual, 2)
    _check_device(x.device, weight=weight, residual=residual)
    if weight is not None:
        _check_shape("weight", weight, (x.shape[1],))
    if residual is not None:
        _check_shape("residual", residual, tuple(x.shape))
        _check_same_dtype("residual", residual, x.dtype, "x")
    return _check_real("eps", eps, nonneg=True)


def rms_norm_fwd_cuda(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """RMSNorm forward with an optional fused residual add, by the csrc/rms_norm.cu kernel.

    x: (N, D) float32/float16/bfloat16, any row stride, last dim contiguous. weight: (D,) of any of
    those dtypes, or None. residual: (N, D) in x's dtype, or None. Returns new contiguous tensors
    y (N, D) in x's dtype = (h * rstd) * weight, rstd (N,) float32 = 1 / sqrt(mean(h^2) + eps), and
    h = x + residual (N, D) in x's dtype, or None without a residual (then h is x itself). CPU
    tensors run through the CPU emulation of the same source.
    """
    return _rms_norm_fwd(x, weight, residual, _check_rms_fwd(x, weight, residual, eps))


def _rms_norm_fwd(x: Tensor, weight: Tensor | None, residual: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """rms_norm_fwd_cuda for callers that validated the inputs (rms_norm's autograd path)."""
    N, D = x.shape
    if N > 2**31 - 1:  # a launch fact, not input validation: the grid has one block per row
        raise ValueError(f"x has {N} rows; one block per row allows at most 2**31 - 1")
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    h = torch.empty((N, D), dtype=x.dtype, device=x.device) if residual is not None else None
    _rms_norm_fwd_into(x, weight, residual, eps, y, rstd, h)
    return y, rstd, h


def _rms_norm_bwd_into(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None, dh: Tensor | None, dx: Tensor,
                       dw: Tensor | None, num_partials: int | None = None) -> None:
    """Backward into caller-provided dx (row stride free) and dw (contiguous; required with weight)."""
    N, D = h.shape
    if N == 0:
        if dw is not None:
            dw.zero_()
        return
    G = num_partials if num_partials is not None else _persistent_blocks(h.device, N, 2)
    partial = torch.empty((G, D), dtype=torch.float32, device=h.device) if weight is not None else None
    _launch("nf_rms_norm_bwd", h.device, DTYPE_CODES[h.dtype], N, D, dy.data_ptr(), dy.stride(0), h.data_ptr(),
            h.stride(0), rstd.data_ptr(), _ptr(weight), _wcode(weight), _ptr(dh), dh.stride(0) if dh is not None else 0,
            dx.data_ptr(), dx.stride(0), _ptr(partial), G, _ptr(dw))


def _check_rms_bwd(dy, h, rstd, weight, dh) -> Tensor:
    _check_tensor("h", h, 2)
    if h.shape[1] == 0:
        raise ValueError(f"h must have a non-empty last dimension D, got shape {tuple(h.shape)}")
    _check_tensor("dy", dy, 2)
    _check_tensor("rstd", rstd, 1)
    _check_opt_tensor("weight", weight, 1)
    _check_opt_tensor("dh", dh, 2)
    _check_device(h.device, dy=dy, rstd=rstd, weight=weight, dh=dh)
    _check_shape("dy", dy, tuple(h.shape))
    _check_same_dtype("dy", dy, h.dtype, "h")
    _check_shape("rstd", rstd, (h.shape[0],))
    if rstd.dtype != torch.float32:
        raise TypeError(f"rstd must be float32 (as the forward returns it), got {rstd.dtype}")
    if weight is not None:
        _check_shape("weight", weight, (h.shape[1],))
    if dh is not None:
        _check_shape("dh", dh, tuple(h.shape))
        _check_same_dtype("dh", dh, h.dtype, "h")
    return rstd.contiguous()


def rms_norm_bwd_cuda(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None,
                      dh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """RMSNorm backward by the csrc/rms_norm.cu kernel.

    dy, h: (N, D) of one dtype (h as returned by the forward: x, or x + residual), any row stride,
    last dim contiguous; rstd (N,) float32 from the forward; weight (D,) or None; dh (N, D) in h's
    dtype or None: the gradient arriving at the returned residual stream. Returns dx (N, D) in h's
    dtype = rstd * (dy*w - hhat * mean(dy*w*hhat)) + dh with hhat = h * rstd, and dw (D,) in
    weight's dtype = sum over rows of dy * hhat (None without weight), summed deterministically:
    fp32 per-block partials added in a fixed order, no atomics.
    """
    return _rms_norm_bwd(dy, h, _check_rms_bwd(dy, h, rstd, weight, dh), weight, dh)


def _rms_norm_bwd(dy: Tensor, h: Tensor, rstd: Tensor, weight: Tensor | None,
                  dh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """rms_norm_bwd_cuda for callers that validated the inputs (rstd contiguous, as the forward makes it)."""
    N, D = h.shape
    dx = torch.empty((N, D), dtype=h.dtype, device=h.device)
    dw = torch.empty((D,), dtype=weight.dtype, device=h.device) if weight is not None else None
    _rms_norm_bwd_into(dy, h, rstd, weight, dh, dx, dw)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------
# QK-norm + rotary

def _s3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved) -> tuple[float, bool]:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("cos", cos, 2)
    _check_tensor("sin", sin, 2)
    _check_opt_tensor("q_weight", q_weight, 1)
    _check_opt_tensor("k_weight", k_weight, 1)
    _check_device(q.device, k=k, cos=cos, sin=sin, q_weight=q_weight, k_weight=k_weight)
    _check_same_dtype("k", k, q.dtype, "q")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, T, Hk, D) = ({B}, {T}, Hk, {D}) to match q, got {tuple(k.shape)}")
    if D == 0 or D % 2:
        raise ValueError(f"the head dimension D of q and k must be even and > 0 (rotary pairs), got {D}")
    if cos.shape[1] != D // 2 or cos.shape[0] < T:
        raise ValueError(f"cos must have shape (T', D/2) with T' >= T = {T}, D/2 = {D // 2}, got {tuple(cos.shape)}")
    _check_shape("sin", sin, tuple(cos.shape))
    _check_same_dtype("sin", sin, cos.dtype, "cos")
    if q_weight is not None:
        _check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        _check_shape("k_weight", k_weight, (D,))
    return _check_real("scale", scale), _check_bool("interleaved", interleaved)


def _qk_grid_ok(items: int, name: str) -> None:
    if -(-items // _WARPS_PER_BLOCK_QK) > 2**31 - 1:
        raise ValueError(f"{name}: {items} (token, head) items exceed the launch grid")


def _qk_norm_rope_fwd_into(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                           k_weight: Tensor | None, scale: float, eps: float, interleaved: bool, q_out: Tensor,
                           k_out: Tensor, q_rstd: Tensor | None, k_rstd: Tensor | None) -> None:
    """Forward into caller-provided outputs (any strides but a contiguous last dim; rstd contiguous)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    if B * T * (Hq + Hk) == 0:
        return
    _launch("nf_qk_norm_rope_fwd", q.device, DTYPE_CODES[q.dtype], B, T, Hq, Hk, D, q.data_ptr(), *_s3(q),
            k.data_ptr(), *_s3(k), q_out.data_ptr(), *_s3(q_out), k_out.data_ptr(), *_s3(k_out), _ptr(q_rstd),
            _ptr(k_rstd), cos.data_ptr(), cos.stride(0), sin.data_ptr(), sin.stride(0), DTYPE_CODES[cos.dtype], None,
            _ptr(q_weight), _wcode(q_weight), _ptr(k_weight), _wcode(k_weight), scale, eps, int(interleaved))


def qk_norm_rope_fwd_cuda(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                          k_weight: Tensor | None, scale: float, eps: float,
                          interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused per-head RMSNorm + rotary + scale of q and k in one launch (csrc/qk_norm_rope.cu).

    q (B, T, Hq, D), k (B, T, Hk, D): one float dtype, any strides but a contiguous last dim, D even.
    cos, sin (T', D/2) with T' >= T, any float dtype (row t is used for position t). q_weight,
    k_weight (D,) or None. Per head: n = x * rsqrt(mean(x^2) + eps) * weight, then rotation of the
    pairs (i, i + D/2) (or (2i, 2i+1) with interleaved=True): (n1 cos + n2 sin, n2 cos - n1 sin),
    times scale. Returns q_out, k_out (new contiguous, input dtype) and q_rstd (B, T, Hq), k_rstd
    (B, T, Hk) float32.
    """
    scale, interleaved = _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved)
    return _qk_norm_rope_fwd(q, k, cos, sin, q_weight, k_weight, scale, _check_real("eps", eps, nonneg=True),
                             interleaved)


def _qk_norm_rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_weight: Tensor | None,
                      k_weight: Tensor | None, scale: float, eps: float,
                      interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """qk_norm_rope_fwd_cuda for callers that validated the inputs (qk_norm_rope's autograd path)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    _qk_grid_ok(B * T * (Hq + Hk), "qk_norm_rope_fwd_cuda")
    q_out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, Hk, D), dtype=k.dtype, device=k.device)
    q_rstd = torch.empty((B, T, Hq), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty((B, T, Hk), dtype=torch.float32, device=q.device)
    _qk_norm_rope_fwd_into(q, k, cos, sin, q_weight, k_weight, scale, eps, interleaved, q_out, k_out, q_rstd, k_rstd)
    return q_out, k_out, q_rstd, k_rstd


def _qk_norm_rope_bwd_into(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                           q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                           scale: float, interleaved: bool, dq: Tensor, dk: Tensor, dq_weight: Tensor | None,
                           dk_weight: Tensor | None, num_blocks: int | None = None) -> None:
    """Backward into caller-provided dq, dk (free strides) and weight grads (contiguous)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    items = B * T * (Hq + Hk)
    if items == 0:
        for g in (dq_weight, dk_weight):
            if g is not None:
                g.zero_()
        return
    G = num_blocks if num_blocks is not None else _persistent_blocks(q.device, -(-items // _WARPS_PER_BLOCK_QK), 4)
    rows = G * _WARPS_PER_BLOCK_QK

    def partial(w):
        return torch.empty((rows, D), dtype=torch.float32, device=q.device) if w is not None else None

    pq, pk = partial(q_weight), partial(k_weight)
    _launch("nf_qk_norm_rope_bwd", q.device, DTYPE_CODES[q.dtype], B, T, Hq, Hk, D, dq_out.data_ptr(), *_s3(dq_out),
            dk_out.data_ptr(), *_s3(dk_out), q.data_ptr(), *_s3(q), k.data_ptr(), *_s3(k), dq.data_ptr(), *_s3(dq),
            dk.data_ptr(), *_s3(dk), q_rstd.data_ptr(), k_rstd.data_ptr(), cos.data_ptr(), cos.stride(0),
            sin.data_ptr(), sin.stride(0), DTYPE_CODES[cos.dtype], _ptr(q_weight), _wcode(q_weight), _ptr(k_weight),
            _wcode(k_weight), _ptr(pq), _ptr(pk), G, _ptr(dq_weight), _ptr(dk_weight), scale, int(interleaved))


def qk_norm_rope_bwd_cuda(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                          scale: float, interleaved: bool
                          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backward of qk_norm_rope_fwd_cuda (csrc/qk_norm_rope.cu).

    dq_out (B, T, Hq, D), dk_out (B, T, Hk, D) in q's dtype (any strides, last dim contiguous); q, k,
    cos, sin, weights, scale, interleaved as given to the forward; q_rstd (B, T, Hq), k_rstd
    (B, T, Hk) float32 from the forward. Returns dq, dk (new contiguous, q's dtype) and dq_weight,
    dk_weight (D,) in the weights' dtypes (None without the weight), each reduced deterministically
    (fp32 per-warp partials, fixed-order sum).
    """
    scale, interleaved = _check_qk_common(q, k, cos, sin, q_weight, k_weight, scale, interleaved)
    _check_tensor("dq_out", dq_out, 4)
    _check_tensor("dk_out", dk_out, 4)
    _check_tensor("q_rstd", q_rstd, 3)
    _check_tensor("k_rstd", k_rstd, 3)
    _check_device(q.device, dq_out=dq_out, dk_out=dk_out, q_rstd=q_rstd, k_rstd=k_rstd)
    _check_shape("dq_out", dq_out, tuple(q.shape))
    _check_shape("dk_out", dk_out, tuple(k.shape))
    _check_same_dtype("dq_out", dq_out, q.dtype, "q")
    _check_same_dtype("dk_out", dk_out, k.dtype, "k")
    _check_shape("q_rstd", q_rstd, tuple(q.shape[:3]))
    _check_shape("k_rstd", k_rstd, tuple(k.shape[:3]))
    for name, r in (("q_rstd", q_rstd), ("k_rstd", k_rstd)):
        if r.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (as the forward returns it), got {r.dtype}")
    return _qk_norm_rope_bwd(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd.contiguous(),
                             k_rstd.contiguous(), scale, interleaved)


def _qk_norm_rope_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                      q_weight: Tensor | None, k_weight: Tensor | None, q_rstd: Tensor, k_rstd: Tensor,
                      scale: float, interleaved: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """qk_norm_rope_bwd_cuda for callers that validated the inputs (rstd contiguous, as the forward makes it)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    _qk_grid_ok(B * T * (Hq + Hk), "qk_norm_rope_bwd_cuda")
    dq = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, Hk, D), dtype=k.dtype, device=q.device)
    dq_weight = torch.empty((D,), dtype=q_weight.dtype, device=q.device) if q_weight is not None else None
    dk_weight = torch.empty((D,), dtype=k_weight.dtype, device=q.device) if k_weight is not None else None
    _qk_norm_rope_bwd_into(dq_out, dk_out, q, k, cos, sin, q_weight, k_weight, q_rstd, k_rstd, scale, interleaved,
                           dq, dk, dq_weight, dk_weight)
    return dq, dk, dq_weight, dk_weight


def qk_norm_rope_inplace_cuda(qkv: Tensor, positions: Tensor, cos_sin_cache: Tensor, num_q_heads: int,
                              num_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None, scale: float,
                              eps: float, interleaved: bool) -> None:
    """Normalise, rotate and scale the q and k heads of a packed qkv buffer in place (inference).

    qkv: (N, (Hq + 2*Hkv) * D) float32/float16/bfloat16, per token [q heads | k heads | v heads],
    row stride may exceed the width, last dim contiguous. positions: (N,) int64 (int32 accepted),
    the rotary row of each token, 0 <= p < max_position. cos_sin_cache: (max_position, D) float =
    [cos | sin] halves per position. q_weight, k_weight (D,) or None. v heads (and any row padding) are left untouched.
    """
    _check_tensor("qkv", qkv, 2)
    Hq = _check_int("num_q_heads", num_q_heads, 0)
    Hkv = _check_int("num_kv_heads", num_kv_heads, 0)
    if Hq + Hkv == 0:
        raise ValueError("num_q_heads + num_kv_heads must be >= 1")
    heads = Hq + 2 * Hkv
    N, W = qkv.shape
    if W % heads != 0 or W == 0:
        raise ValueError(f"qkv width {W} is not (num_q_heads + 2 * num_kv_heads) = {heads} heads of equal size D")
    D = W // heads
    if D % 2:
        raise ValueError(f"head dimension D = {D} must be even (rotary pairs)")
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")
    _check_shape("positions", positions, (N,))
    if N > 1 and qkv.stride(0) < W:
        raise ValueError(f"qkv rows must not overlap: row stride {qkv.stride(0)} < row width {W}")
    _check_tensor("cos_sin_cache", cos_sin_cache, 2)
    _check_opt_tensor("q_weight", q_weight, 1)
    _check_opt_tensor("k_weight", k_weight, 1)
    _check_device(qkv.device, positions=positions, cos_sin_cache=cos_sin_cache, q_weight=q_weight,
                  k_weight=k_weight)
    if cos_sin_cache.shape[1] != D:
        raise ValueError(f"cos_sin_cache must have shape (max_position, D = {D}), got {tuple(cos_sin_cache.shape)}")
    if q_weight is not None:
        _check_shape("q_weight", q_weight, (D,))
    if k_weight is not None:
        _check_shape("k_weight", k_weight, (D,))
    scale = _check_real("scale", scale)
    eps = _check_real("eps", eps, nonneg=True)
    interleaved = _check_bool("interleaved", interleaved)
    max_pos = cos_sin_cache.shape[0]
    if not qkv.is_cuda and N and (int(positions.min()) < 0 or int(positions.max()) >= max_pos):
        raise ValueError(f"positions must lie in [0, {max_pos}) (rows of cos_sin_cache), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    _qk_norm_rope_inplace(qkv, positions, cos_sin_cache, Hq, Hkv, q_weight, k_weight, scale, eps, interleaved)


def _qk_norm_rope_inplace(qkv: Tensor, positions: Tensor, cos_sin_cache: Tensor, num_q_heads: int,
                          num_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None, scale: float,
                          eps: float, interleaved: bool) -> None:
    """qk_norm_rope_inplace_cuda for callers that validated the inputs (CPU positions range-checked too)."""
    N, W = qkv.shape
    Hq, Hkv = num_q_heads, num_kv_heads
    D = W // (Hq + 2 * Hkv)
    if N == 0:
        return
    _qk_grid_ok(N * (Hq + Hkv), "qk_norm_rope_inplace_cuda")
    positions = positions.to(torch.int64).contiguous()  # the kernel reads int64 rows
    if qkv.is_cuda:
        # A host-side check would synchronise every call; a device assert keeps the launch asynchronous.
        torch._assert_async(((positions >= 0) & (positions < cos_sin_cache.shape[0])).all(),
                            "qk_norm_rope_inplace_cuda: positions out of range of cos_sin_cache")
    es = qkv.element_size()
    base, rs = qkv.data_ptr(), qkv.stride(0)
    k_base = base + Hq * D * es
    cs = cos_sin_cache.data_ptr()
    # Tokens as (B = 1, T = N): head h of token n sits at n * row_stride + h * D; the launch function
    # reads the rotary row from positions[n] and writes each head back where it came from.
    _launch("nf_qk_norm_rope_fwd", qkv.device, DTYPE_CODES[qkv.dtype], 1, N, Hq, Hkv, D, base, 0, rs, D, k_base, 0, rs,
            D, base, 0, rs, D, k_base, 0, rs, D, None, None, cs, cos_sin_cache.stride(0),
            cs + (D // 2) * cos_sin_cache.element_size(), cos_sin_cache.stride(0), DTYPE_CODES[cos_sin_cache.dtype],
            positions.data_ptr(), _ptr(q_weight), _wcode(q_weight), _ptr(k_weight), _wcode(k_weight), scale, eps,
            int(interleaved))


# ----------------------------------------------------------------------------------------------------------
# paged KV-cache decode attention

_PAGED_MAX_D = 256  # kMaxD in csrc/paged_attention.cu: at most 8 elements per lane in registers
_PAGED_MAX_SPLITS = 65535  # gridDim.y
_SPLIT_MIN_KEYS = 64  # a split should stream at least this many keys, or the merge costs more than it buys


def _check_index_tensor(name: str, t, ndim: int, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def _unit_last(t):
    """t with a unit last-dim stride (the kernels vectorise along D): small operands (q, new k/v)
    are copied when needed; the caches are never copied (written in place, and far too big)."""
    if isinstance(t, Tensor) and t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _check_cache_pair(k_cache, v_cache) -> tuple[int, int, int, int]:
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    if min(k_cache.shape) < 1:
        raise ValueError(f"k_cache must have shape (num_pages, page_size, Hkv, D) with every size >= 1, got "
                         f"{tuple(k_cache.shape)}")
    _check_shape("v_cache", v_cache, tuple(k_cache.shape))
    _check_same_dtype("v_cache", v_cache, k_cache.dtype, "k_cache")
    return tuple(k_cache.shape)


def _paged_heads_layout(G: int) -> tuple[int, int, int]:
    """(heads per warp, warps, blocks per KV head) as nf_paged_attention_fwd chooses them."""
    hpw = 1 if G == 1 else 2 if G == 2 else 4
    warps = min(-(-G // hpw), 8)
    return hpw, warps, -(-G // (hpw * warps))


def _default_num_splits(device: torch.device, B: int, Hkv: int, G: int, max_len: int) -> int:
    """CUDA: enough splits for ~2 blocks per SM, each split >= _SPLIT_MIN_KEYS keys of the longest
    possible sequence (max_pages * page_size: known without reading seq_lens, so no host sync).
    The emulation runs blocks one after another: one split."""
    if device.type != "cuda":
        return 1
    blocks = B * Hkv * _paged_heads_layout(G)[2]
    want = -(-2 * sm_count(device) // blocks)
    return max(1, min(want, max_len // _SPLIT_MIN_KEYS, _PAGED_MAX_SPLITS))


def _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits
                           ) -> tuple[float, int, int]:
    """Validate the arguments of paged_decode_attention_cuda; returns (scale, window or -1, num_splits)."""
    _check_tensor("q", q, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    _check_index_tensor("block_table", block_table, 2, (torch.int32,))
    _check_index_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    _check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    _check_same_dtype("k_cache", k_cache, q.dtype, "q")
    B, Hq, Dq = q.shape
    if D > _PAGED_MAX_D:
        raise ValueError(f"k_cache head dimension D = {D} exceeds the kernel's maximum {_PAGED_MAX_D}")
    if Dq != D:
        raise ValueError(f"q must have shape (B, Hq, D = {D}) to match k_cache, got {tuple(q.shape)}")
    if Hq < 1 or Hq % Hkv:
        raise ValueError(f"q has Hq = {Hq} heads: must be a positive multiple of the k_cache KV heads Hkv = {Hkv}")
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B = {B}, max_pages >= 1), got {tuple(block_table.shape)}")
    _check_shape("seq_lens", seq_lens, (B,))
    max_len = block_table.shape[1] * ps
    if max_len > 2**31 - 1:
        raise ValueError(f"block_table max_pages * page_size = {max_len} positions exceed int32")
    scale = _check_real("scale", scale)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    w = -1 if window is None else _check_int("window", window, 0)
    if w > 2**31 - 1:
        w = -1  # a window longer than any sequence is no window
    if num_splits is None:
        S = _default_num_splits(q.device, B, Hkv, Hq // Hkv, max_len)
    else:
        S = _check_int("num_splits", num_splits, 1)
        if S > _PAGED_MAX_SPLITS:
            raise ValueError(f"num_splits must be <= {_PAGED_MAX_SPLITS}, got {S}")
    if B * Hkv * _paged_heads_layout(Hq // Hkv)[2] > 2**31 - 1:
        raise ValueError(f"B * Hkv = {B * Hkv} blocks exceed the launch grid")
    if B and not q.is_cuda:
        _check_paged_values(block_table, seq_lens, P, ps, w)
    return scale, w, S


def _check_paged_values(block_table: Tensor, seq_lens: Tensor, P: int, ps: int, window: int) -> None:
    """CPU tensors: seq_lens in [1, max_pages * page_size]; block-table entries of every page the
    kernel reads in [0, P). Entries of pages it does not read (past the sequence, before its
    window) may be anything. On CUDA this would be a host sync per decode step (and a device assert
    would poison the context), so there the kernel clamps lengths and drops keys of out-of-pool
    pages instead: a wrong result for bad values, never a fault (as the Triton kernel does)."""
    max_len = block_table.shape[1] * ps
    lens = seq_lens.to(torch.int64)
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"seq_lens must lie in [1, max_pages * page_size = {max_len}], got [{lo}, {hi}]")
    last = (lens - 1) // ps
    first = torch.zeros_like(last) if window < 0 else (lens - 1 - window).clamp(min=0) // ps
    idx = torch.arange(block_table.shape[1])
    read = (idx >= first[:, None]) & (idx <= last[:, None])
    bad = read & ((block_table < 0) | (block_table >= P))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is a page sequence {b} reads: it must "
                         f"lie in [0, num_pages = {P})")


def _paged_decode_attention_into(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                 seq_lens: Tensor, scale: float, window: int, num_splits: int, out: Tensor) -> None:
    """Attention into a caller-provided out (B, Hq, D) in q's dtype, any strides but a contiguous last
    dim; arguments as _check_paged_attention returns them (window -1: none)."""
    B, Hq, D = q.shape
    if B == 0:
        return
    P, ps, Hkv, _ = k_cache.shape
    part_o = part_lse = None
    if num_splits > 1:
        part_o = torch.empty((num_splits, B, Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, B, Hq), dtype=torch.float32, device=q.device)
    ks, vs = k_cache.stride(), v_cache.stride()
    _launch("nf_paged_attention_fwd", q.device, DTYPE_CODES[q.dtype], B, Hq, Hkv, D, q.data_ptr(), q.stride(0),
            q.stride(1), k_cache.data_ptr(), ks[0], ks[1], ks[2], v_cache.data_ptr(), vs[0], vs[1], vs[2], P, ps,
            block_table.data_ptr(), block_table.stride(0), block_table.stride(1), block_table.shape[1],
            seq_lens.data_ptr(), seq_lens.stride(0), window, scale, num_splits, _ptr(part_o), _ptr(part_lse),
            out.data_ptr(), out.stride(0), out.stride(1))


def paged_decode_attention_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                                scale: float, window: int | None, num_splits: int | None) -> Tensor:
    """Decode attention of one query token per sequence over a paged KV cache (csrc/paged_attention.cu).

    q: (B, Hq, D) float32/float16/bfloat16, any strides (a non-unit last-dim stride costs a copy of q).
    k_cache, v_cache:
    (num_pages, page_size, Hkv, D) in q's dtype (NHD; any strides, last dim contiguous), D <= 256,
    Hq a multiple of Hkv; query head h uses KV head h // (Hq // Hkv). block_table: (B, max_pages)
    int32, page ids of each sequence's positions in order; entries past a sequence's used pages are
    never read. seq_lens: (B,) int32 in [1, max_pages * page_size], the length including the current
    token. Values (lengths, used page ids) are checked for CPU tensors; on CUDA (no host sync) the
    kernel clamps lengths and skips keys in pages outside the pool instead. scale > 0 multiplies q.k. window None: all keys; w >= 0: keys j with len-1-w <= j <= len-1.
    num_splits: split-KV factor (None: enough to fill ~2x the SMs on CUDA, 1 in the emulation).
    Returns (B, Hq, D) in q's dtype; fp32 scores, online softmax, deterministic.
    """
    q = _unit_last(q)
    scale, w, S = _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, window, num_splits)
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)
    _paged_decode_attention_into(q, k_cache, v_cache, block_table, seq_lens, scale, w, S, out)
    return out


def paged_kv_write_cuda(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store k, v (N, Hkv, D) into the paged caches (num_pages, page_size, Hkv, D) in place.

    k, v: any strides (a non-unit last-dim stride costs a copy); caches: last dim contiguous.
    Token n goes to page slot_mapping[n] // page_size, offset slot_mapping[n] % page_size (int32 or
    int64, < num_pages * page_size: raises for CPU tensors, skipped on CUDA where checking would
    cost a host sync); negative slots are skipped (padding tokens). Values are copied
    bit for bit; every other cache element is left untouched. Slots must be distinct (duplicates race).
    """
    k, v = _unit_last(k), _unit_last(v)
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    P, ps, Hkv, D = _check_cache_pair(k_cache, v_cache)
    _check_index_tensor("slot_mapping", slot_mapping, 1, (torch.int32, torch.int64))
    _check_device(k.device, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    N = k.shape[0]
    _check_shape("k", k, (N, Hkv, D))
    _check_shape("v", v, (N, Hkv, D))
    _check_same_dtype("v", v, k.dtype, "k")
    _check_same_dtype("k_cache", k_cache, k.dtype, "k")
    _check_shape("slot_mapping", slot_mapping, (N,))
    if N == 0:
        return
    if -(-N * Hkv // 4) > 2**31 - 1:
        raise ValueError(f"N * Hkv = {N * Hkv} rows exceed the launch grid")
    slots = slot_mapping.contiguous()
    if not slots.is_cuda and int(slots.max()) >= P * ps:  # on CUDA the kernel skips them (no host sync)
        raise ValueError(f"slot_mapping entries must be < num_pages * page_size = {P * ps} (or negative: skipped), "
                         f"got {int(slots.max())}")
    kcs, vcs = k_cache.stride(), v_cache.stride()
    _launch("nf_paged_kv_write", k.device, DTYPE_CODES[k.dtype], N, Hkv, D, k.data_ptr(), k.stride(0), k.stride(1),
            v.data_ptr(), v.stride(0), v.stride(1), k_cache.data_ptr(), kcs[0], kcs[1], kcs[2], v_cache.data_ptr(),
            vcs[0], vcs[1], vcs[2], P, ps, slots.data_ptr(), int(slots.dtype == torch.int64))


# ----------------------------------------------------------------------------------------------------------
# nvcc machine facts

@dataclass
class NvccFacts(MachineFacts):
    """MachineFacts of one kernel as ptxas reports it (`-Xptxas -v`), plus the spill byte counts.

    local_bytes is the stack frame per thread (local memory); instructions come from nvdisasm when
    the triton wheel's copy is available, else stay empty.
    """
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0 or super().spills


def _nvcc() -> str:
    env = os.environ.get("NVCC")
    if env:
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    raise FileNotFoundError("nvcc not found: put the CUDA toolkit on PATH or set NVCC / CUDA_HOME")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else list(names)


def _split_name(demangled: str) -> tuple[str, str]:
    """('rms_norm_fwd_kernel', 'float, 4, 2') from 'void (anonymous namespace)::rms_norm_fwd_kernel<float, 4, 2>(...)'."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void\s+", "", s)
    m = re.match(r"([\w:]+)(?:<(.*?)>)?\(", s)
    if not m:
        return demangled, ""
    return m.group(1).split("::")[-1], m.group(2) or ""


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per entry function (mangled name): registers, spill bytes, stack, shared memory and barriers."""
    facts: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            facts[current] = {"registers": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
                              "shared_bytes": 0, "barriers": 0}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1) if m.group(1) in facts else None
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            facts[current].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                                  spill_load_bytes=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            facts[current]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            facts[current]["barriers"] = int(b.group(1)) if b else 0
            facts[current]["shared_bytes"] = int(s.group(1)) if s else 0
    return facts


def _sass_by_function(cubin: Path) -> dict[str, str]:
    try:
        from .compile_gate import _tool

        nvdisasm = _tool("nvdisasm")
    except (ImportError, FileNotFoundError):
        return {}
    res = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    parts = re.split(r"^\.text\.(\S+):\s*$", res.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


_facts_cache: dict[tuple, list] = {}


def nvcc_facts(source_name: str, arch: str | int = "sm_90a") -> list[NvccFacts]:
    """Compile csrc/`source_name` with `nvcc -arch=<arch> -cubin -O3 -Xptxas -v`; facts per kernel.

    arch: "sm_90a", "sm_80", or 90 / 80 (90 means sm_90a: the Hopper target the kernels ship for).
    One NvccFacts per kernel instantiation: kernel (base name), config (template arguments),
    arch (e.g. 90), registers, shared_bytes (static, as ptxas counts it), local_bytes (stack frame),
    spill_store_bytes, spill_load_bytes, barriers, instructions (SASS counts, when nvdisasm exists).
    Cached per (source contents, arch) for the life of the process.
    """
    if isinstance(arch, int):
        arch = "sm_90a" if arch == 90 else f"sm_{arch}"
    if not re.fullmatch(r"sm_\d+a?", str(arch)):
        raise ValueError(f"arch must look like 'sm_90a' / 'sm_80' or be an int such as 90, got {arch!r}")
    src_dir = csrc_dir()
    src = src_dir / source_name
    if not src.is_file():
        raise FileNotFoundError(f"no CUDA source {src}")
    headers = [p for p in src_dir.iterdir() if p.suffix in (".h", ".cuh")]
    key = (_sources_digest([src, *headers], []), arch)
    if key in _facts_cache:
        return _facts_cache[key]
    nvcc = _nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (src.stem + ".cubin")
        cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", f"-I{src_dir}", "-o", str(cubin),
               str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed for {source_name} ({arch}):\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        parsed = parse_ptxas(res.stdout + "\n" + res.stderr)
        sass = _sass_by_function(cubin)
    mangled = list(parsed)
    arch_num = int(re.sub(r"\D", "", arch))
    out = []
    for name, dm in zip(mangled, _demangle(mangled)):
        base, config = _split_name(dm)
        f = parsed[name]
        out.append(NvccFacts(kernel=base, config=config, arch=arch_num, registers=f["registers"],
                             shared_bytes=f["shared_bytes"], local_bytes=f["stack_bytes"],
                             instructions=count_instructions(sass[name]) if name in sass else {},
                             spill_store_bytes=f["spill_store_bytes"], spill_load_bytes=f["spill_load_bytes"],
                             barriers=f["barriers"]))
    _facts_cache[key] = out
    return out
