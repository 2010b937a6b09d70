// common.cuh: device helpers shared by the csrc kernels, valid under nvcc and under cuda_emu.h.
//
// Everything here computes in fp32: 16-bit inputs are widened on load and rounded once on store,
// because fp16/bf16 accumulation of D terms loses log2(D) bits and a norm's statistics are exactly
// such a sum.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#include "cuda_emu.h"
#endif

namespace nf {

// dtype codes of the extern "C" launch ABI (nf_abi.h; kernels/cuda_abi.py DTYPE_CODES mirrors them).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The dtypes every kernel takes, and their element sizes.
inline bool valid_dtype(int d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }

inline int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Launch-function return codes besides the CUDA / emulator error codes.
constexpr int kInvalidArgument = -1;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements moved as one aligned access: 16 bytes lets the hardware issue a single
// LDG.E.128 / STG.E.128 per thread instead of N narrow ones. The caller guarantees alignment.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// N consecutive elements of a small side operand (weight, cos/sin table) whose dtype is only known
// at run time. The switch is uniform across the block, so it costs a branch, not divergence, and
// these operands are re-read by every row, so they are served from L1/L2.
template <int N>
__device__ __forceinline__ void load_any(const void* p, int dtype, int64_t i, float (&out)[N]) {
    switch (dtype) {
        case kFloat16: {
            const __half* q = static_cast<const __half*>(p) + i;
#pragma unroll
            for (int j = 0; j < N; ++j) out[j] = __half2float(q[j]);
            break;
        }
        case kBFloat16: {
            const __nv_bfloat16* q = static_cast<const __nv_bfloat16*>(p) + i;
#pragma unroll
            for (int j = 0; j < N; ++j) out[j] = __bfloat162float(q[j]);
            break;
        }
        default: {
            const float* q = static_cast<const float*>(p) + i;
#pragma unroll
            for (int j = 0; j < N; ++j) out[j] = q[j];
        }
    }
}

__device__ __forceinline__ float load_any1(const void* p, int dtype, int64_t i) {
    float v[1];
    load_any<1>(p, dtype, i, v);
    return v[0];
}

__device__ __forceinline__ void store_any1(void* p, int dtype, int64_t i, float v) {
    switch (dtype) {
        case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
        case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
        default: static_cast<float*>(p)[i] = v;
    }
}

// Butterfly sum over the 32 lanes: every lane ends with the total, and with the *same* bits, since
// at each step lanes l and l^m add the same two values (fp addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

// Block-wide sum returned to every thread; `scratch` is >= 32 floats of shared memory and blockDim.x
// a multiple of 32. Each thread adds the per-warp partials itself in warp order: a handful of
// broadcast shared-memory reads, cheaper than a second shuffle round plus a barrier, and the fixed
// order keeps the result deterministic and identical in every thread.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];
    __syncthreads();  // the next reduction may overwrite scratch only after everyone has read it
    return total;
}

// Deterministic weight-gradient finish: out[col] = sum over rows of partial (rows, cols) fp32,
// added in row order by one thread per column (consecutive threads, consecutive columns: coalesced).
// A template so that every translation unit may carry its own copy without a duplicate symbol.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
column_sum_kernel(const float* __restrict__ partial, int64_t rows, int64_t cols, void* out, int out_dtype) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (col >= cols) return;
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += partial[r * cols + col];
    store_any1(out, out_dtype, col, s);
}

inline bool aligned_to(const void* p, int bytes) {
    return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes)) == 0;
}

// A vector path loads packs of `elems` elements (`bytes` bytes) at every row start: every base
// pointer must be `bytes`-aligned (null ones, absent operands, pass) and every stride, in
// elements, a multiple of `elems`.
inline bool rows_aligned(const void* const* ptrs, int nptrs, int bytes, const int64_t* strides, int nstrides,
                         int64_t elems) {
    for (int i = 0; i < nptrs; ++i)
        if (!aligned_to(ptrs[i], bytes)) return false;
    for (int i = 0; i < nstrides; ++i)
        if (strides[i] % elems != 0) return false;
    return true;
}

// Launch through a kernel pointer: <<<>>> under nvcc (returning the launch error, which catches
// bad configurations; faults inside the kernel surface at the next synchronisation), CPU threads
// under the emulation.
template <typename... KArgs, typename... Args>
inline int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, void* stream, Args... args) {
#if defined(__CUDACC__)
    kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(args...);
    return static_cast<int>(cudaGetLastError());
#else
    (void)stream;
    return emu::launch(kernel, grid, block, args...);
#endif
}

inline const char* error_string(int code) {
    if (code == 0) return "no error";
    if (code == kInvalidArgument) return "invalid argument to a launch function (sizes, dtype code or pointers)";
#if defined(__CUDACC__)
    return cudaGetErrorString(static_cast<cudaError_t>(code));
#else
    return emu::last_error();
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace nf
