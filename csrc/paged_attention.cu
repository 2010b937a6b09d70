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
//   * split-KV: with S > 1 splits, split s covers a contiguous range of the sequence's visible
//     positions and writes its normalised fp32 partial output and log2-sum-exp; a merge kernel
//     combines the splits. Empty splits (short sequences) write lse = -inf and are skipped by the merge.
//
// No atomics: the result is bit-reproducible run to run.
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace {

using nf::load_pack;
using nf::store_pack;

constexpr int kMaxWarps = 8;     // attention: warps (groups of HPW query heads) per block
constexpr int kMergeWarps = 4;   // merge: one warp per output row
constexpr int kWriteWarps = 4;   // cache write: one warp per (token, KV head)
constexpr int kMaxD = 256;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
    const void* q;
    int64_t q_sb, q_sh;
    const void* k;
    int64_t k_sp, k_ss, k_sh;
    const void* v;
    int64_t v_sp, v_ss, v_sh;
    const int* block_table;
    int64_t bt_sb, bt_sp;
    const int* seq_lens;
    int64_t sl_s;
    void* out;  // (B, Hq, D) of T, used with one split
    int64_t o_sb, o_sh;
    float* part_o;    // (S, B, Hq, D) fp32 contiguous, used with S > 1
    float* part_lse;  // (S, B, Hq) fp32
    int64_t B, Hq, Hkv, D, num_pages;
    int max_len;          // max_pages * page_size: seq_lens are clamped to it
    int group;            // G = Hq / Hkv
    int heads_per_block;  // HPW * warps
    int hblocks;          // blocks per (b, kv head) along the group
    int page_size;
    int window;  // < 0: no window
    int splits;
    int lanes;     // L: lanes per key, a power of two <= 32
    float qscale;  // scale * log2(e)
};

struct MergeArgs {
    const float* part_o;
    const float* part_lse;
    void* out;
    int64_t o_sb, o_sh;
    int64_t B, Hq, D;
    int splits;
};

struct WriteArgs {
    const void* k;
    int64_t k_sn, k_sh;
    const void* v;
    int64_t v_sn, v_sh;
    void* kc;
    int64_t kc_sp, kc_ss, kc_sh;
    void* vc;
    int64_t vc_sp, vc_ss, vc_sh;
    int64_t N, Hkv, D, num_pages, page_size;
    const void* slots;
    int slots64;
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
    const int64_t bk = blockIdx.x / a.hblocks;  // b * Hkv + kv head
    const int hb = static_cast<int>(blockIdx.x - bk * a.hblocks);
    const int64_t b = bk / a.Hkv, kvh = bk - b * a.Hkv;
    const int g0 = hb * a.heads_per_block + warp * HPW;  // first head (within the group) of this warp
    if (g0 >= a.group) return;  // the whole warp leaves: every shuffle below stays full
    const int split = blockIdx.y;

    // Visible positions [first, len), cut into `splits` contiguous ranges; this block takes [lo, hi).
    // seq_lens are validated on the host only for CPU tensors (on CUDA that would be a sync per
    // call): clamping keeps a bad length from reading past the block-table row.
    const int len = max(0, min(a.seq_lens[b * a.sl_s], a.max_len));
    const int first = a.window < 0 ? 0 : max(0, len - 1 - a.window);
    const int per = (len - first + a.splits - 1) / a.splits;
    const int lo = min(len, first + split * per), hi = min(len, lo + per);

    float q[HPW][E], m[HPW], l[HPW], acc[HPW][E];
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
        const int g = g0 + h;
        if (g < a.group) {
            const T* qp = static_cast<const T*>(a.q) + b * a.q_sb + (kvh * a.group + g) * a.q_sh;
            load_row<T, VEC, C>(qp, li, L, a.D, q[h]);
#pragma unroll
            for (int e = 0; e < E; ++e) q[h][e] *= a.qscale;
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) q[h][e] = 0.f;  // padding head: computed, never written
        }
    }

    const T* kb = static_cast<const T*>(a.k) + kvh * a.k_sh;
    const T* vb = static_cast<const T*>(a.v) + kvh * a.v_sh;
    const int* bt = a.block_table + b * a.bt_sb;
    for (int base = lo; base < hi; base += nseg) {  // same trip count in every lane: shuffles converge
        const int pos = base + seg;
        const bool valid = pos < hi;
        float kx[E], vx[E];
        int64_t page = -1;
        int slot = 0;
        if (valid) {
            const int pg = pos / a.page_size;
            slot = pos - pg * a.page_size;
            page = bt[pg * a.bt_sp];
        }
        // A page id outside the pool (unchecked on CUDA, see above) drops the key instead of faulting.
        const bool ok = page >= 0 && page < a.num_pages;
        if (ok) {
            // Both rows are requested before the dot product's shuffles so the V load overlaps them.
            load_row<T, VEC, C>(kb + page * a.k_sp + slot * a.k_ss, li, L, a.D, kx);
            load_row<T, VEC, C>(vb + page * a.v_sp + slot * a.v_ss, li, L, a.D, vx);
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
        if (a.splits == 1) {
            T* op = static_cast<T*>(a.out) + b * a.o_sb + hq * a.o_sh;
            store_row<T, VEC, C>(op, li, L, a.D, acc[h], any ? 1.f / l[h] : 0.f);
        } else {
            const int64_t row = (static_cast<int64_t>(split) * a.B + b) * a.Hq + hq;
            store_row<float, VEC, C>(a.part_o + row * a.D, li, L, a.D, acc[h], any ? 1.f / l[h] : 0.f);
            if (li == 0) a.part_lse[row] = any ? m[h] + log2f(l[h]) : -INFINITY;
        }
    }
}

// out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse): each split's partial is already
// normalised by its own denominator, so its weight is its share of the total exp-sum.
template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) paged_attention_merge_kernel(MergeArgs a) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = a.B * a.Hq;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int64_t b = row / a.Hq, hq = row - b * a.Hq;
    float mx = -INFINITY;
    for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, a.part_lse[s * rows + row]);
    // mx is finite unless no split saw a key (only for a bad length / page id on CUDA): then zeros.
    float wsum = 0.f;
    for (int s = 0; s < a.splits; ++s) {
        const float ls = a.part_lse[s * rows + row];
        if (ls != -INFINITY) wsum += exp2f(ls - mx);
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* op = static_cast<T*>(a.out) + b * a.o_sb + hq * a.o_sh;
    for (int64_t d = lane; d < a.D; d += 32) {
        float o = 0.f;
        for (int s = 0; s < a.splits; ++s) {
            const float ls = a.part_lse[s * rows + row];
            if (ls == -INFINITY) continue;  // empty split: its partial row holds nothing
            o += exp2f(ls - mx) * a.part_o[(s * rows + row) * a.D + d];
        }
        op[d] = nf::from_float<T>(o * inv);
    }
}

// Bit-exact copy of one (token, KV head) row of k and of v into its cache slot. W is an unsigned
// word of the element size: copying bits (not converting) keeps every value, NaN payloads included.
template <typename W, int VEC>
__global__ void __launch_bounds__(32 * kWriteWarps) paged_kv_write_kernel(WriteArgs a) {
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

bool valid_dtype(int d) { return d == nf::kFloat32 || d == nf::kFloat16 || d == nf::kBFloat16; }

int elem_size(int dtype) { return dtype == nf::kFloat32 ? 4 : 2; }

bool aligned_rows(int vec, const void* const* ptrs, int nptrs, const int64_t* strides, int nstrides) {
    for (int i = 0; i < nptrs; ++i)
        if (!nf::aligned_to(ptrs[i], 16)) return false;
    for (int i = 0; i < nstrides; ++i)
        if (strides[i] % vec != 0) return false;
    return true;
}

int pow2_at_least(int64_t x) {
    int p = 1;
    while (p < x) p <<= 1;
    return p;
}

}  // namespace

extern "C" {

// q (B, Hq, D) at strides (q_sb, q_sh); k_cache, v_cache (num_pages, page_size, Hkv, D) at strides
// (sp, ss, sh), last dims contiguous, all of `dtype`. block_table int32 at (bt_sb, bt_sp); seq_lens
// int32 (B,) at sl_s, each in [1, max_pages * page_size], with the entries of every page read in
// [0, num_pages) (the caller checks that where it can; otherwise lengths are clamped and keys in
// out-of-pool pages dropped, so bad values never fault). window < 0: none. num_splits == 1: out (B, Hq, D) of
// `dtype` at (o_sb, o_sh) directly; num_splits > 1: partial_out (S, B, Hq, D) and partial_lse
// (S, B, Hq) fp32 contiguous scratch, then the merge into out.
int nf_paged_attention_fwd(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const void* q, int64_t q_sb,
                           int64_t q_sh, const void* k_cache, int64_t k_sp, int64_t k_ss, int64_t k_sh,
                           const void* v_cache, int64_t v_sp, int64_t v_ss, int64_t v_sh, int64_t num_pages,
                           int64_t page_size, const int* block_table, int64_t bt_sb, int64_t bt_sp, int64_t max_pages,
                           const int* seq_lens, int64_t sl_s, int64_t window, float scale, int64_t num_splits,
                           float* partial_out, float* partial_lse, void* out, int64_t o_sb, int64_t o_sh,
                           void* stream) {
    if (!valid_dtype(dtype) || B < 1 || Hkv < 1 || Hq < Hkv || Hq % Hkv != 0 || D < 1 || D > kMaxD ||
        num_pages < 1 || page_size < 1 || max_pages < 1 || max_pages * page_size > 0x7fffffffLL ||
        window > 0x7fffffffLL || num_splits < 1 || num_splits > 65535 || !(scale > 0.f) || q == nullptr ||
        k_cache == nullptr || v_cache == nullptr || block_table == nullptr || seq_lens == nullptr ||
        out == nullptr || (num_splits > 1 && (partial_out == nullptr || partial_lse == nullptr)))
        return nf::kInvalidArgument;
    const int64_t G = Hq / Hkv;
    if (G > 0x7fffffffLL) return nf::kInvalidArgument;
    // Query heads per warp: a K/V row in registers serves up to 4 heads (more would cost registers
    // that the 8 elements per lane of q and the accumulator already claim at D = 256).
    const int hpw = G == 1 ? 1 : G == 2 ? 2 : 4;
    const int warps = static_cast<int>(std::min<int64_t>(nf::ceil_div(G, hpw), kMaxWarps));
    const int64_t hblocks = nf::ceil_div(G, static_cast<int64_t>(hpw) * warps);
    if (B * Hkv * hblocks > 0x7fffffffLL) return nf::kInvalidArgument;

    const int vec16 = 16 / elem_size(dtype);
    const void* ptrs[] = {q, k_cache, v_cache, out};
    const int64_t strides[] = {q_sb, q_sh, k_sp, k_ss, k_sh, v_sp, v_ss, v_sh, o_sb, o_sh};
    // The fp32 partial rows take packs of VEC floats: D % VEC == 0 keeps them aligned too.
    const bool vec = D % vec16 == 0 && aligned_rows(vec16, ptrs, 4, strides, 10) && nf::aligned_to(partial_out, 32);
    int chunks_per_lane, lanes;
    if (vec) {
        const int64_t chunks = D / vec16;
        chunks_per_lane = chunks <= 32 ? 1 : 2;  // D <= 256: at most 64 chunks (fp32)
        lanes = chunks <= 32 ? pow2_at_least(chunks) : 32;
    } else {
        chunks_per_lane = 8;  // scalar path: up to 8 elements per lane (D <= 256)
        lanes = pow2_at_least(nf::ceil_div(D, 8));
    }

    AttnArgs a{};
    a.q = q;
    a.q_sb = q_sb;
    a.q_sh = q_sh;
    a.k = k_cache;
    a.k_sp = k_sp;
    a.k_ss = k_ss;
    a.k_sh = k_sh;
    a.v = v_cache;
    a.v_sp = v_sp;
    a.v_ss = v_ss;
    a.v_sh = v_sh;
    a.block_table = block_table;
    a.bt_sb = bt_sb;
    a.bt_sp = bt_sp;
    a.seq_lens = seq_lens;
    a.sl_s = sl_s;
    a.out = out;
    a.o_sb = o_sb;
    a.o_sh = o_sh;
    a.part_o = partial_out;
    a.part_lse = partial_lse;
    a.B = B;
    a.Hq = Hq;
    a.Hkv = Hkv;
    a.D = D;
    a.num_pages = num_pages;
    a.max_len = static_cast<int>(max_pages * page_size);
    a.group = static_cast<int>(G);
    a.heads_per_block = hpw * warps;
    a.hblocks = static_cast<int>(hblocks);
    a.page_size = static_cast<int>(page_size);
    a.window = window < 0 ? -1 : static_cast<int>(window);
    a.splits = static_cast<int>(num_splits);
    a.lanes = lanes;
    a.qscale = scale * kLog2e;
    const dim3 grid(static_cast<unsigned>(B * Hkv * hblocks), static_cast<unsigned>(num_splits));
    const dim3 block(32 * warps);

    auto run = [&](auto t) -> int {
        using T = decltype(t);
        auto by_heads = [&](auto vv, auto cc) -> int {
            constexpr int VEC = decltype(vv)::value, C = decltype(cc)::value;
            switch (hpw) {
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
    switch (dtype) {
        case nf::kFloat32: err = run(float{}); break;
        case nf::kFloat16: err = run(__half{}); break;
        default: err = run(__nv_bfloat16{}); break;
    }
    if (err != 0 || num_splits == 1) return err;

    MergeArgs mg{};
    mg.part_o = partial_out;
    mg.part_lse = partial_lse;
    mg.out = out;
    mg.o_sb = o_sb;
    mg.o_sh = o_sh;
    mg.B = B;
    mg.Hq = Hq;
    mg.D = D;
    mg.splits = static_cast<int>(num_splits);
    const dim3 mgrid(static_cast<unsigned>(nf::ceil_div(B * Hq, kMergeWarps)));
    switch (dtype) {
        case nf::kFloat32: return nf::launch(paged_attention_merge_kernel<float>, mgrid, dim3(32 * kMergeWarps), stream, mg);
        case nf::kFloat16: return nf::launch(paged_attention_merge_kernel<__half>, mgrid, dim3(32 * kMergeWarps), stream, mg);
        default: return nf::launch(paged_attention_merge_kernel<__nv_bfloat16>, mgrid, dim3(32 * kMergeWarps), stream, mg);
    }
}

// k, v (N, Hkv, D) at strides (sn, sh); caches (num_pages, page_size, Hkv, D) at (sp, ss, sh), last dims
// contiguous, all of `dtype`. slot_mapping (N,) contiguous int32 (slot_is_int64 = 0) or int64: slot =
// page * page_size + offset, negative slots skipped, slots >= num_pages * page_size skipped too (the
// caller reports them where it can check without a sync). Tokens mapping to the same slot race: the caller must not pass duplicates.
int nf_paged_kv_write(int dtype, int64_t N, int64_t Hkv, int64_t D, const void* k, int64_t k_sn, int64_t k_sh,
                      const void* v, int64_t v_sn, int64_t v_sh, void* k_cache, int64_t kc_sp, int64_t kc_ss,
                      int64_t kc_sh, void* v_cache, int64_t vc_sp, int64_t vc_ss, int64_t vc_sh, int64_t num_pages,
                      int64_t page_size, const void* slot_mapping, int slot_is_int64, void* stream) {
    if (!valid_dtype(dtype) || N < 1 || Hkv < 1 || D < 1 || num_pages < 1 || page_size < 1 || k == nullptr ||
        v == nullptr || k_cache == nullptr || v_cache == nullptr || slot_mapping == nullptr ||
        nf::ceil_div(N * Hkv, kWriteWarps) > 0x7fffffffLL)
        return nf::kInvalidArgument;
    WriteArgs a{};
    a.k = k;
    a.k_sn = k_sn;
    a.k_sh = k_sh;
    a.v = v;
    a.v_sn = v_sn;
    a.v_sh = v_sh;
    a.kc = k_cache;
    a.kc_sp = kc_sp;
    a.kc_ss = kc_ss;
    a.kc_sh = kc_sh;
    a.vc = v_cache;
    a.vc_sp = vc_sp;
    a.vc_ss = vc_ss;
    a.vc_sh = vc_sh;
    a.N = N;
    a.Hkv = Hkv;
    a.D = D;
    a.num_pages = num_pages;
    a.page_size = page_size;
    a.slots = slot_mapping;
    a.slots64 = slot_is_int64 != 0;
    const int es = elem_size(dtype), vec = 16 / es;
    const void* ptrs[] = {k, v, k_cache, v_cache};
    const int64_t strides[] = {k_sn, k_sh, v_sn, v_sh, kc_sp, kc_ss, kc_sh, vc_sp, vc_ss, vc_sh};
    const bool vec_ok = D % vec == 0 && aligned_rows(vec, ptrs, 4, strides, 10);
    const dim3 grid(static_cast<unsigned>(nf::ceil_div(N * Hkv, kWriteWarps))), block(32 * kWriteWarps);
    if (es == 4)
        return vec_ok ? nf::launch(paged_kv_write_kernel<uint32_t, 4>, grid, block, stream, a)
                      : nf::launch(paged_kv_write_kernel<uint32_t, 1>, grid, block, stream, a);
    return vec_ok ? nf::launch(paged_kv_write_kernel<uint16_t, 8>, grid, block, stream, a)
                  : nf::launch(paged_kv_write_kernel<uint16_t, 1>, grid, block, stream, a);
}

const char* nf_paged_attention_error_string(int code) { return nf::error_string(code); }

}  // extern "C"
