"""Every CUDA-only vendor call nanofast makes, each behind that call's CUDA contract.

`torch._scaled_mm` (cuBLASLt / CUTLASS) and flash-attn 2 and 3 run only on a GPU, and what their
CPU stand-ins accept is wider than what CUDA accepts: torch's CPU `_scaled_mm` takes row-wise
scales with fp32 output, a float32 bias, any K; the SDPA fallback takes any window. A CPU test of a
path that calls them would pass where the GPU refuses. So nanofast calls them only through this
module, which checks CUDA's rules first on every device: a CPU run fails exactly where the GPU
would, before any work is done, with the rule and its source in the message.

Each rule below names the torch or flash-attn source it mirrors (file and function). Where torch
versions differ, the rule is the one every supported build accepts (a portable caller cannot know
which cuBLAS its torch was built with). `ContractError` is both a RuntimeError (what `TORCH_CHECK`
raises) and a ValueError (what `TORCH_CHECK_VALUE`, newer torch, and nanofast's own argument
checks raise), so callers catch it as either.

Calls:
    scaled_mm(mat1, mat2, scale_a, scale_b, ...)     torch._scaled_mm, after check_scaled_mm
    flash_attn_func(q, k, v, ...)                    FA3 or FA2 dense, after check_flash_attn
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, ...) FA3 or FA2 varlen, after check_flash_attn_varlen
    flash_attn_module(q)                             which flash-attn a tensor would run on, or None
    left_window(window)                              flash-attn's window rule for every attention path
"""
from __future__ import annotations

import functools
import importlib
import numbers
import os

import torch
from torch import Tensor

__all__ = ["ContractError", "SCALED_MM_RULES", "FLASH_ATTN_RULES", "check_scaled_mm", "scaled_mm",
           "check_flash_attn", "check_flash_attn_varlen", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_module", "attention_backend", "load_flash_attn_3", "left_window", "HUB_FA3"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_SCALED_MM_SRC = "torch aten/src/ATen/native/cuda/Blas.cpp::_scaled_mm_out_cuda"
_META_SRC = "torch torch/_meta_registrations.py::meta_scaled_mm"
_ROWWISE_SRC = "torch aten/src/ATen/native/cuda/RowwiseScaledMM.cu::f8f8bf16_rowwise"
_FA2_SRC = "flash-attn csrc/flash_attn/flash_api.cpp::mha_fwd / mha_varlen_fwd"
_FA3_SRC = "flash-attn hopper/flash_api.cpp::mha_fwd"

# rule id -> (what CUDA requires, the source it mirrors). Tests check every rule both ways.
SCALED_MM_RULES = {
    "fp8-operands": ("mat1 and mat2 are 2-D float8_e4m3fn / float8_e5m2 matrices", _SCALED_MM_SRC),
    "no-e5m2-pair": ("e5m2 x e5m2 is not supported ('Multiplication of two Float8_e5m2 matrices')",
                     _SCALED_MM_SRC),
    "layout": ("mat1 row-major, mat2 column-major (pass w.t() of a contiguous (N, K) weight)", _META_SRC),
    "multiple-of-16": ("K = mat1.size(1) and N = mat2.size(1) multiples of 16 (a weight-gradient GEMM reduces "
                       "over the tokens: M % 16 == 0)", _META_SRC),
    "scales": ("fp32 scales, both tensor-wise (one element each) or both row-wise (scale_a (M, 1), scale_b "
               "(1, N)); a mixed pair is 'Invalid scaling configuration'", _SCALED_MM_SRC),
    "rowwise-out-bf16": ("row-wise scaling writes bf16 only: the CUTLASS path every build without cuBLAS >= 12.9 "
                         "takes ('Only bf16 high precision output types are supported for row-wise scaling')",
                         _SCALED_MM_SRC),
    "rowwise-mat2-e4m3": ("row-wise scaling needs mat2 in float8_e4m3fn ('For RowWise scaling the second input "
                          "is required to be a float8_e4m3fn dtype')", _ROWWISE_SRC),
    "bias": ("bias 1-D of N; not with fp32 output ('Bias is not supported when out_dtype is set to Float32'); "
             "bf16 or fp16 and equal to the output's dtype", _SCALED_MM_SRC),
}

FLASH_ATTN_RULES = {
    "dtype": ("q, k, v fp16 or bf16, one dtype ('FlashAttention only support fp16 and bf16 data type')", _FA2_SRC),
    "layout": ("(B, T, H, D) dense or (total, H, D) varlen, last dim contiguous ('Input tensor must have "
               "contiguous last dimension'), k and v of one shape", _FA2_SRC),
    "head-dim": ("D <= 256 and a multiple of 8 (FA3: 'head_size should be a multiple of 8')", _FA3_SRC),
    "gqa": ("Hq a multiple of Hkv ('Number of heads in key/value must divide number of heads in query')",
            _FA2_SRC),
    "window": ("window_size (left, right) ints; -1 means unlimited on that side, so (-1, -1) is full attention "
               "and (w, 0) with causal=True a sliding window of w tokens back", _FA2_SRC),
    "cu-seqlens": ("varlen: cu_seqlens_q / cu_seqlens_k int32, contiguous, 1-D of batch + 1 entries from 0; "
                   "max_seqlen_q / max_seqlen_k host ints", _FA2_SRC),
}


class ContractError(RuntimeError, ValueError):
    """A call that the vendor's CUDA implementation would refuse (see the module docstring)."""


def _fail(rules: dict, rule: str, detail: str) -> None:
    need, source = rules[rule]
    raise ContractError(f"{detail}: {need} [{rule}; {source}]")


# --------------------------------------------------------------------------------------------
# torch._scaled_mm
# --------------------------------------------------------------------------------------------

def check_scaled_mm(mat1: Tensor, mat2: Tensor, scale_a: Tensor, scale_b: Tensor, *, bias: Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Raise ContractError where CUDA's `torch._scaled_mm(mat1, mat2, scale_a, scale_b, bias=, out_dtype=)`
    would refuse the call (SCALED_MM_RULES). mat1 (M, K) row-major, mat2 (K, N) column-major."""
    def fail(rule: str, detail: str) -> None:
        _fail(SCALED_MM_RULES, rule, f"torch._scaled_mm: {detail}")

    for name, x in (("mat1", mat1), ("mat2", mat2)):
        if not isinstance(x, Tensor) or x.ndim != 2 or x.dtype not in (E4M3, E5M2):
            fail("fp8-operands", f"{name} is {getattr(x, 'dtype', type(x).__name__)} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
    if mat1.dtype == E5M2 and mat2.dtype == E5M2:
        fail("no-e5m2-pair", "mat1 and mat2 are both float8_e5m2")
    (m, k), n = mat1.shape, mat2.size(1)
    if mat1.size(1) != mat2.size(0):
        fail("fp8-operands", f"mat1 {tuple(mat1.shape)} and mat2 {tuple(mat2.shape)} do not chain")
    if mat1.stride(1) != 1 and k > 1:
        fail("layout", f"mat1 {tuple(mat1.shape)} has strides {mat1.stride()}, not row-major")
    if mat2.stride(0) != 1 and k > 1:
        fail("layout", f"mat2 {tuple(mat2.shape)} has strides {mat2.stride()}, not column-major")
    if k % 16 or n % 16:
        fail("multiple-of-16", f"K = {k}, N = {n} (mat1 {tuple(mat1.shape)}, mat2 {tuple(mat2.shape)})")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if not isinstance(s, Tensor) or s.dtype != torch.float32:
            fail("scales", f"{name} is {getattr(s, 'dtype', type(s).__name__)}")
    # torch's order (get_joint_scaling): tensor-wise when both hold one element, else row-wise shapes.
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        rowwise = False
    elif tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n):
        rowwise = True
    else:
        fail("scales", f"scale_a {tuple(scale_a.shape)}, scale_b {tuple(scale_b.shape)} for M = {m}, N = {n}")
    if rowwise and out_dtype != torch.bfloat16:
        fail("rowwise-out-bf16", f"row-wise scales with out_dtype={out_dtype}")
    if rowwise and mat2.dtype != E4M3:
        fail("rowwise-mat2-e4m3", f"row-wise scales with mat2 in {mat2.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.ndim != 1 or bias.numel() != n:
            fail("bias", f"bias of shape {tuple(getattr(bias, 'shape', ()))} for N = {n}")
        if out_dtype == torch.float32:
            fail("bias", "a bias with out_dtype=torch.float32")
        if bias.dtype != out_dtype:
            fail("bias", f"a {bias.dtype} bias with out_dtype={out_dtype}")


def scaled_mm(mat1: Tensor, mat2: Tensor, scale_a: Tensor, scale_b: Tensor, *, bias: Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = False) -> Tensor:
    """`torch._scaled_mm(mat1, mat2, scale_a, scale_b, bias=, out_dtype=, use_fast_accum=)` on any device,
    after `check_scaled_mm`. mat1: (M, K) fp8 row-major; mat2: (K, N) fp8 column-major; scales fp32
    tensor-wise (one element) or row-wise ((M, 1) and (1, N)). Returns (M, N) in out_dtype."""
    check_scaled_mm(mat1, mat2, scale_a, scale_b, bias=bias, out_dtype=out_dtype)
    if scale_a.numel() == 1 and scale_b.numel() == 1:  # tensor-wise: torch takes 0-d scales on every build
        scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
    elif mat1.device.type == "cpu" and not _cpu_scaled_mm_takes_rowwise():
        return _rowwise_scaled_mm_cpu(mat1, mat2, scale_a, scale_b, bias, out_dtype)
    return torch._scaled_mm(mat1, mat2, scale_a, scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


# Compatibility with torch 2.11 (kept while setup.py allows torch>=2.11): its CPU `_scaled_mm`
# takes tensor-wise scales only (an internal assert, "Now _scaled_mm only supports per-tensor
# scaling for CPU backend"); torch 2.13's CPU kernel takes row-wise scales too, and CUDA builds of
# both do (cuBLASLt). Probed once, not decided by version number; CUDA tensors never get here.
@torch.compiler.assume_constant_result  # a trace-time constant under torch.compile
def _cpu_scaled_mm_takes_rowwise() -> bool:
    return _probe_cpu_scaled_mm_rowwise()


@functools.cache
def _probe_cpu_scaled_mm_rowwise() -> bool:
    a = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _rowwise_scaled_mm_cpu(mat1: Tensor, mat2: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Tensor | None,
                           out_dtype: torch.dtype) -> Tensor:
    """Row-wise `_scaled_mm` where the CPU kernel has only tensor-wise scales, computed as torch's
    CPU kernel computes tensor-wise (and torch 2.13's row-wise): the operands dequantised to fp32
    with their scales (scale_a (M, 1) per row of mat1, scale_b (1, N) per column of mat2), one fp32
    matmul, the bias added in fp32, one rounding to out_dtype."""
    out = (mat1.float() * scale_a) @ (mat2.float() * scale_b)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# flash-attn
# --------------------------------------------------------------------------------------------

def left_window(window: object, name: str = "window") -> int | None:
    """flash-attn's left window rule, for every attention path (flash-attn, SDPA, the paged kernels):
    an int >= -1; -1 means unlimited and is returned as None, w >= 0 as w (query i sees keys
    i - w .. i). Anything else raises (TypeError for a non-int, ContractError below -1)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"{name} must be an int >= -1 (-1: unlimited, as flash-attn's window_size), "
                        f"got {type(window).__name__}")
    if window < -1:
        _fail(FLASH_ATTN_RULES, "window", f"{name}={window}")
    return None if window == -1 else int(window)


def _check_heads(q: Tensor, k: Tensor, v: Tensor, window_size: object) -> None:
    def fail(rule: str, detail: str) -> None:
        _fail(FLASH_ATTN_RULES, rule, f"flash_attn: {detail}")

    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        fail("dtype", f"q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if tuple(k.shape) != tuple(v.shape) or k.size(-1) != q.size(-1):
        fail("layout", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        fail("layout", f"last-dim strides q {q.stride(-1)}, k {k.stride(-1)}, v {v.stride(-1)}")
    d = q.size(-1)
    if d > 256 or d % 8:
        fail("head-dim", f"head dim {d}")
    if q.size(-2) % k.size(-2):
        fail("gqa", f"{q.size(-2)} query heads, {k.size(-2)} key/value heads")
    if (not isinstance(window_size, tuple) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window_size)):
        fail("window", f"window_size={window_size!r}")


def check_flash_attn(q: Tensor, k: Tensor, v: Tensor, *, window_size: tuple[int, int] = (-1, -1)) -> None:
    """Raise ContractError where flash_attn_func(q, k, v, window_size=) would refuse the call
    (FLASH_ATTN_RULES): q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.size(0) != q.size(0):
        _fail(FLASH_ATTN_RULES, "layout", f"flash_attn_func: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                          f"v {tuple(v.shape)}")
    _check_heads(q, k, v, window_size)


def check_flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, window_size: tuple[int, int] = (-1, -1)) -> None:
    """Raise ContractError where flash_attn_varlen_func would refuse the call: q (total_q, Hq, D),
    k and v (total_k, Hkv, D), cu_seqlens (batch + 1,) int32 from 0, host int max lengths."""
    def fail(rule: str, detail: str) -> None:
        _fail(FLASH_ATTN_RULES, rule, f"flash_attn_varlen_func: {detail}")

    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        fail("layout", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_heads(q, k, v, window_size)
    for name, cu, rows in (("cu_seqlens_q", cu_seqlens_q, q.size(0)), ("cu_seqlens_k", cu_seqlens_k, k.size(0))):
        if (not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.ndim != 1 or not cu.is_contiguous()
                or cu.numel() != cu_seqlens_q.numel() or cu.numel() < 2):
            fail("cu-seqlens", f"{name} is {getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            fail("cu-seqlens", f"{name} on {cu.device}, q on {q.device}")
        if not cu.is_cuda and (int(cu[0]) != 0 or int(cu[-1]) != rows):  # on a GPU, reading it back would sync
            fail("cu-seqlens", f"{name} runs {int(cu[0])} .. {int(cu[-1])}, the tensor has {rows} rows")
    for name, mx in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(mx, bool) or not isinstance(mx, numbers.Integral):
            fail("cu-seqlens", f"{name} is {type(mx).__name__}")


# Where a prebuilt FA3 comes from without a source build: the Hugging Face kernel hub, through its
# `kernels` client package (the build nanochat loads on Hopper). Fetched on first use; offline, or
# without the package, attention falls back to FA2 or SDPA and `attention_backend` says which.
HUB_FA3 = "varunneal/flash-attention-3"
_FA: dict = {}  # "fa3" / "fa2" -> module or None, and "why" -> reason, resolved once per process


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # an ImportError, or a wheel built against another torch (undefined symbol)
        return None


def _hub_client():
    """The kernel hub's client package `kernels`, or None. From a nanofast checkout's root the import
    finds nanofast's own kernels/ folder first, which hands it over to the installed package
    (kernels/_shadowed.py)."""
    return _import_optional("kernels")


def load_flash_attn_3():
    """FA3: an installed `flash_attn_interface` (built from flash-attn's hopper/), else the hub's
    prebuilt one; (module or None, how it was found or why not)."""
    local = _import_optional("flash_attn_interface")
    if local is not None:
        return local, "flash_attn_interface (installed)"
    if os.environ.get("NANOFAST_HUB_FA3", "1") == "0":
        return None, "NANOFAST_HUB_FA3=0"
    hub = _hub_client()
    if hub is None:
        return None, "no flash_attn_interface, and the kernel hub client (pip install kernels) is not installed"
    try:
        return hub.get_kernel(HUB_FA3).flash_attn_interface, f"kernel hub {HUB_FA3}"
    except Exception as e:  # offline, hub unreachable, no build for this torch
        return None, f"kernel hub {HUB_FA3} not loadable ({type(e).__name__}: {str(e)[:120]})"


@torch.compiler.disable  # imports and maybe a download: never traced into a compiled graph
def _resolve() -> dict:
    if not _FA:
        fa3, why3 = load_flash_attn_3() if torch.cuda.is_available() else (None, "no CUDA")
        _FA.update(fa3=fa3, fa3_why=why3, fa2=_import_optional("flash_attn"))
    return _FA


def _resolved() -> dict:
    # Once filled (the run's first lines call attention_backend, before any compile), a traced
    # call only reads the dict.
    return _FA or _resolve()


def flash_attn_module(q: Tensor):
    """The flash-attn module q runs on, or None (then nanofast uses SDPA): FA3 on Hopper for bf16
    (the prebuilt Hopper kernels are bf16 / fp8 only), else FA2 if installed, for fp16/bf16 CUDA
    tensors. CPU tensors and fp32 never take flash-attn. Resolved once per process."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    fa = _resolved()
    if fa["fa3"] is not None and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] == 9:
        return fa["fa3"]
    return fa["fa2"]


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """What dense and varlen attention run on for tensors of `dtype` on `device`, in words: "FA3
    (...)", "FA2 (flash_attn)" or "SDPA (...why)". For the report card and the run's first lines."""
    device = torch.device(device)
    if device.type != "cuda":
        return "SDPA (CPU)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"SDPA ({dtype} is not a flash-attn dtype)"
    fa = _resolved()
    if fa["fa3"] is not None and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] == 9:
        return f"FA3 ({fa['fa3_why']})"
    if fa["fa2"] is not None:
        return "FA2 (flash_attn)"
    return f"SDPA (no FA3: {fa['fa3_why']}; no FA2: flash_attn is not installed)"


def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out  # some FA3 versions return (out, lse)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, window_size: tuple[int, int],
                    module=None) -> Tensor:
    """flash-attn's dense attention after check_flash_attn; q (B, Tq, Hq, D), k, v (B, Tk, Hkv, D)
    fp16/bf16; returns (B, Tq, Hq, D). module: the flash-attn module (default flash_attn_module(q))."""
    check_flash_attn(q, k, v, window_size=window_size)
    fa = flash_attn_module(q) if module is None else module
    return _unwrap(fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size))


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool, window_size: tuple[int, int],
                           module=None) -> Tensor:
    """flash-attn's varlen attention after check_flash_attn_varlen; q (total_q, Hq, D), k, v
    (total_k, Hkv, D) packed by cu_seqlens; returns (total_q, Hq, D)."""
    check_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            window_size=window_size)
    fa = flash_attn_module(q) if module is None else module
    return _unwrap(fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             causal=causal, window_size=window_size))
