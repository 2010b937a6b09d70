// Paged KV-cache decode attention (one query token per sequence) and the paged KV-cache write.
//
// Cache layout NHD: k_cache, v_cache (num_pages, page_size, Hkv, D). Sequence b owns the pages
// block_table[b, 0 .. ceil(len_b / page_size)); key position j lives in page block_table[b, j / page_size],
// slot j % page_size. Query head hq reads KV head hq / G (G = Hq / Hkv, consecutive query heads share
// a KV head, as repeat_interleave). With a window w the query (position len-1) sees keys
// len-1-w <= j <= len-1; pages outside that range and table entries past the used pages are never read.
//
//   out[b, hq] = sum_j softmax_j(scale * q . k_j) v_j      fp32 scores and accumulators, online softmax
//
// Decode is bandwidth bound: every K/V element must cross HBM once and the work per element is one
// FMA, so the design is about reading each K/V row once, with full 16-byte loads, and keeping enough
// rows in flight:
//
//   * one block per (sequence, KV head, split); every query head of the KV head's group is handled in
//     this block, HPW heads per warp: a warp loads a K/V row into registers once and uses it for all
//     of its HPW heads (warps of the same block share the rows through L1);
//   * a key is covered by a segment of L lanes (L = the power of two >= D / VEC chunks), each lane
//     VEC consecutive elements (16 bytes where alignment allows): 32 / L keys per warp step, so a
//     warp keeps several rows in flight even for small D; the dot product is a shuffle butterfly
//     inside the segment (no shared memory, no __syncthreads);
//   * each lane segment runs its own online softmax (running max m, denominator l, accumulator) over
//     its keys; at the end the segments are merged by a butterfly across segments;
//   * scores live in the exp2 domain (q is pre-scaled by scale * log2 e): exp2 is the hardware's
//     native exponential (MUFU.EX2);
//   * split-KV from a plan: the grid is (work units, KV heads x head blocks), ONE launch for the
//     whole ragged batch. Unit u is split unit_idx[u] of the n units of sequence unit_seq[u] (the
//     caller's plan, kernels/paged_attention.plan_paged_decode: n from the sequence's own length so
//     that units are of similar size); it covers the visible positions [first + s*V/n, first +
//     (s+1)*V/n) of the V visible keys. A sequence of one unit writes its output directly; the
//     others write a normalised fp32 partial output and log2-sum-exp, and a merge kernel combines
//     them. Empty units (a plan with more units than keys) write lse = -inf, skipped by the merge.
//
// Occupancy and bytes in flight (what the plan targets, kernels/cuda_ops.py _PAGED_WARPS_PER_SM):
// a warp step requests the K and V rows of 32 / L keys, i.e. 2 x 32 x VEC x sizeof(T) = 1 KB for
// 16-byte lanes (2 keys of 512 B at bf16 D = 128), and the key loop keeps one step in flight per
// warp. Little's law for an H100 (~3.35 TB/s x ~600 ns / 132 SMs ~= 15 KB per SM) then needs
// ~16 warps resident per SM: __launch_bounds__(256, 2) caps ptxas at 128 registers so that 16 warps
// of any instantiation fit the 64 K registers of an SM (checked from the nvcc facts in
// tests/test_paged_attention_cuda.py), and the launcher plans ~16 warps per SM of work units
// (units x KV heads x head blocks x warps per block ~= 16 x SMs), not ~2 blocks per SM (with one
// warp per block for <= 4 query heads per KV head, that was ~2 warps = ~2 KB in flight per SM).
//
// No atomics: the result is bit-reproducible run to run.
#include <cmath>

#include "common.cuh"
#include "nf_abi.h"

namespace {

using nf::load_pack;
using nf::store_pack;

constexpr int kMaxWarps = 8;     // attention: warps (groups of HPW query heads) per block
constexpr int kMergeWarps = 4;   // merge: one warp per output row
constexpr int kWriteWarps = 4;   // cache write: one warp per (token, KV head)
constexpr int kMaxD = 256;
constexpr float kLog2e = 1.4426950408889634f;

// The ABI struct as given, plus what the host derives from it once per launch. 32-bit copies of
// page_size and window: the key loop's index arithmetic stays in 32-bit registers.
struct AttnArgs {
    nf_paged_attention_fwd_args in;
    int max_len;          // max_pages * page_size: seq_lens are clamped to it
    int group;            // G = Hq / Hkv
    int heads_per_block;  // heads_per_warp * warps
    int hblocks;          // blocks per (b, kv head) along the group
    int page_size;
    int window;  // < 0: no window
    bool split;  // some sequence has more than one unit (part_o / part_lse and the merge are used)
    int lanes;     // L: lanes per key, a power of two <= 32
    float qscale;  // scale * log2(e)
};

// C chunks of VEC elements per lane: chunk k of lane li (0 <= li < L) starts at element
// (li + k * L) * VEC, so the L lanes of a segment read one contiguous stretch per k (coalesced).
// Chunks at or past D read nothing and hold zeros (they add nothing to dot products).
template <typename T, int VEC, int C>
__device__ __forceinline__ void load_row(const T* p, int li, int L, int64_t D, float (&x)[VEC * C]) {
#pragma unroll
    for (int k = 0; k < C; ++k) {
        const int64_t e = static_cast<int64_t>(li + k * L) * VEC;
        float t[VEC];
        if (e < D) {
            load_pack<T, VEC>(p + e, t);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) t[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[k * VEC + j] = t[j];
    }
}

template <typename OutT, int VEC, int C>
__device__ __forceinline__ void store_row(OutT* p, int li, int L, int64_t D, const float (&x)[VEC * C], float mul) {
#pragma unroll
    for (int k = 0; k < C; ++k) {
        const int64_t e = static_cast<int64_t>(li + k * L) * VEC;
        if (e < D) {
            float t[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) t[j] = x[k * VEC + j] * mul;
            store_pack<OutT, VEC>(p + e, t);
        }
    }
}

// Two full blocks per SM declared: caps ptxas at 128 registers (16 warps resident per SM to keep
// loads in flight); the widest variant (4 heads x 8 elements of q and accumulator) needs about that.
template <typename T, int VEC, int C, int HPW>
__global__ void __launch_bounds__(32 * kMaxWarps, 2) paged_attention_kernel(AttnArgs a) {
    constexpr int E = VEC * C;  // elements per lane
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int L = a.lanes, li = lane & (L - 1), seg = lane / L, nseg = 32 / L;
    const int64_t unit = blockIdx.x;
    const int64_t kvh = blockIdx.y / a.hblocks;
    const int hb = static_cast<int>(blockIdx.y - kvh * a.hblocks);
    const int g0 = hb * a.heads_per_block + warp * HPW;  // first head (within the group) of this warp
    if (g0 >= a.group) return;  // the whole warp leaves: every shuffle below stays full
    const int64_t b = a.in.unit_seq[unit];
    const int split = a.in.unit_idx[unit];
    const int nsplit = a.in.seq_start[b + 1] - a.in.seq_start[b];

    // Visible positions [first, len), cut into `nsplit` contiguous ranges of V / nsplit keys (sizes
    // differ by at most one); this block takes [lo, hi). seq_lens are validated on the host only for
    // CPU tensors (on CUDA that would be a sync per call): clamping keeps a bad length from reading
    // past the block-table row.
    const int len = max(0, min(a.in.seq_lens[b * a.in.sl_s], a.max_len));
    const int first = a.window < 0 ? 0 : max(0, len - 1 - a.window);
    const int64_t vis = len - first;
    const int lo = first + static_cast<int>(split * vis / nsplit);
    const int hi = first + static_cast<int>((split + 1) * vis / nsplit);

    float q[HPW][E], m[HPW], l[HPW], acc[HPW][E];
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
        const int g = g0 + h;
        if (g < a.group) {
            const T* qp = static_cast<const T*>(a.in.q) + b * a.in.q_sb + (kvh * a.group + g) * a.in.q_sh;
            load_row<T, VEC, C>(qp, li, L, a.in.D, q[h]);
#pragma unroll
            for (int e = 0; e < E; ++e) q[h][e] *= a.qscale;
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) q[h][e] = 0.f;  // padding head: computed, never written
        }
    }

    const T* kb = static_cast<const T*>(a.in.k) + kvh * a.in.k_sh;
    const T* vb = static_cast<const T*>(a.in.v) + kvh * a.in.v_sh;
    const int* bt = a.in.block_table + b * a.in.bt_sb;
    for (int base = lo; base < hi; base += nseg) {  // same trip count in every lane: shuffles converge
        const int pos = base + seg;
        const bool valid = pos < hi;
        float kx[E], vx[E];
        int64_t page = -1;
        int slot = 0;
        if (valid) {
            const int pg = pos / a.page_size;
            slot = pos - pg * a.page_size;
            page = bt[pg * a.in.bt_sp];
        }
        // A page id outside the pool (unchecked on CUDA, see above) drops the key instead of faulting.
        const bool ok = page >= 0 && page < a.in.num_pages;
        if (ok) {
            // Both rows are requested before the dot product's shuffles so the V load overlaps them.
            load_row<T, VEC, C>(kb + page * a.in.k_sp + slot * a.in.k_ss, li, L, a.in.D, kx);
            load_row<T, VEC, C>(vb + page * a.in.v_sp + slot * a.in.v_ss, li, L, a.in.D, vx);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) kx[e] = vx[e] = 0.f;
        }
        float s[HPW];
#pragma unroll
        for (int h = 0; h < HPW; ++h) {
            s[h] = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) s[h] += q[h][e] * kx[e];
        }
        // Butterfly inside the L-lane segment: every lane of it ends with the same bits (a + b == b + a).
        for (int o = L >> 1; o > 0; o >>= 1)
#pragma unroll
            for (int h = 0; h < HPW; ++h) s[h] += __shfl_xor_sync(0xffffffffu, s[h], o);
        if (ok) {
#pragma unroll
            for (int h = 0; h < HPW; ++h) {
                const float mn = fmaxf(m[h], s[h]);
                const float corr = exp2f(m[h] - mn);  // exp2(-inf) = 0 on the first key
                const float p = exp2f(s[h] - mn);
                l[h] = l[h] * corr + p;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[h][e] = acc[h][e] * corr + p * vx[e];
                m[h] = mn;
            }
        }
    }

    // Merge the segments' online-softmax states (lanes li of different segments hold the same elements).
    for (int o = L; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < HPW; ++h) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[h], o);
            const float lo_ = __shfl_xor_sync(0xffffffffu, l[h], o);
            const float mn = fmaxf(m[h], mo);
            // A segment that saw no key has m = -inf; exp2(-inf - -inf) would be NaN, its weight is 0.
            const float wa = m[h] == -INFINITY ? 0.f : exp2f(m[h] - mn);
            const float wb = mo == -INFINITY ? 0.f : exp2f(mo - mn);
            l[h] = l[h] * wa + lo_ * wb;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[h][e], o);
                acc[h][e] = acc[h][e] * wa + ao * wb;
            }
            m[h] = mn;
        }
    }
    if (seg != 0) return;

#pragma unroll
    for (int h = 0; h < HPW; ++h) {
        const int g = g0 + h;
        if (g >= a.group) continue;
        const int64_t hq = kvh * a.group + g;
        // l >= 1 once a key was seen (the maximum's own term); l = 0 only for a range without keys
        // (an empty split, or a bad length / page id on CUDA): zeros, never 0/0.
        const bool any = l[h] > 0.f;
        if (nsplit == 1) {
            T* op = static_cast<T*>(a.in.out) + b * a.in.o_sb + hq * a.in.o_sh;
            store_row<T, VEC, C>(op, li, L, a.in.D, acc[h], any ? 1.f / l[h] : 0.f);
        } else {
            const int64_t row = unit * a.in.Hq + hq;
            store_row<float, VEC, C>(a.in.part_o + row * a.in.D, li, L, a.in.D, acc[h], any ? 1.f / l[h] : 0.f);
            if (li == 0) a.in.part_lse[row] = any ? m[h] + log2f(l[h]) : -INFINITY;
        }
    }
}

// out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse): each split's partial is already
// normalised by its own denominator, so its weight is its share of the total exp-sum.
template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) paged_attention_merge_kernel(AttnArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = a.in.B * a.in.Hq;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int64_t b = row / a.in.Hq, hq = row - b * a.in.Hq;
    const int64_t u0 = a.in.seq_start[b];
    const int n = a.in.seq_start[b + 1] - static_cast<int>(u0);
    if (n <= 1) return;  // one unit: the attention kernel wrote this row itself
    const float* lse = a.in.part_lse + u0 * a.in.Hq + hq;  // unit s of this sequence: lse[s * Hq]
    const float* po = a.in.part_o + (u0 * a.in.Hq + hq) * a.in.D;  // its row: po + s * Hq * D
    float mx = -INFINITY;
    for (int s = 0; s < n; ++s) mx = fmaxf(mx, lse[s * a.in.Hq]);
    // mx is finite unless no split saw a key (only for a bad length / page id on CUDA): then zeros.
    float wsum = 0.f;
    for (int s = 0; s < n; ++s) {
        const float ls = lse[s * a.in.Hq];
        if (ls != -INFINITY) wsum += exp2f(ls - mx);
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* op = static_cast<T*>(a.in.out) + b * a.in.o_sb + hq * a.in.o_sh;
    for (int64_t d = lane; d < a.in.D; d += 32) {
        float o = 0.f;
        for (int s = 0; s < n; ++s) {
            const float ls = lse[s * a.in.Hq];
            if (ls == -INFINITY) continue;  // empty split: its partial row holds nothing
            o += exp2f(ls - mx) * po[s * a.in.Hq * a.in.D + d];
        }
        op[d] = nf::from_float<T>(o * inv);
    }
}

// Bit-exact copy of one (token, KV head) row of k and of v into its cache slot. W is an unsigned
// word of the element size: copying bits (not converting) keeps every value, NaN payloads included.
template <typename W, int VEC>
__global__ void __launch_bounds__(32 * kWriteWarps) paged_kv_write_kernel(nf_paged_kv_write_args a) {
    const int lane = threadIdx.x & 31;
    const int64_t item = static_cast<int64_t>(blockIdx.x) * kWriteWarps + (threadIdx.x >> 5);
    if (item >= a.N * a.Hkv) return;
    const int64_t n = item / a.Hkv, h = item - n * a.Hkv;
    const int64_t slot = a.slots64 ? static_cast<const int64_t*>(a.slots)[n] : static_cast<const int*>(a.slots)[n];
    // Negative: a padding token. Past the pool: unchecked on CUDA (a host sync per call), skipped
    // rather than written out of bounds.
    if (slot < 0 || slot >= a.num_pages * a.page_size) return;
    const int64_t page = slot / a.page_size, off = slot - page * a.page_size;
    const W* ks = static_cast<const W*>(a.k) + n * a.k_sn + h * a.k_sh;
    const W* vs = static_cast<const W*>(a.v) + n * a.v_sn + h * a.v_sh;
    W* kd = static_cast<W*>(a.kc) + page * a.kc_sp + off * a.kc_ss + h * a.kc_sh;
    W* vd = static_cast<W*>(a.vc) + page * a.vc_sp + off * a.vc_ss + h * a.vc_sh;
    using P = nf::Pack<W, VEC>;
    // One iteration per lane for D <= 32 * VEC; not unrolled further (unrolling bought nothing but
    // registers, which made ptxas spill at sm_90a).
#pragma unroll 1
    for (int64_t e = static_cast<int64_t>(lane) * VEC; e < a.D; e += 32 * VEC) {
        const P kp = *reinterpret_cast<const P*>(ks + e);
        const P vp = *reinterpret_cast<const P*>(vs + e);
        *reinterpret_cast<P*>(kd + e) = kp;
        *reinterpret_cast<P*>(vd + e) = vp;
    }
}

template <int V> struct IntC { static constexpr int value = V; };

int pow2_at_least(int64_t x) {
    int p = 1;
    while (p < x) p <<= 1;
    return p;
}

}  // namespace

extern "C" {

int nf_paged_attention_fwd(const nf_paged_attention_fwd_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_paged_attention_fwd_args& p = *args;
    if (!nf::valid_dtype(p.dtype) || p.B < 1 || p.Hkv < 1 || p.Hq < p.Hkv || p.Hq % p.Hkv != 0 || p.D < 1 ||
        p.D > kMaxD || p.num_pages < 1 || p.page_size < 1 || p.max_pages < 1 ||
        p.max_pages * p.page_size > 0x7fffffffLL || p.window > 0x7fffffffLL || p.num_units < p.B ||
        p.num_units > 0x7fffffffLL || !(p.scale > 0.f) || p.q == nullptr || p.k == nullptr || p.v == nullptr ||
        p.block_table == nullptr || p.seq_lens == nullptr || p.out == nullptr || p.seq_start == nullptr ||
        p.unit_seq == nullptr || p.unit_idx == nullptr ||
        (p.num_units > p.B && (p.part_o == nullptr || p.part_lse == nullptr)))
        return nf::kInvalidArgument;
    // The caller lays the heads out (kernels/cuda_ops.py owns that policy); only what this file
    // compiled is accepted: the HPW instantiations and the warps of __launch_bounds__.
    if ((p.heads_per_warp != 1 && p.heads_per_warp != 2 && p.heads_per_warp != 4) || p.warps < 1 ||
        p.warps > kMaxWarps)
        return nf::kInvalidArgument;
    const int64_t G = p.Hq / p.Hkv;
    if (G > 0x7fffffffLL) return nf::kInvalidArgument;
    const int64_t hblocks = nf::ceil_div(G, static_cast<int64_t>(p.heads_per_warp) * p.warps);
    if (p.Hkv * hblocks > 65535) return nf::kInvalidArgument;  // gridDim.y

    const int vec16 = 16 / nf::elem_size(p.dtype);
    const void* ptrs[] = {p.q, p.k, p.v, p.out};
    const int64_t strides[] = {p.q_sb, p.q_sh, p.k_sp, p.k_ss, p.k_sh, p.v_sp, p.v_ss, p.v_sh, p.o_sb, p.o_sh};
    // The fp32 partial rows take packs of VEC floats: D % VEC == 0 keeps them aligned too.
    const bool vec = p.D % vec16 == 0 && nf::rows_aligned(ptrs, 4, 16, strides, 10, vec16) &&
                     nf::aligned_to(p.part_o, 32);
    int chunks_per_lane, lanes;
    if (vec) {
        const int64_t chunks = p.D / vec16;
        chunks_per_lane = chunks <= 32 ? 1 : 2;  // D <= 256: at most 64 chunks (fp32)
        lanes = chunks <= 32 ? pow2_at_least(chunks) : 32;
    } else {
        chunks_per_lane = 8;  // scalar path: up to 8 elements per lane (D <= 256)
        lanes = pow2_at_least(nf::ceil_div(p.D, 8));
    }

    AttnArgs a{};
    a.in = p;
    a.max_len = static_cast<int>(p.max_pages * p.page_size);
    a.group = static_cast<int>(G);
    a.heads_per_block = p.heads_per_warp * p.warps;
    a.hblocks = static_cast<int>(hblocks);
    a.page_size = static_cast<int>(p.page_size);
    a.window = p.window < 0 ? -1 : static_cast<int>(p.window);
    a.split = p.num_units > p.B;
    a.lanes = lanes;
    a.qscale = p.scale * kLog2e;
    const dim3 grid(static_cast<unsigned>(p.num_units), static_cast<unsigned>(p.Hkv * hblocks));
    const dim3 block(32 * p.warps);

    auto run = [&](auto t) -> int {
        using T = decltype(t);
        auto by_heads = [&](auto vv, auto cc) -> int {
            constexpr int VEC = decltype(vv)::value, C = decltype(cc)::value;
            switch (p.heads_per_warp) {
                case 1: return nf::launch(paged_attention_kernel<T, VEC, C, 1>, grid, block, stream, a);
                case 2: return nf::launch(paged_attention_kernel<T, VEC, C, 2>, grid, block, stream, a);
                default: return nf::launch(paged_attention_kernel<T, VEC, C, 4>, grid, block, stream, a);
            }
        };
        constexpr int kVec = 16 / static_cast<int>(sizeof(T));
        if (!vec) return by_heads(IntC<1>{}, IntC<8>{});
        if constexpr (kVec == 4) {  // only fp32 needs two 16-byte chunks per lane (D > 128)
            if (chunks_per_lane == 2) return by_heads(IntC<kVec>{}, IntC<2>{});
        }
        return by_heads(IntC<kVec>{}, IntC<1>{});
    };
    int err;
    switch (p.dtype) {
        case nf::kFloat32: err = run(float{}); break;
        case nf::kFloat16: err = run(__half{}); break;
        default: err = run(__nv_bfloat16{}); break;
    }
    if (err != 0 || !a.split) return err;

    const dim3 mgrid(static_cast<unsigned>(nf::ceil_div(p.B * p.Hq, kMergeWarps)));
    switch (p.dtype) {
        case nf::kFloat32: return nf::launch(paged_attention_merge_kernel<float>, mgrid, dim3(32 * kMergeWarps), stream, a);
        case nf::kFloat16: return nf::launch(paged_attention_merge_kernel<__half>, mgrid, dim3(32 * kMergeWarps), stream, a);
        default: return nf::launch(paged_attention_merge_kernel<__nv_bfloat16>, mgrid, dim3(32 * kMergeWarps), stream, a);
    }
}

int nf_paged_kv_write(const nf_paged_kv_write_args* args, void* stream) {
    if (args == nullptr) return nf::kInvalidArgument;
    const nf_paged_kv_write_args& a = *args;
    if (!nf::valid_dtype(a.dtype) || a.N < 1 || a.Hkv < 1 || a.D < 1 || a.num_pages < 1 || a.page_size < 1 ||
        a.k == nullptr || a.v == nullptr || a.kc == nullptr || a.vc == nullptr || a.slots == nullptr ||
        nf::ceil_div(a.N * a.Hkv, kWriteWarps) > 0x7fffffffLL)
        return nf::kInvalidArgument;
    const int es = nf::elem_size(a.dtype), vec = 16 / es;
    const void* ptrs[] = {a.k, a.v, a.kc, a.vc};
    const int64_t strides[] = {a.k_sn, a.k_sh, a.v_sn, a.v_sh, a.kc_sp, a.kc_ss, a.kc_sh, a.vc_sp, a.vc_ss, a.vc_sh};
    const bool vec_ok = a.D % vec == 0 && nf::rows_aligned(ptrs, 4, 16, strides, 10, vec);
    const dim3 grid(static_cast<unsigned>(nf::ceil_div(a.N * a.Hkv, kWriteWarps))), block(32 * kWriteWarps);
    if (es == 4)
        return vec_ok ? nf::launch(paged_kv_write_kernel<uint32_t, 4>, grid, block, stream, a)
                      : nf::launch(paged_kv_write_kernel<uint32_t, 1>, grid, block, stream, a);
    return vec_ok ? nf::launch(paged_kv_write_kernel<uint16_t, 8>, grid, block, stream, a)
                  : nf::launch(paged_kv_write_kernel<uint16_t, 1>, grid, block, stream, a);
}

const char* nf_paged_attention_error_string(int code) { return nf::error_string(code); }

}  // extern "C"
