// Python entry point of the real CUDA build (nanofast._C, or the JIT build in kernels/cuda_ops.py).
//
// It only hands out the addresses of the extern "C" launch functions defined in csrc/*.cu;
// kernels/cuda_ops.py calls them through ctypes with exactly the arguments it passes to the CPU
// emulation build of the same sources, so both builds share one calling path and this file needs
// no torch headers. The prototypes below must match the definitions (the tests compare them).
#include <pybind11/pybind11.h>

#include <cstdint>

// BEGIN launch prototypes
extern "C" {
int nf_rms_norm_fwd(int dtype, int64_t N, int64_t D, const void* x, int64_t x_stride, const void* residual,
                    int64_t residual_stride, const void* weight, int weight_dtype, void* y, int64_t y_stride,
                    void* h, int64_t h_stride, float* rstd, float eps, void* stream);
int nf_rms_norm_bwd(int dtype, int64_t N, int64_t D, const void* dy, int64_t dy_stride, const void* h,
                    int64_t h_stride, const float* rstd, const void* weight, int weight_dtype, const void* dh,
                    int64_t dh_stride, void* dx, int64_t dx_stride, float* dw_partial, int64_t num_partials, void* dw,
                    void* stream);
const char* nf_rms_norm_error_string(int code);
int nf_qk_norm_rope_fwd(int dtype, int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D, const void* q,
                        int64_t q_sb, int64_t q_st, int64_t q_sh, const void* k, int64_t k_sb, int64_t k_st,
                        int64_t k_sh, void* q_out, int64_t qo_sb, int64_t qo_st, int64_t qo_sh, void* k_out,
                        int64_t ko_sb, int64_t ko_st, int64_t ko_sh, float* q_rstd, float* k_rstd, const void* cos,
                        int64_t cos_stride, const void* sin, int64_t sin_stride, int cs_dtype,
                        const int64_t* positions, const void* q_weight, int qw_dtype, const void* k_weight,
                        int kw_dtype, float scale, float eps, int interleaved, void* stream);
int nf_qk_norm_rope_bwd(int dtype, int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D, const void* dq_out,
                        int64_t gq_sb, int64_t gq_st, int64_t gq_sh, const void* dk_out, int64_t gk_sb, int64_t gk_st,
                        int64_t gk_sh, const void* q, int64_t q_sb, int64_t q_st, int64_t q_sh, const void* k,
                        int64_t k_sb, int64_t k_st, int64_t k_sh, void* dq, int64_t dq_sb, int64_t dq_st,
                        int64_t dq_sh, void* dk, int64_t dk_sb, int64_t dk_st, int64_t dk_sh, const float* q_rstd,
                        const float* k_rstd, const void* cos, int64_t cos_stride, const void* sin,
                        int64_t sin_stride, int cs_dtype, const void* q_weight, int qw_dtype, const void* k_weight,
                        int kw_dtype, float* dqw_partial, float* dkw_partial, int64_t num_blocks, void* dq_weight,
                        void* dk_weight, float scale, int interleaved, void* stream);
const char* nf_qk_norm_rope_error_string(int code);
int nf_paged_attention_fwd(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const void* q, int64_t q_sb,
                           int64_t q_sh, const void* k_cache, int64_t k_sp, int64_t k_ss, int64_t k_sh,
                           const void* v_cache, int64_t v_sp, int64_t v_ss, int64_t v_sh, int64_t num_pages,
                           int64_t page_size, const int* block_table, int64_t bt_sb, int64_t bt_sp, int64_t max_pages,
                           const int* seq_lens, int64_t sl_s, int64_t window, float scale, int64_t num_splits,
                           float* partial_out, float* partial_lse, void* out, int64_t o_sb, int64_t o_sh,
                           void* stream);
int nf_paged_kv_write(int dtype, int64_t N, int64_t Hkv, int64_t D, const void* k, int64_t k_sn, int64_t k_sh,
                      const void* v, int64_t v_sn, int64_t v_sh, void* k_cache, int64_t kc_sp, int64_t kc_ss,
                      int64_t kc_sh, void* v_cache, int64_t vc_sp, int64_t vc_ss, int64_t vc_sh, int64_t num_pages,
                      int64_t page_size, const void* slot_mapping, int slot_is_int64, void* stream);
const char* nf_paged_attention_error_string(int code);
}
// END launch prototypes

#define NF_SYMBOL(d, fn) d[#fn] = reinterpret_cast<std::uintptr_t>(&fn)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "nanofast CUDA kernels: addresses of the extern \"C\" launch functions (called via ctypes)";
    m.def("symbols", [] {
        pybind11::dict d;
        NF_SYMBOL(d, nf_rms_norm_fwd);
        NF_SYMBOL(d, nf_rms_norm_bwd);
        NF_SYMBOL(d, nf_rms_norm_error_string);
        NF_SYMBOL(d, nf_qk_norm_rope_fwd);
        NF_SYMBOL(d, nf_qk_norm_rope_bwd);
        NF_SYMBOL(d, nf_qk_norm_rope_error_string);
        NF_SYMBOL(d, nf_paged_attention_fwd);
        NF_SYMBOL(d, nf_paged_kv_write);
        NF_SYMBOL(d, nf_paged_attention_error_string);
        return d;
    });
}
