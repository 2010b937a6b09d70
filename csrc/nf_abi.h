// nf_abi.h: the launch ABI of the csrc kernels, written down once.
//
// Every launch function takes a pointer to its argument struct and a stream (a cudaStream_t, null in
// the CPU emulation) and returns 0 or an error code (nf_*_error_string explains it). The .cu files
// define them, bindings.cpp exports their addresses, and kernels/cuda_abi.py mirrors the structs
// with ctypes (the tests compare the two: field names, types, order and offsets). A struct instead
// of loose arguments keeps each prototype in one place and lets Python fill fields by name.
//
// Plain C types only, so bindings.cpp (no CUDA headers) and the g++ emulation build include it too.
// Sizes and strides are int64 element counts; dtype codes are nf::DType (common.cuh); a pointer
// documented "or null" is optional.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// RMSNorm forward: x, residual (N, D) rows at the given strides, last dim contiguous; y, h outputs at
// theirs (h = x + residual, only with a residual); rstd (N,) fp32. x, residual, y, h share dtype.
typedef struct nf_rms_norm_fwd_args {
    int dtype;
    int64_t N;
    int64_t D;
    const void* x;
    int64_t x_stride;
    const void* residual;  // or null
    int64_t residual_stride;
    const void* weight;  // (D,) of weight_dtype, or null
    int weight_dtype;
    void* y;
    int64_t y_stride;
    void* h;  // required with a residual
    int64_t h_stride;
    float* rstd;
    float eps;
} nf_rms_norm_fwd_args;

// RMSNorm backward: dy, h, dh (N, D) of dtype at their row strides (dh: the gradient arriving at the
// returned residual stream, or null); rstd (N,) fp32; dx (N, D) at dx_stride. With a weight,
// dw_partial is fp32 (num_partials, D) scratch and dw (D,) of weight_dtype receives the
// deterministic sum; num_partials (1..N) is also the number of persistent blocks.
typedef struct nf_rms_norm_bwd_args {
    int dtype;
    int64_t N;
    int64_t D;
    const void* dy;
    int64_t dy_stride;
    const void* h;
    int64_t h_stride;
    const float* rstd;
    const void* weight;  // or null
    int weight_dtype;
    const void* dh;  // or null
    int64_t dh_stride;
    void* dx;
    int64_t dx_stride;
    float* dw_partial;
    int64_t num_partials;
    void* dw;
} nf_rms_norm_bwd_args;

// QK-norm + rotary. The kernels treat the q and k heads of all tokens as one flat list of items,
// operand 0 (q) then operand 1 (k), so every per-operand field is a pair [q, k].
//
// Forward: x[i] (B, T, H[i], D) of dtype at element strides x_s[i] = (batch, time, head), last dim
// contiguous; out[i] at out_s[i] (it may be x[i]: in place); rstd[i] (B, T, H[i]) contiguous fp32,
// or null. cos/sin: rows of D/2 of cs_dtype at the given row strides; the row of a token is
// positions[b * T + t] if positions is non-null, else t. weight[i] (D,) of w_dtype[i], or null.
typedef struct nf_qk_norm_rope_fwd_args {
    const void* x[2];
    int64_t x_s[2][3];
    void* out[2];
    int64_t out_s[2][3];
    float* rstd[2];
    const void* weight[2];
    int w_dtype[2];
    int64_t B, T, H[2], D;
    const void* cos;
    const void* sin;
    int64_t cos_stride, sin_stride;
    int cs_dtype;
    const int64_t* positions;
    float scale, eps;
    int interleaved;  // pairs (2i, 2i+1) instead of (i, i + D/2)
    int dtype;
} nf_qk_norm_rope_fwd_args;

// Backward (positions = t): gradients dout[i], inputs x[i] and outputs dx[i] at their own strides;
// rstd[i] (B, T, H[i]) contiguous fp32 from the forward. num_blocks persistent blocks of 4 warps;
// with weight[i], dw_partial[i] is fp32 (num_blocks * 4, D) scratch and dw[i] (D,) of w_dtype[i]
// receives the fixed-order sum.
typedef struct nf_qk_norm_rope_bwd_args {
    const void* dout[2];
    int64_t dout_s[2][3];
    const void* x[2];
    int64_t x_s[2][3];
    void* dx[2];
    int64_t dx_s[2][3];
    const float* rstd[2];
    const void* weight[2];
    int w_dtype[2];
    float* dw_partial[2];
    int64_t B, T, H[2], D;
    const void* cos;
    const void* sin;
    int64_t cos_stride, sin_stride;
    int cs_dtype;
    float scale;
    int interleaved;
    void* dw[2];
    int64_t num_blocks;
    int dtype;
} nf_qk_norm_rope_bwd_args;

// Paged decode attention: q (B, Hq, D) at strides (q_sb, q_sh); k, v caches (num_pages, page_size,
// Hkv, D) at strides (sp, ss, sh), last dims contiguous, all of dtype. block_table int32 at
// (bt_sb, bt_sp); seq_lens int32 (B,) at sl_s, each in [1, max_pages * page_size], with the entries
// of every page read in [0, num_pages) (the caller checks that where it can; otherwise lengths are
// clamped and keys in out-of-pool pages dropped, so bad values never fault). window < 0: none.
// The split plan: num_units U >= B work units; sequence b owns units seq_start[b] ..
// seq_start[b+1] - 1 (at least one), unit u is split unit_idx[u] of sequence unit_seq[u] (all int32,
// built by the caller, trusted). A sequence of one unit is written to out (B, Hq, D) of dtype at
// (o_sb, o_sh) directly; a sequence of n > 1 units writes part_o (U, Hq, D) and part_lse (U, Hq)
// fp32 contiguous scratch (needed iff U > B), then the merge writes its out rows.
// heads_per_warp (1, 2 or 4) and warps (1..8) lay the Hq / Hkv query heads of a KV head out over
// a block: the caller chooses them (kernels/cuda_ops.py, which also sizes the grid from them).
typedef struct nf_paged_attention_fwd_args {
    int dtype;
    int64_t B;
    int64_t Hq;
    int64_t Hkv;
    int64_t D;
    const void* q;
    int64_t q_sb, q_sh;
    const void* k;
    int64_t k_sp, k_ss, k_sh;
    const void* v;
    int64_t v_sp, v_ss, v_sh;
    int64_t num_pages;
    int64_t page_size;
    const int* block_table;
    int64_t bt_sb, bt_sp;
    int64_t max_pages;
    const int* seq_lens;
    int64_t sl_s;
    int64_t window;
    float scale;
    int64_t num_units;
    const int* seq_start;
    const int* unit_seq;
    const int* unit_idx;
    float* part_o;  // or null with one split
    float* part_lse;  // or null with one split
    void* out;
    int64_t o_sb, o_sh;
    int heads_per_warp;
    int warps;
} nf_paged_attention_fwd_args;

// Paged KV-cache write: k, v (N, Hkv, D) at strides (sn, sh); caches kc, vc (num_pages, page_size,
// Hkv, D) at (sp, ss, sh), last dims contiguous, all of dtype. slots (N,) contiguous int32
// (slots64 = 0) or int64: slot = page * page_size + offset; negative slots and slots
// >= num_pages * page_size are skipped (the caller reports the latter where it can check without a
// sync). Tokens mapping to the same slot race: the caller must not pass duplicates.
typedef struct nf_paged_kv_write_args {
    int dtype;
    int64_t N;
    int64_t Hkv;
    int64_t D;
    const void* k;
    int64_t k_sn, k_sh;
    const void* v;
    int64_t v_sn, v_sh;
    void* kc;
    int64_t kc_sp, kc_ss, kc_sh;
    void* vc;
    int64_t vc_sp, vc_ss, vc_sh;
    int64_t num_pages;
    int64_t page_size;
    const void* slots;
    int slots64;
} nf_paged_kv_write_args;

int nf_rms_norm_fwd(const nf_rms_norm_fwd_args* args, void* stream);
int nf_rms_norm_bwd(const nf_rms_norm_bwd_args* args, void* stream);
const char* nf_rms_norm_error_string(int code);
int nf_qk_norm_rope_fwd(const nf_qk_norm_rope_fwd_args* args, void* stream);
int nf_qk_norm_rope_bwd(const nf_qk_norm_rope_bwd_args* args, void* stream);
const char* nf_qk_norm_rope_error_string(int code);
int nf_paged_attention_fwd(const nf_paged_attention_fwd_args* args, void* stream);
int nf_paged_kv_write(const nf_paged_kv_write_args* args, void* stream);
const char* nf_paged_attention_error_string(int code);

#ifdef __cplusplus
}
#endif
