// RMSNorm forward / backward with an optional fused residual add.
//
//   h    = x + residual                    (rounded to x's dtype: it is the residual stream the
//                                            caller keeps, and the backward sees exactly this h)
//   rstd = 1 / sqrt(mean(h^2) + eps)       fp32, one per row
//   y    = (h * rstd) * weight             rounded to x's dtype
//   dx   = rstd * (g - hhat * mean(g * hhat)) + dh,   g = dy * weight, hhat = h * rstd
//   dw   = sum over rows of dy * hhat      fp32 per-block partials, then a fixed-order column sum
//
// Forward: one block per row. A row is at most a few KB, so it is loaded once into registers (up
// to kMaxItems VEC-wide chunks per thread), reduced with a warp-shuffle + shared-memory block sum,
// and written from registers: one read and one write of HBM per element. Rows too wide for that
// take a streaming path that re-reads the row (mostly L2 hits) instead of spilling registers.
//
// Backward: a persistent grid of `num_partials` blocks, each striding over rows. Every thread owns
// the same columns in every row, so its dw contribution accumulates in registers and lands in the
// block's own row of the partial buffer: no atomics, hence bit-reproducible run to run.
#include <initializer_list>
#include <utility>

#include "common.cuh"
#include "nf_abi.h"

namespace {

using nf::load_pack;
using nf::store_pack;

constexpr int kMaxThreads = 256;
constexpr int kMaxItems = 2;  // VEC-wide chunks per thread kept in registers (bwd keeps 3 floats each)

// Loads chunk [col, col + VEC) of h = x (+ residual), storing the rounded h when a residual is fused.
template <typename T, int VEC>
__device__ __forceinline__ void load_h(const T* __restrict__ xr, const T* __restrict__ rr, T* __restrict__ hr,
                                       int64_t col, float (&v)[VEC]) {
    load_pack<T, VEC>(xr + col, v);
    if (rr != nullptr) {
        float r[VEC];
        load_pack<T, VEC>(rr + col, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = nf::to_float(nf::from_float<T>(v[j] + r[j]));  // h as stored
        store_pack<T, VEC>(hr + col, v);
    }
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual, int64_t res_stride,
                    const void* __restrict__ weight, int w_dtype, T* __restrict__ y, int64_t y_stride,
                    T* __restrict__ h, int64_t h_stride, float* __restrict__ rstd, int64_t D, float inv_d, float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const T* xr = x + row * x_stride;
    const T* rr = residual != nullptr ? residual + row * res_stride : nullptr;
    T* hr = residual != nullptr ? h + row * h_stride : nullptr;
    T* yr = y + row * y_stride;
    // Chunk k of thread tid starts at element (tid + k * nt) * VEC: neighbouring threads touch
    // neighbouring chunks, so every warp-wide access is one contiguous, fully used segment.
    constexpr int kCache = ITEMS > 0 ? ITEMS : 1;
    float hv[kCache][VEC];
    float ss = 0.f;
    if constexpr (ITEMS > 0) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int64_t col = static_cast<int64_t>(tid + k * nt) * VEC;
            if (col < D) {
                load_h<T, VEC>(xr, rr, hr, col, hv[k]);
#pragma unroll
                for (int j = 0; j < VEC; ++j) ss += hv[k][j] * hv[k][j];
            }
        }
    } else {
        for (int64_t col = static_cast<int64_t>(tid) * VEC; col < D; col += static_cast<int64_t>(nt) * VEC) {
            load_h<T, VEC>(xr, rr, hr, col, hv[0]);
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss += hv[0][j] * hv[0][j];
        }
    }
    const float r = rsqrtf(nf::block_sum(ss, scratch) * inv_d + eps);
    if (tid == 0) rstd[row] = r;

    auto emit = [&](int64_t col, const float (&v)[VEC]) {
        float w[VEC], o[VEC];
        if (weight != nullptr) {
            nf::load_any<VEC>(weight, w_dtype, col, w);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) w[j] = 1.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = (v[j] * r) * w[j];
        store_pack<T, VEC>(yr + col, o);
    };
    if constexpr (ITEMS > 0) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
            const int64_t col = static_cast<int64_t>(tid + k * nt) * VEC;
            if (col < D) emit(col, hv[k]);
        }
    } else {
        // Same chunk-to-thread mapping as the first pass, so a thread re-reads only h it wrote itself.
        for (int64_t col = static_cast<int64_t>(tid) * VEC; col < D; col += static_cast<int64_t>(nt) * VEC) {
            load_pack<T, VEC>((hr != nullptr ? hr : xr) + col, hv[0]);
            emit(col, hv[0]);
        }
    }
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_bwd_kernel(const T* __restrict__ dy, int64_t dy_stride, const T* __restrict__ h, int64_t h_stride,
                    const float* __restrict__ rstd, const void* __restrict__ weight, int w_dtype,
                    const T* __restrict__ dh, int64_t dh_stride, T* __restrict__ dx, int64_t dx_stride,
                    float* __restrict__ dw_partial, int64_t N, int64_t D, float inv_d) {
    __shared__ float scratch[32];
    const int tid = threadIdx.x, nt = blockDim.x;
    const int64_t step = static_cast<int64_t>(nt) * VEC;
    float* dwr = dw_partial != nullptr ? dw_partial + static_cast<int64_t>(blockIdx.x) * D : nullptr;
    constexpr int kCache = ITEMS > 0 ? ITEMS : 1;
    float dw_acc[kCache][VEC];
#pragma unroll
    for (int k = 0; k < kCache; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) dw_acc[k][j] = 0.f;
    if constexpr (ITEMS == 0) {
        // Streaming path: the block's partial row is the accumulator; zero the columns this thread owns.
        if (dwr != nullptr)
            for (int64_t col = static_cast<int64_t>(tid) * VEC; col < D; col += step)
#pragma unroll
                for (int j = 0; j < VEC; ++j) dwr[col + j] = 0.f;
    }

    auto load_w = [&](int64_t col, float (&w)[VEC]) {
        if (weight != nullptr) {
            nf::load_any<VEC>(weight, w_dtype, col, w);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) w[j] = 1.f;
        }
    };
    // g = dy * w and hhat = h * rstd of one chunk; returns sum(g * hhat) over the chunk and adds
    // dy * hhat into dw (registers or the partial row).
    auto chunk_terms = [&](const T* dyr, const T* hrow, float r, int64_t col, float (&g)[VEC], float (&hh)[VEC],
                           float (&dwa)[VEC]) {
        float w[VEC], d[VEC];
        load_pack<T, VEC>(dyr + col, d);
        load_pack<T, VEC>(hrow + col, hh);
        load_w(col, w);
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            hh[j] *= r;
            g[j] = d[j] * w[j];
            dot += g[j] * hh[j];
            dwa[j] += d[j] * hh[j];
        }
        return dot;
    };
    auto emit = [&](T* dxr, const T* dhr, float r, float c, int64_t col, const float (&g)[VEC],
                    const float (&hh)[VEC]) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = r * (g[j] - hh[j] * c);
        if (dhr != nullptr) {
            float e[VEC];
            load_pack<T, VEC>(dhr + col, e);
#pragma unroll
            for (int j = 0; j < VEC; ++j) o[j] += e[j];
        }
        store_pack<T, VEC>(dxr + col, o);
    };

    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {  // uniform trip count: barriers inside are safe
        const T* dyr = dy + row * dy_stride;
        const T* hrow = h + row * h_stride;
        const T* dhr = dh != nullptr ? dh + row * dh_stride : nullptr;
        T* dxr = dx + row * dx_stride;
        const float r = rstd[row];
        float dot = 0.f;
        if constexpr (ITEMS > 0) {
            float g[kCache][VEC], hh[kCache][VEC];
#pragma unroll
            for (int k = 0; k < ITEMS; ++k) {
                const int64_t col = static_cast<int64_t>(tid + k * nt) * VEC;
                if (col < D) dot += chunk_terms(dyr, hrow, r, col, g[k], hh[k], dw_acc[k]);
            }
            const float c = nf::block_sum(dot, scratch) * inv_d;
#pragma unroll
            for (int k = 0; k < ITEMS; ++k) {
                const int64_t col = static_cast<int64_t>(tid + k * nt) * VEC;
                if (col < D) emit(dxr, dhr, r, c, col, g[k], hh[k]);
            }
        } else {
            float g[VEC], hh[VEC];
            for (int64_t col = static_cast<int64_t>(tid) * VEC; col < D; col += step) {
                float dwa[VEC];
#pragma unroll
                for (int j = 0; j < VEC; ++j) dwa[j] = 0.f;
                dot += chunk_terms(dyr, hrow, r, col, g, hh, dwa);
                if (dwr != nullptr)
#pragma unroll
                    for (int j = 0; j < VEC; ++j) dwr[col + j] += dwa[j];  // this thread's own columns
            }
            const float c = nf::block_sum(dot, scratch) * inv_d;
            for (int64_t col = static_cast<int64_t>(tid) * VEC; col < D; col += step) {
                float dwa[VEC];  // recomputed terms; the dw contribution was taken in the first pass
#pragma unroll
                for (int j = 0; j < VEC; ++j) dwa[j] = 0.f;
                chunk_terms(dyr, hrow, r, col, g, hh, dwa);
                emit(dxr, dhr, r, c, col, g, hh);
            }
        }
    }
    if constexpr (ITEMS > 0) {
        if (dwr != nullptr) {
#pragma unroll
            for (int k = 0; k < ITEMS; ++k) {
                const int64_t col = static_cast<int64_t>(tid + k * nt) * VEC;
                if (col < D) store_pack<float, VEC>(dwr + col, dw_acc[k]);
            }
        }
    }
}

// Launch shape for a row of D elements: VEC-wide chunks, at most kMaxItems per thread in registers,
// threads a multiple of 32 (whole warps for the shuffles) between 32 and kMaxThreads.
struct RowConfig {
    int items;  // 0: streaming path
    int threads;
};

RowConfig row_config(int64_t D, int vec) {
    const int64_t chunks = nf::ceil_div(D, vec);
    for (int items = 1; items <= kMaxItems; ++items) {
        if (chunks <= static_cast<int64_t>(kMaxThreads) * items) {
            const int64_t t = nf::ceil_div(nf::ceil_div(chunks, items), 32) * 32;
            return {items, static_cast<int>(t)};
        }
    }
    return {0, kMaxThreads};
}

// Compile-time int carried through a generic lambda (VEC, ITEMS are template arguments of the kernels).
template <int V> struct IntC { static constexpr int value = V; };

// Calls fn(T{}, IntC<VEC>{}, IntC<ITEMS>{}) for the run-time choice of vector width and register items.

template <typename T, typename Fn>
int dispatch_shape(bool vectorised, int items, Fn&& fn) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // 16-byte accesses
    if (vectorised) {
        switch (items) {
            case 1: return fn(T{}, IntC<kVec>{}, IntC<1>{});
            case 2: return fn(T{}, IntC<kVec>{}, IntC<2>{});
            default: return fn(T{}, IntC<kVec>{}, IntC<0>{});
        }
    }
    switch (items) {
        case 1: return fn(T{}, IntC<1>{}, IntC<1>{});
        case 2: return fn(T{}, IntC<1>{}, IntC<2>{});
        default: return fn(T{}, IntC<1>{}, IntC<0>{});
    }
}

template <typename Fn>
int dispatch_dtype(int dtype, Fn&& fn) {
    switch (dtype) {
        case nf::kFloat32: return fn(float{});
        case nf::kFloat16: return fn(__half{});
        case nf::kBFloat16: return fn(__nv_bfloat16{});
        default: return nf::kInvalidArgument;
    }
}

// The 16-byte path needs every row start 16-byte aligned: base pointers and row strides.
bool can_vectorise(int dtype, int64_t D, std::initializer_list<std::pair<const void*, int64_t>> rows) {
    const int vec = 16 / nf::elem_size(dtype);
    if (D % vec != 0) return false;
    for (const auto& [p, stride] : rows)
        if (!nf::aligned_to(p, 16) || stride % vec != 0) return false;
    return true;
}

}  // namespace

extern "C" {

int nf_rms_norm_fwd(const nf_rms_norm_fwd_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_rms_norm_fwd_args& a = *args;
    if (a.N < 1 || a.N > 0x7fffffffLL || a.D < 1 || !nf::valid_dtype(a.dtype) || a.x == nullptr || a.y == nullptr ||
        a.rstd == nullptr || (a.residual != nullptr && a.h == nullptr) ||
        (a.weight != nullptr && !nf::valid_dtype(a.weight_dtype)))
        return nf::kInvalidArgument;
    const bool vec = can_vectorise(a.dtype, a.D, {{a.x, a.x_stride}, {a.residual, a.residual_stride},
                                                   {a.y, a.y_stride}, {a.h, a.h_stride}});
    const RowConfig cfg = row_config(a.D, vec ? 16 / nf::elem_size(a.dtype) : 1);
    const float inv_d = 1.0f / static_cast<float>(a.D);  // mean = sum * (1/D): no IEEE divide in the kernel
    return dispatch_dtype(a.dtype, [&](auto t) {
        using T = decltype(t);
        return dispatch_shape<T>(vec, cfg.items, [&](auto, auto v, auto it) {
            constexpr int VEC = decltype(v)::value, ITEMS = decltype(it)::value;
            return nf::launch(rms_norm_fwd_kernel<T, VEC, ITEMS>, dim3(static_cast<unsigned>(a.N)), dim3(cfg.threads),
                              stream, static_cast<const T*>(a.x), a.x_stride, static_cast<const T*>(a.residual),
                              a.residual_stride, a.weight, a.weight_dtype, static_cast<T*>(a.y), a.y_stride,
                              static_cast<T*>(a.h), a.h_stride, a.rstd, a.D, inv_d, a.eps);
        });
    });
}

int nf_rms_norm_bwd(const nf_rms_norm_bwd_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_rms_norm_bwd_args& a = *args;
    if (a.N < 1 || a.D < 1 || !nf::valid_dtype(a.dtype) || a.dy == nullptr || a.h == nullptr || a.rstd == nullptr ||
        a.dx == nullptr || a.num_partials < 1 || a.num_partials > a.N || a.num_partials > 0x7fffffffLL ||
        (a.weight != nullptr && (!nf::valid_dtype(a.weight_dtype) || a.dw_partial == nullptr || a.dw == nullptr)))
        return nf::kInvalidArgument;
    const bool vec = can_vectorise(a.dtype, a.D, {{a.dy, a.dy_stride}, {a.h, a.h_stride}, {a.dh, a.dh_stride},
                                                   {a.dx, a.dx_stride}}) &&
                     nf::aligned_to(a.dw_partial, 16);
    const RowConfig cfg = row_config(a.D, vec ? 16 / nf::elem_size(a.dtype) : 1);
    float* partial = a.weight != nullptr ? a.dw_partial : nullptr;
    const float inv_d = 1.0f / static_cast<float>(a.D);
    int err = dispatch_dtype(a.dtype, [&](auto t) {
        using T = decltype(t);
        return dispatch_shape<T>(vec, cfg.items, [&](auto, auto v, auto it) {
            constexpr int VEC = decltype(v)::value, ITEMS = decltype(it)::value;
            return nf::launch(rms_norm_bwd_kernel<T, VEC, ITEMS>, dim3(static_cast<unsigned>(a.num_partials)),
                              dim3(cfg.threads), stream, static_cast<const T*>(a.dy), a.dy_stride,
                              static_cast<const T*>(a.h), a.h_stride, a.rstd, a.weight, a.weight_dtype,
                              static_cast<const T*>(a.dh), a.dh_stride, static_cast<T*>(a.dx), a.dx_stride, partial,
                              a.N, a.D, inv_d);
        });
    });
    if (err != 0 || a.weight == nullptr) return err;
    constexpr int kSumThreads = 256;
    return nf::launch(nf::column_sum_kernel<kSumThreads>, dim3(static_cast<unsigned>(nf::ceil_div(a.D, kSumThreads))),
                      dim3(kSumThreads), stream, static_cast<const float*>(a.dw_partial), a.num_partials, a.D, a.dw,
                      a.weight_dtype);
}

const char* nf_rms_norm_error_string(int code) { return nf::error_string(code); }

}  // extern "C"
