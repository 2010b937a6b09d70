// Python entry point of the real CUDA build (nanofast._C, or the JIT build in kernels/cuda_build.py).
//
// It only hands out the addresses of the extern "C" launch functions declared in nf_abi.h and
// defined in csrc/*.cu; kernels/cuda_build.py calls them through ctypes with exactly the argument
// structs it passes to the CPU emulation build of the same sources, so both builds share one
// calling path and this file needs no torch or CUDA headers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "nf_abi.h"

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
