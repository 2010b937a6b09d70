"""What the CUDA launchers (`<op>_cuda.py`) share: the argument checks of their public `*_cuda`
functions, and the pointers, dtype codes and persistent grid sizes they put into the launch structs.

Each op's CUDA launcher file has two layers: public `*_cuda` functions that check their arguments,
then launchers that trust them (the op's "cuda" backend, run by its public entry after validating
once). A launcher fills the launch function's argument struct (cuda_abi.py, the mirror of
csrc/nf_abi.h) and cuda_build.launch runs it on the tensors' device: the real kernels for CUDA
tensors, the CPU emulation of the same source for CPU tensors.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .cuda_abi import DTYPE_CODES
from .launch import sm_count

_EMU_PERSISTENT_BLOCKS = 3  # CPU emulation: a few persistent blocks, so each one loops over rows/items


def check_tensor(name: str, t, ndim: int, *, float_dtype: bool = True) -> None:
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


def check_opt_tensor(name: str, t, ndim: int) -> None:
    if t is not None:
        check_tensor(name, t, ndim)


def check_shape(name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_dtype(name: str, t: Tensor, dtype: torch.dtype, ref: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {ref} ({dtype}), got {t.dtype}")


def check_like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    """t is read alongside ref element for element (a gradient and its primal, a residual and x):
    same shape, same dtype."""
    check_shape(name, t, tuple(ref.shape))
    check_same_dtype(name, t, ref.dtype, ref_name)


def check_rstd(name: str, r: Tensor, shape: tuple) -> None:
    """A forward's saved 1/rms handed back to its backward."""
    check_shape(name, r, shape)
    if r.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (as the forward returns it), got {r.dtype}")


def check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


def check_real(name: str, v, *, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (nonneg and v < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if nonneg else ''} float, got {v}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()



def wcode(t: Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def persistent_blocks(device: torch.device, work: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = sm_count(device)
        return max(1, min(work, per_sm * sms))
    return max(1, min(work, _EMU_PERSISTENT_BLOCKS))


def check_index_tensor(name: str, t, ndim: int, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def unit_last(t):
    """t with a unit last-dim stride (the kernels vectorise along D): small operands (q, new k/v)
    are copied when needed; the caches are never copied (written in place, and far too big)."""
    if isinstance(t, Tensor) and t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t
