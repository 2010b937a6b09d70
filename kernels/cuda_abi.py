"""The ctypes mirror of csrc/nf_abi.h: one Structure per launch function's argument struct.

Field names, order and C types are those of the header (tests/test_cuda_kernels.py parses the
header and compiles static_asserts of these offsets and sizes, so a drift on either side fails).
Every pointer is a c_void_p (a data_ptr() int, or None for null); sizes and strides are int64
element counts; array fields take tuples.
"""
from __future__ import annotations

import ctypes

import torch

__all__ = ["DTYPE_CODES", "ABI", "ERROR_FN", "RmsNormFwdArgs", "RmsNormBwdArgs", "QkNormRopeFwdArgs",
           "QkNormRopeBwdArgs", "PagedAttentionArgs", "PagedKvWriteArgs"]

# dtype codes of the launch ABI (csrc/common.cuh, enum nf::DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_S3 = _I64 * 3  # (batch, time, head) element strides of a (B, T, H, D) operand


class RmsNormFwdArgs(ctypes.Structure):
    """nf_rms_norm_fwd_args."""
    _fields_ = [("dtype", _I32), ("N", _I64), ("D", _I64), ("x", _P), ("x_stride", _I64), ("residual", _P),
                ("residual_stride", _I64), ("weight", _P), ("weight_dtype", _I32), ("y", _P), ("y_stride", _I64),
                ("h", _P), ("h_stride", _I64), ("rstd", _P), ("eps", _F32)]


class RmsNormBwdArgs(ctypes.Structure):
    """nf_rms_norm_bwd_args."""
    _fields_ = [("dtype", _I32), ("N", _I64), ("D", _I64), ("dy", _P), ("dy_stride", _I64), ("h", _P),
                ("h_stride", _I64), ("rstd", _P), ("weight", _P), ("weight_dtype", _I32), ("dh", _P),
                ("dh_stride", _I64), ("dx", _P), ("dx_stride", _I64), ("dw_partial", _P), ("num_partials", _I64),
                ("dw", _P)]


class QkNormRopeFwdArgs(ctypes.Structure):
    """nf_qk_norm_rope_fwd_args: per-operand fields are pairs (q, k)."""
    _fields_ = [("x", _P * 2), ("x_s", _S3 * 2), ("out", _P * 2), ("out_s", _S3 * 2), ("rstd", _P * 2),
                ("weight", _P * 2), ("w_dtype", _I32 * 2), ("B", _I64), ("T", _I64), ("H", _I64 * 2), ("D", _I64),
                ("cos", _P), ("sin", _P), ("cos_stride", _I64), ("sin_stride", _I64), ("cs_dtype", _I32),
                ("positions", _P), ("scale", _F32), ("eps", _F32), ("interleaved", _I32), ("dtype", _I32)]


class QkNormRopeBwdArgs(ctypes.Structure):
    """nf_qk_norm_rope_bwd_args: per-operand fields are pairs (q, k)."""
    _fields_ = [("dout", _P * 2), ("dout_s", _S3 * 2), ("x", _P * 2), ("x_s", _S3 * 2), ("dx", _P * 2),
                ("dx_s", _S3 * 2), ("rstd", _P * 2), ("weight", _P * 2), ("w_dtype", _I32 * 2),
                ("dw_partial", _P * 2), ("B", _I64), ("T", _I64), ("H", _I64 * 2), ("D", _I64), ("cos", _P),
                ("sin", _P), ("cos_stride", _I64), ("sin_stride", _I64), ("cs_dtype", _I32), ("scale", _F32),
                ("interleaved", _I32), ("dw", _P * 2), ("num_blocks", _I64), ("dtype", _I32)]


class PagedAttentionArgs(ctypes.Structure):
    """nf_paged_attention_fwd_args."""
    _fields_ = [("dtype", _I32), ("B", _I64), ("Hq", _I64), ("Hkv", _I64), ("D", _I64), ("q", _P), ("q_sb", _I64),
                ("q_sh", _I64), ("k", _P), ("k_sp", _I64), ("k_ss", _I64), ("k_sh", _I64), ("v", _P), ("v_sp", _I64),
                ("v_ss", _I64), ("v_sh", _I64), ("num_pages", _I64), ("page_size", _I64), ("block_table", _P),
                ("bt_sb", _I64), ("bt_sp", _I64), ("max_pages", _I64), ("seq_lens", _P), ("sl_s", _I64),
                ("window", _I64), ("scale", _F32), ("num_units", _I64), ("seq_start", _P),
                ("unit_seq", _P), ("unit_idx", _P), ("part_o", _P), ("part_lse", _P), ("out", _P),
                ("o_sb", _I64), ("o_sh", _I64), ("heads_per_warp", _I32), ("warps", _I32)]


class PagedKvWriteArgs(ctypes.Structure):
    """nf_paged_kv_write_args."""
    _fields_ = [("dtype", _I32), ("N", _I64), ("Hkv", _I64), ("D", _I64), ("k", _P), ("k_sn", _I64), ("k_sh", _I64),
                ("v", _P), ("v_sn", _I64), ("v_sh", _I64), ("kc", _P), ("kc_sp", _I64), ("kc_ss", _I64),
                ("kc_sh", _I64), ("vc", _P), ("vc_sp", _I64), ("vc_ss", _I64), ("vc_sh", _I64), ("num_pages", _I64),
                ("page_size", _I64), ("slots", _P), ("slots64", _I32)]


# launch function -> (source file, argument struct): each is called as fn(&args, stream) -> int.
ABI: dict[str, tuple[str, type[ctypes.Structure]]] = {
    "nf_rms_norm_fwd": ("rms_norm.cu", RmsNormFwdArgs),
    "nf_rms_norm_bwd": ("rms_norm.cu", RmsNormBwdArgs),
    "nf_qk_norm_rope_fwd": ("qk_norm_rope.cu", QkNormRopeFwdArgs),
    "nf_qk_norm_rope_bwd": ("qk_norm_rope.cu", QkNormRopeBwdArgs),
    "nf_paged_attention_fwd": ("paged_attention.cu", PagedAttentionArgs),
    "nf_paged_kv_write": ("paged_attention.cu", PagedKvWriteArgs),
}
# source file -> its error-string function (const char* f(int code)).
ERROR_FN = {"rms_norm.cu": "nf_rms_norm_error_string", "qk_norm_rope.cu": "nf_qk_norm_rope_error_string",
            "paged_attention.cu": "nf_paged_attention_error_string"}
