// Fused QK RMSNorm + rotary embedding, forward / backward / in-place on a packed qkv buffer.
//
// Per head vector x (length D, fp32 statistics):
//   n   = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps);   n *= weight (D,) if given
//   out = scale * rotate(n) with cos/sin of the token's position, pairs (i, i + D/2) (half-split,
//         GPT-NeoX / nanochat layout) or (2i, 2i + 1) (interleaved, GPT-J layout):
//         o1 = n1 * cos + n2 * sin,   o2 = n2 * cos - n1 * sin
//
// One warp per (token, head): a head is D <= a few hundred elements, so a warp covers it with a
// couple of pairs per lane, the sum of squares is a pure shuffle reduction (no shared memory, no
// __syncthreads), and the warp's lanes hold both members of every pair they rotate. Heads up to
// D = 256 stay in registers between the statistics pass and the output pass; longer heads re-read
// (L1 hits). q and k heads of all tokens are one flat list of items, so one launch covers both and
// no warp idles on a token with fewer heads than warps per block.
//
// Backward: a persistent grid; each warp strides over items and accumulates its weight-gradient
// contribution in registers, then writes it to its own row of an fp32 partial buffer, which a
// column-sum kernel adds in fixed order: deterministic, no atomics.
#include "common.cuh"
#include "nf_abi.h"

namespace {

using nf::load_pack;
using nf::store_pack;

constexpr int kWarps = 4;  // items (warps) per block
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxPairsPerLane = 4;  // register-cached path: D/2 <= 32 * 4, i.e. D <= 256

// The launch's argument struct as given (nf_abi.h), plus 1/D: means without an IEEE divide in the kernel.
struct FwdArgs {
    nf_qk_norm_rope_fwd_args in;
    float inv_d;
};

struct BwdArgs {
    nf_qk_norm_rope_bwd_args in;
    float inv_d;
};

// Chunk c of a head holds pairs [c*V, c*V + V). Half-split: first members are V consecutive
// elements at c*V, second members V consecutive at D/2 + c*V. Interleaved: 2V consecutive elements
// at 2*c*V, alternating first/second. Either way each access is one aligned pack.
template <typename T, int V>
__device__ __forceinline__ void load_pairs(const T* x, int64_t d, int64_t c, bool il, float (&a1)[V], float (&a2)[V]) {
    if (il) {
        float t[2 * V];
        load_pack<T, 2 * V>(x + 2 * c * V, t);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            a1[j] = t[2 * j];
            a2[j] = t[2 * j + 1];
        }
    } else {
        load_pack<T, V>(x + c * V, a1);
        load_pack<T, V>(x + d + c * V, a2);
    }
}

template <typename T, int V>
__device__ __forceinline__ void store_pairs(T* x, int64_t d, int64_t c, bool il, const float (&a1)[V],
                                            const float (&a2)[V]) {
    if (il) {
        float t[2 * V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            t[2 * j] = a1[j];
            t[2 * j + 1] = a2[j];
        }
        store_pack<T, 2 * V>(x + 2 * c * V, t);
    } else {
        store_pack<T, V>(x + c * V, a1);
        store_pack<T, V>(x + d + c * V, a2);
    }
}

template <int V>
__device__ __forceinline__ void load_weight_pairs(const void* w, int dtype, int64_t d, int64_t c, bool il,
                                                  float (&w1)[V], float (&w2)[V]) {
    if (w == nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) w1[j] = w2[j] = 1.f;
    } else if (il) {
        float t[2 * V];
        nf::load_any<2 * V>(w, dtype, 2 * c * V, t);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            w1[j] = t[2 * j];
            w2[j] = t[2 * j + 1];
        }
    } else {
        nf::load_any<V>(w, dtype, c * V, w1);
        nf::load_any<V>(w, dtype, d + c * V, w2);
    }
}

// Select between the q (0) and k (1) member of a kernel-parameter pair. Indexing a parameter array
// with a run-time index can make the compiler copy the whole parameter struct to local memory
// (stack frame, i.e. spills); a select keeps every access a constant-offset parameter load.
template <typename X>
__device__ __forceinline__ X pick(int which, const X (&v)[2]) {
    return which ? v[1] : v[0];
}

template <typename T, typename P>
__device__ __forceinline__ const T* head_ptr(int which, const P (&base)[2], const int64_t (&s)[2][3],
                                             int64_t b, int64_t t, int64_t h) {
    const int64_t off = which ? b * s[1][0] + t * s[1][1] + h * s[1][2] : b * s[0][0] + t * s[0][1] + h * s[0][2];
    return static_cast<const T*>(which ? base[1] : base[0]) + off;
}

template <typename T, int V, bool CACHED>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_fwd_kernel(FwdArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t heads = a.in.H[0] + a.in.H[1];
    const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (item >= a.in.B * a.in.T * heads) return;  // whole warps leave together, so every shuffle stays full
    const int64_t tok = item / heads, hd = item - tok * heads;
    const int which = hd < a.in.H[0] ? 0 : 1;
    const int64_t head = hd - (which ? a.in.H[0] : 0);
    const int64_t b = tok / a.in.T, t = tok - b * a.in.T;
    const T* x = head_ptr<T>(which, a.in.x, a.in.x_s, b, t, head);
    T* o = const_cast<T*>(head_ptr<T>(which, a.in.out, a.in.out_s, b, t, head));
    const int64_t pos = a.in.positions != nullptr ? a.in.positions[tok] : t;
    const int64_t d = a.in.D >> 1, chunks = d / V;
    const bool il = a.in.interleaved != 0;
    const void* w = pick(which, a.in.weight);
    const int wdt = pick(which, a.in.w_dtype);

    constexpr int kCache = CACHED ? kMaxPairsPerLane / V : 1;
    float x1[kCache][V], x2[kCache][V];
    float ss = 0.f;
    if constexpr (CACHED) {
#pragma unroll
        for (int k = 0; k < kCache; ++k) {
            const int64_t c = lane + 32 * k;
            if (c < chunks) {
                load_pairs<T, V>(x, d, c, il, x1[k], x2[k]);
#pragma unroll
                for (int j = 0; j < V; ++j) ss += x1[k][j] * x1[k][j] + x2[k][j] * x2[k][j];
            }
        }
    } else {
        for (int64_t c = lane; c < chunks; c += 32) {
            load_pairs<T, V>(x, d, c, il, x1[0], x2[0]);
#pragma unroll
            for (int j = 0; j < V; ++j) ss += x1[0][j] * x1[0][j] + x2[0][j] * x2[0][j];
        }
    }
    const float r = rsqrtf(nf::warp_sum(ss) * a.inv_d + a.in.eps);
    float* rs = pick(which, a.in.rstd);
    if (lane == 0 && rs != nullptr) rs[tok * pick(which, a.in.H) + head] = r;

    auto emit = [&](int64_t c, const float (&v1)[V], const float (&v2)[V]) {
        float w1[V], w2[V], cs[V], sn[V], o1[V], o2[V];
        load_weight_pairs<V>(w, wdt, d, c, il, w1, w2);
        nf::load_any<V>(a.in.cos, a.in.cs_dtype, pos * a.in.cos_stride + c * V, cs);
        nf::load_any<V>(a.in.sin, a.in.cs_dtype, pos * a.in.sin_stride + c * V, sn);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float n1 = v1[j] * r * w1[j], n2 = v2[j] * r * w2[j];
            o1[j] = (n1 * cs[j] + n2 * sn[j]) * a.in.scale;
            o2[j] = (n2 * cs[j] - n1 * sn[j]) * a.in.scale;
        }
        store_pairs<T, V>(o, d, c, il, o1, o2);
    };
    if constexpr (CACHED) {
#pragma unroll
        for (int k = 0; k < kCache; ++k) {
            const int64_t c = lane + 32 * k;
            if (c < chunks) emit(c, x1[k], x2[k]);
        }
    } else {
        // A lane re-reads only its own chunks, so in place this never sees an already rotated value.
        for (int64_t c = lane; c < chunks; c += 32) {
            load_pairs<T, V>(x, d, c, il, x1[0], x2[0]);
            emit(c, x1[0], x2[0]);
        }
    }
}

// The backward holds x, dout, weights, cos/sin and both weight-gradient accumulators per lane.
// Declaring the occupancy target (4 blocks = 16 warps per SM, enough to cover load latency for a
// streaming kernel) gives ptxas a 128-register budget; left to its own heuristics it capped some
// variants at 64 and spilled.
template <typename T, int V, bool CACHED>
__global__ void __launch_bounds__(kThreads, 4) qk_norm_rope_bwd_kernel(BwdArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
    const int64_t heads = a.in.H[0] + a.in.H[1], total = a.in.B * a.in.T * heads;
    const int64_t d = a.in.D >> 1, chunks = d / V;
    const bool il = a.in.interleaved != 0;
    float* const part_q = a.in.dw_partial[0] != nullptr ? a.in.dw_partial[0] + gw * a.in.D : nullptr;
    float* const part_k = a.in.dw_partial[1] != nullptr ? a.in.dw_partial[1] + gw * a.in.D : nullptr;

    constexpr int kCache = CACHED ? kMaxPairsPerLane / V : 1;
    // Per-warp weight-gradient accumulators, q and k, first/second pair members.
    float acc1[2][kCache][V], acc2[2][kCache][V];
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int k = 0; k < kCache; ++k)
#pragma unroll
            for (int j = 0; j < V; ++j) acc1[s][k][j] = acc2[s][k][j] = 0.f;
    if constexpr (!CACHED) {
        const float zero[V] = {};
        for (int s = 0; s < 2; ++s)
            if (float* p = s ? part_k : part_q; p != nullptr)
                for (int64_t c = lane; c < chunks; c += 32) store_pairs<float, V>(p, d, c, il, zero, zero);
    }

    for (int64_t item = gw; item < total; item += nwarps) {  // uniform per warp: shuffles stay full
        const int64_t tok = item / heads, hd = item - tok * heads;
        const int which = hd < a.in.H[0] ? 0 : 1;
        const int64_t head = hd - (which ? a.in.H[0] : 0);
        const int64_t b = tok / a.in.T, t = tok - b * a.in.T;
        const T* x = head_ptr<T>(which, a.in.x, a.in.x_s, b, t, head);
        const T* g = head_ptr<T>(which, a.in.dout, a.in.dout_s, b, t, head);
        T* dx = const_cast<T*>(head_ptr<T>(which, a.in.dx, a.in.dx_s, b, t, head));
        const float r = pick(which, a.in.rstd)[tok * pick(which, a.in.H) + head];
        const void* w = pick(which, a.in.weight);
        const int wdt = pick(which, a.in.w_dtype);

        // Chunk c: n = x * rstd and dn = dL/dn (through scale, the inverse rotation and the weight);
        // returns sum(dn * n) and the weight-gradient terms du * n.
        auto terms = [&](int64_t c, float (&n1)[V], float (&n2)[V], float (&dn1)[V], float (&dn2)[V],
                         float (&dw1)[V], float (&dw2)[V]) {
            float g1[V], g2[V], w1[V], w2[V], cs[V], sn[V];
            load_pairs<T, V>(x, d, c, il, n1, n2);
            load_pairs<T, V>(g, d, c, il, g1, g2);
            load_weight_pairs<V>(w, wdt, d, c, il, w1, w2);
            nf::load_any<V>(a.in.cos, a.in.cs_dtype, t * a.in.cos_stride + c * V, cs);
            nf::load_any<V>(a.in.sin, a.in.cs_dtype, t * a.in.sin_stride + c * V, sn);
            float dot = 0.f;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                n1[j] *= r;
                n2[j] *= r;
                const float z1 = g1[j] * a.in.scale, z2 = g2[j] * a.in.scale;
                const float u1 = z1 * cs[j] - z2 * sn[j];  // rotation transposed
                const float u2 = z1 * sn[j] + z2 * cs[j];
                dw1[j] = u1 * n1[j];
                dw2[j] = u2 * n2[j];
                dn1[j] = u1 * w1[j];
                dn2[j] = u2 * w2[j];
                dot += dn1[j] * n1[j] + dn2[j] * n2[j];
            }
            return dot;
        };
        auto emit = [&](int64_t c, float cmean, const float (&n1)[V], const float (&n2)[V], const float (&dn1)[V],
                        const float (&dn2)[V]) {
            float o1[V], o2[V];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                o1[j] = r * (dn1[j] - n1[j] * cmean);
                o2[j] = r * (dn2[j] - n2[j] * cmean);
            }
            store_pairs<T, V>(dx, d, c, il, o1, o2);
        };

        float dot = 0.f;
        if constexpr (CACHED) {
            float n1[kCache][V], n2[kCache][V], dn1[kCache][V], dn2[kCache][V];
#pragma unroll
            for (int k = 0; k < kCache; ++k) {
                const int64_t c = lane + 32 * k;
                if (c < chunks) {
                    float dw1[V], dw2[V];
                    dot += terms(c, n1[k], n2[k], dn1[k], dn2[k], dw1, dw2);
                    // Constant indices on both sides so the accumulators stay in registers.
                    if (which == 0) {
#pragma unroll
                        for (int j = 0; j < V; ++j) {
                            acc1[0][k][j] += dw1[j];
                            acc2[0][k][j] += dw2[j];
                        }
                    } else {
#pragma unroll
                        for (int j = 0; j < V; ++j) {
                            acc1[1][k][j] += dw1[j];
                            acc2[1][k][j] += dw2[j];
                        }
                    }
                }
            }
            const float cmean = nf::warp_sum(dot) * a.inv_d;
#pragma unroll
            for (int k = 0; k < kCache; ++k) {
                const int64_t c = lane + 32 * k;
                if (c < chunks) emit(c, cmean, n1[k], n2[k], dn1[k], dn2[k]);
            }
        } else {
            float n1[V], n2[V], dn1[V], dn2[V], dw1[V], dw2[V];
            float* p = which ? part_k : part_q;
            for (int64_t c = lane; c < chunks; c += 32) {
                dot += terms(c, n1, n2, dn1, dn2, dw1, dw2);
                if (p != nullptr) {  // this warp's own partial row, this lane's own columns
                    float s1[V], s2[V];
                    load_pairs<float, V>(p, d, c, il, s1, s2);
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        s1[j] += dw1[j];
                        s2[j] += dw2[j];
                    }
                    store_pairs<float, V>(p, d, c, il, s1, s2);
                }
            }
            const float cmean = nf::warp_sum(dot) * a.inv_d;
            for (int64_t c = lane; c < chunks; c += 32) {
                terms(c, n1, n2, dn1, dn2, dw1, dw2);
                emit(c, cmean, n1, n2, dn1, dn2);
            }
        }
    }
    if constexpr (CACHED) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            float* p = s ? part_k : part_q;
            if (p == nullptr) continue;
#pragma unroll
            for (int k = 0; k < kCache; ++k) {
                const int64_t c = lane + 32 * k;
                if (c < chunks) store_pairs<float, V>(p, d, c, il, acc1[s][k], acc2[s][k]);
            }
        }
    }
}

template <int Val> struct IntC { static constexpr int value = Val; };

template <typename Fn>
int dispatch(int dtype, bool vec2, bool cached, Fn&& fn) {
    auto by_type = [&](auto t) {
        using T = decltype(t);
        if (vec2) return cached ? fn(T{}, IntC<2>{}, IntC<1>{}) : fn(T{}, IntC<2>{}, IntC<0>{});
        return cached ? fn(T{}, IntC<1>{}, IntC<1>{}) : fn(T{}, IntC<1>{}, IntC<0>{});
    };
    switch (dtype) {
        case nf::kFloat32: return by_type(float{});
        case nf::kFloat16: return by_type(__half{});
        case nf::kBFloat16: return by_type(__nv_bfloat16{});
        default: return nf::kInvalidArgument;
    }
}

// Two pairs per chunk need every head start aligned to the pack: 2 elements (half-split) or 4
// (interleaved) of T, both halves of a head included (hence D/2 even).
bool can_pack2(int dtype, int64_t D, bool il, const void* const* ptrs, int nptrs, const int64_t* strides, int nstrides) {
    const int elems = il ? 4 : 2;
    const int bytes = elems * nf::elem_size(dtype);
    return (D / 2) % 2 == 0 && nf::rows_aligned(ptrs, nptrs, bytes, strides, nstrides, elems);
}

}  // namespace

extern "C" {

int nf_qk_norm_rope_fwd(const nf_qk_norm_rope_fwd_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_qk_norm_rope_fwd_args& p = *args;
    const int64_t items = p.B * p.T * (p.H[0] + p.H[1]);
    if (p.B < 1 || p.T < 1 || p.H[0] < 0 || p.H[1] < 0 || items < 1 || p.D < 2 || p.D % 2 != 0 ||
        !nf::valid_dtype(p.dtype) || !nf::valid_dtype(p.cs_dtype) || p.cos == nullptr || p.sin == nullptr ||
        nf::ceil_div(items, kWarps) > 0x7fffffffLL)
        return nf::kInvalidArgument;
    for (int s = 0; s < 2; ++s)
        if ((p.H[s] > 0 && (p.x[s] == nullptr || p.out[s] == nullptr)) ||
            (p.weight[s] != nullptr && !nf::valid_dtype(p.w_dtype[s])))
            return nf::kInvalidArgument;
    const FwdArgs a{p, 1.0f / static_cast<float>(p.D)};
    const bool il = p.interleaved != 0;
    const bool vec2 = can_pack2(p.dtype, p.D, il, p.x, 2, &p.x_s[0][0], 6) &&
                      can_pack2(p.dtype, p.D, il, p.out, 2, &p.out_s[0][0], 6);
    const bool cached = p.D / 2 <= 32 * kMaxPairsPerLane;
    return dispatch(p.dtype, vec2, cached, [&](auto t, auto v, auto c) {
        using Tp = decltype(t);
        return nf::launch(qk_norm_rope_fwd_kernel<Tp, decltype(v)::value, decltype(c)::value != 0>,
                          dim3(static_cast<unsigned>(nf::ceil_div(items, kWarps))), dim3(kThreads), stream, a);
    });
}

int nf_qk_norm_rope_bwd(const nf_qk_norm_rope_bwd_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_qk_norm_rope_bwd_args& p = *args;
    const int64_t items = p.B * p.T * (p.H[0] + p.H[1]);
    if (p.B < 1 || p.T < 1 || p.H[0] < 0 || p.H[1] < 0 || items < 1 || p.D < 2 || p.D % 2 != 0 ||
        !nf::valid_dtype(p.dtype) || !nf::valid_dtype(p.cs_dtype) || p.num_blocks < 1 || p.num_blocks > 0x7fffffffLL ||
        p.cos == nullptr || p.sin == nullptr)
        return nf::kInvalidArgument;
    for (int s = 0; s < 2; ++s)
        if ((p.H[s] > 0 &&
             (p.x[s] == nullptr || p.dout[s] == nullptr || p.dx[s] == nullptr || p.rstd[s] == nullptr)) ||
            (p.weight[s] != nullptr &&
             (!nf::valid_dtype(p.w_dtype[s]) || p.dw_partial[s] == nullptr || p.dw[s] == nullptr)))
            return nf::kInvalidArgument;
    BwdArgs a{p, 1.0f / static_cast<float>(p.D)};
    for (int s = 0; s < 2; ++s)
        if (p.weight[s] == nullptr) a.in.dw_partial[s] = nullptr;  // the kernel accumulates only weight gradients
    const bool il = p.interleaved != 0;
    // The fp32 partial rows take packs of 2 (half-split) or 4 (interleaved) floats: 16-byte base.
    const bool vec2 = can_pack2(p.dtype, p.D, il, p.dout, 2, &p.dout_s[0][0], 6) &&
                      can_pack2(p.dtype, p.D, il, p.x, 2, &p.x_s[0][0], 6) &&
                      can_pack2(p.dtype, p.D, il, p.dx, 2, &p.dx_s[0][0], 6) &&
                      nf::aligned_to(a.in.dw_partial[0], 16) && nf::aligned_to(a.in.dw_partial[1], 16);
    const bool cached = p.D / 2 <= 32 * kMaxPairsPerLane;
    int err = dispatch(p.dtype, vec2, cached, [&](auto t, auto v, auto c) {
        using Tp = decltype(t);
        return nf::launch(qk_norm_rope_bwd_kernel<Tp, decltype(v)::value, decltype(c)::value != 0>,
                          dim3(static_cast<unsigned>(p.num_blocks)), dim3(kThreads), stream, a);
    });
    constexpr int kSumThreads = 256;
    const dim3 sum_grid(static_cast<unsigned>(nf::ceil_div(p.D, kSumThreads)));
    for (int s = 0; s < 2 && err == 0; ++s) {
        if (a.in.dw_partial[s] == nullptr) continue;
        err = nf::launch(nf::column_sum_kernel<kSumThreads>, sum_grid, dim3(kSumThreads), stream,
                         static_cast<const float*>(a.in.dw_partial[s]), p.num_blocks * kWarps, p.D, p.dw[s],
                         p.w_dtype[s]);
    }
    return err;
}

const char* nf_qk_norm_rope_error_string(int code) { return nf::error_string(code); }

}  // extern "C"
