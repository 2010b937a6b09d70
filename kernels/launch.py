"""Host-side helpers every kernel launcher shares: tile rounding, the SM count, the launch device,
output allocation, row strides and Triton's names of torch dtypes. Kernel sources stay in their
own files; this holds only what was the same in all of them."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

# Triton's type names, as the compile gate's signatures spell them.
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton tile sides must be powers of two."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | int) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM), read once per device."""
    if isinstance(device, torch.device):
        device = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(device)


def device_ctx(x: Tensor):
    """Triton launches on the *current* CUDA device: pin it to the tensor's for multi-GPU callers."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and scratch buffer of the launchers comes from here (contiguous). The kernels
    take their output row strides as arguments, so tests can substitute views into guard buffers
    (sentinel-filled margins around each output) and prove no store lands outside its rows/columns."""
    return torch.empty(shape, dtype=dtype, device=device)


def row_stride(t: Tensor) -> int:
    """The stride between rows of a 2-D tensor; size-1 dims have arbitrary strides, and a single
    row's stride is never used for addressing."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]
