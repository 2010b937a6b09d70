// cuda_emu.h: run plain SIMT CUDA kernels on the CPU, from the same .cu source nvcc compiles.
//
// Why: the machines that build and test nanofast have no GPU. A kernel that is only compiled is
// untested code, so every csrc/*.cu is also compiled with g++ -std=c++20 against this header and
// executed by the test suite. The model is deliberately literal rather than fast:
//
//   * one std::thread per CUDA thread of a block: a pool of blockDim threads is created per launch
//     and reused for every block; blocks run one after another (x fastest, then y, then z);
//   * __syncthreads() is a block-wide barrier; a thread that has returned from the kernel stops
//     counting towards it, as on Volta+ hardware (so `if (row >= n) return;` before a barrier works);
//   * __shared__ becomes `static`: valid because only one block is resident at a time, and launches
//     are serialised process-wide;
//   * warp shuffles go through a per-warp exchange buffer between two phases of a per-warp barrier,
//     so only the 32 lanes of a warp must be converged (the contract of the *_sync intrinsics).
//     Shuffles must name every live lane of the warp in `mask` and read only live lanes; anything
//     else is undefined behaviour on the GPU and aborts the launch here with a message;
//   * threadIdx / blockIdx / blockDim / gridDim are thread_local;
//   * __half / __nv_bfloat16 are 16-bit storage types with the cuda_fp16.h / cuda_bf16.h conversion
//     functions (round-to-nearest-even, IEEE subnormals, inf/NaN). They deliberately have no
//     arithmetic operators: kernels convert to fp32 on load, which is what they should do anyway;
//   * a watchdog aborts a launch whose threads make no progress (a barrier reached by only part of
//     a block, a shuffle inside divergent code) instead of hanging the test suite.
//
// Not modelled: dynamic (extern) shared memory, partial-warp masks, atomics, tensor-core / async
// copy intrinsics, concurrency between blocks. Kernels needing those belong in Triton.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h emulates the CUDA runtime on the CPU; it must not be included when compiling with nvcc"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

// ---------------------------------------------------------------- qualifiers and builtin types
#define __global__
#define __device__
#define __host__
#define __noinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block is resident at a time, so function-scope statics are a faithful model of per-block
// shared memory (uninitialised contents carry over between blocks, as they may on the GPU).
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

using cudaStream_t = void*;

// ---------------------------------------------------------------- device math the kernels use
// Exact 1/sqrt: the GPU's rsqrtf is within 2 ulp of this, far inside every test budget.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
template <typename T> inline T __ldg(const T* p) { return *p; }
// CUDA declares integer/float min/max overloads in the global namespace; g++ has none there.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }

// ---------------------------------------------------------------- 16-bit float storage types
struct __half {
    std::uint16_t __x;
};
struct __nv_bfloat16 {
    std::uint16_t __x;
};

inline float __half2float(__half h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h.__x & 0x8000u) << 16;
    const std::uint32_t exp = (h.__x >> 10) & 0x1fu;
    const std::uint32_t mant = h.__x & 0x3ffu;
    if (exp == 0) {
        // Subnormal (or zero): mant * 2^-24 is exact in fp32.
        const float mag = std::ldexp(static_cast<float>(mant), -24);
        return std::bit_cast<float>(std::bit_cast<std::uint32_t>(mag) | sign);
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / NaN (payload kept)
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));          // rebias 15 -> 127
}

inline __half __float2half_rn(float f) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    std::uint16_t out;
    if (u >= 0x47800000u) {  // |f| >= 65536 (or inf/NaN): overflows half
        out = u > 0x7f800000u ? 0x7fffu : 0x7c00u;  // CUDA returns the canonical NaN 0x7fff
    } else if (u < 0x38800000u) {
        // Below 2^-14 the result is a half subnormal: adding 0.5 lines the 2^-24 quantum up with the
        // fp32 mantissa LSB, so the FPU's own round-to-nearest-even does the rounding.
        const float sum = std::bit_cast<float>(u) + 0.5f;
        out = static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(sum) - 0x3f000000u);
    } else {
        // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even; a carry
        // out of the mantissa correctly bumps the exponent (up to inf for [65520, 65536)).
        const std::uint32_t odd = (u >> 13) & 1u;
        u += 0xc8000fffu + odd;  // (15 - 127) << 23 plus the rounding bias, modulo 2^32
        out = static_cast<std::uint16_t>(u >> 13);
    }
    return __half{static_cast<std::uint16_t>(out | sign)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};  // canonical NaN, as CUDA
    const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);      // nearest even on the low 16 bits
    return __nv_bfloat16{static_cast<std::uint16_t>(rounded >> 16)};
}

// ---------------------------------------------------------------- the emulated launch
namespace emu {

struct Aborted {};  // thrown inside worker threads to unwind a launch that was aborted

struct Launch;
inline thread_local Launch* tl_launch = nullptr;
inline thread_local int tl_tid = 0;  // linear thread index within the block

// A reusable barrier whose party count shrinks when a thread exits the kernel (CUDA counts exited
// threads as arrived). Arrival is under a mutex; waiting is a futex wait on the generation counter.
struct Barrier {
    std::mutex m;
    int expected = 0;
    int arrived = 0;
    std::atomic<std::uint32_t> gen{0};

    // Caller holds `m`. Opens the current phase.
    void release_locked() {
        arrived = 0;
        gen.fetch_add(1, std::memory_order_release);
    }
};

struct Launch {
    dim3 grid, block;
    int nthreads = 0, nwarps = 0;
    Barrier block_bar;                          // __syncthreads
    std::unique_ptr<Barrier[]> warp_bar;        // shuffles / __syncwarp, one per warp
    Barrier end_bar;                            // between blocks: fixed party count, never shrinks
    std::vector<std::uint64_t> exchange;        // one shuffle slot per thread
    std::unique_ptr<std::atomic<bool>[]> live;  // thread still inside the kernel for this block
    std::atomic<bool> abort{false};
    std::atomic<std::uint64_t> progress{0};
    std::mutex err_m;
    std::string error;

    int lanes_in_warp(int w) const { return std::min(32, nthreads - 32 * w); }

    void fail(const std::string& msg) {
        {
            std::lock_guard<std::mutex> g(err_m);
            if (error.empty()) error = msg;
        }
        abort.store(true);
    }

    // Wake every waiter so it observes `abort` (bumping the generation under the lock closes the
    // window between a waiter's abort check and its wait).
    void wake_all() {
        auto bump = [](Barrier& b) {
            {
                std::lock_guard<std::mutex> g(b.m);
                b.gen.fetch_add(1, std::memory_order_release);
            }
            b.gen.notify_all();
        };
        bump(block_bar);
        bump(end_bar);
        for (int w = 0; w < nwarps; ++w) bump(warp_bar[w]);
    }

    void arrive_and_wait(Barrier& b, void (*on_complete)(Launch&) = nullptr) {
        std::unique_lock<std::mutex> lk(b.m);
        if (abort.load()) throw Aborted{};
        if (++b.arrived >= b.expected) {
            if (on_complete) on_complete(*this);
            b.release_locked();
            progress.fetch_add(1, std::memory_order_relaxed);
            lk.unlock();
            b.gen.notify_all();
            return;
        }
        const std::uint32_t g = b.gen.load(std::memory_order_relaxed);
        lk.unlock();
        while (b.gen.load(std::memory_order_acquire) == g) b.gen.wait(g, std::memory_order_acquire);
        if (abort.load()) throw Aborted{};
    }

    // The calling thread leaves the kernel: it no longer holds back barriers of this block.
    void drop(Barrier& b) {
        std::unique_lock<std::mutex> lk(b.m);
        --b.expected;
        if (b.arrived > 0 && b.arrived >= b.expected) {
            b.release_locked();
            progress.fetch_add(1, std::memory_order_relaxed);
            lk.unlock();
            b.gen.notify_all();
        }
    }

    // Runs once per block boundary with every thread parked at end_bar: re-arm the block's barriers.
    static void reset_block(Launch& L) {
        L.block_bar.expected = L.nthreads;
        L.block_bar.arrived = 0;
        for (int w = 0; w < L.nwarps; ++w) {
            L.warp_bar[w].expected = L.lanes_in_warp(w);
            L.warp_bar[w].arrived = 0;
        }
        for (int t = 0; t < L.nthreads; ++t) L.live[t].store(true, std::memory_order_relaxed);
    }
};

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

inline std::string& last_error_storage() {
    static std::string s;
    return s;
}

// Message of the most recent failed launch ("" if none failed yet).
inline const char* last_error() { return last_error_storage().c_str(); }

inline Launch& current() {
    Launch* L = tl_launch;
    if (L == nullptr) {
        std::fprintf(stderr, "cuda_emu: device intrinsic called outside an emulated kernel launch\n");
        std::abort();
    }
    return *L;
}

template <typename T, typename SrcFn>
T shuffle(unsigned mask, T var, int width, const char* name, SrcFn src_of) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "emulated shuffles carry at most 8 bytes");
    Launch& L = current();
    const int lane = tl_tid & 31, warp = tl_tid >> 5;
    const int lanes = L.lanes_in_warp(warp);
    const unsigned live_mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    if ((mask & live_mask) != live_mask) {
        L.fail(std::string(name) + ": mask must include every lane of the warp (partial masks are not emulated)");
        throw Aborted{};
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        L.fail(std::string(name) + ": width must be a power of two in [1, 32]");
        throw Aborted{};
    }
    std::memcpy(&L.exchange[tl_tid], &var, sizeof(T));
    L.arrive_and_wait(L.warp_bar[warp]);  // phase 1: every live lane has published its value
    // PTX shfl semantics: each lane reads within its own width-sized segment; a source outside the
    // segment (or past the shift) yields the lane's own value.
    const int seg_lo = lane & ~(width - 1), seg_hi = seg_lo + width - 1;
    int src = src_of(lane, seg_lo);
    if (src < seg_lo || src > seg_hi) src = lane;
    T out = var;
    if (src != lane) {
        if (src >= lanes || !L.live[warp * 32 + src].load()) {
            L.fail(std::string(name) + ": reads a lane that has exited or does not exist (undefined on the GPU)");
            throw Aborted{};
        }
        std::memcpy(&out, &L.exchange[warp * 32 + src], sizeof(T));
    }
    L.arrive_and_wait(L.warp_bar[warp]);  // phase 2: nobody overwrites a slot before all have read it
    return out;
}

// Launch `kernel` over `grid` x `block` on CPU threads. Returns 0, or 1 with last_error() set.
template <typename... KArgs, typename... Args>
int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args&&... args) {
    std::lock_guard<std::mutex> serial(launch_mutex());  // statics model shared memory: one launch at a time
    const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
    const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    if (nthreads < 1 || nthreads > 1024 || nblocks < 1) {
        last_error_storage() = "invalid launch configuration: block must hold 1..1024 threads and the grid >= 1 block";
        return 1;
    }
    Launch L;
    L.grid = grid;
    L.block = block;
    L.nthreads = static_cast<int>(nthreads);
    L.nwarps = static_cast<int>((nthreads + 31) / 32);
    L.warp_bar = std::make_unique<Barrier[]>(L.nwarps);
    L.exchange.assign(L.nwarps * 32, 0);
    L.live = std::make_unique<std::atomic<bool>[]>(L.nthreads);
    L.end_bar.expected = L.nthreads;
    Launch::reset_block(L);

    // Each CUDA thread gets its own copy of the (converted) parameters, as kernel parameters are.
    const std::tuple<KArgs...> params(std::forward<Args>(args)...);
    std::atomic<int> finished{0};
    std::mutex done_m;
    std::condition_variable done_cv;

    auto worker = [&](int t) {
        tl_launch = &L;
        tl_tid = t;
        threadIdx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                          static_cast<unsigned>(t / (block.x * block.y))};
        blockDim = block;
        gridDim = grid;
        try {
            for (long long b = 0; b < nblocks; ++b) {
                blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                                 static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y))};
                std::tuple<KArgs...> mine = params;
                std::apply(kernel, mine);
                // Leaving the kernel: mark the shuffle slot dead first, then stop holding back barriers.
                L.live[t].store(false);
                L.drop(L.warp_bar[t >> 5]);
                L.drop(L.block_bar);
                L.arrive_and_wait(L.end_bar, &Launch::reset_block);
            }
        } catch (const Aborted&) {
        } catch (const std::exception& e) {
            L.fail(std::string("exception in emulated kernel: ") + e.what());
        } catch (...) {
            L.fail("unknown exception in emulated kernel");
        }
        if (L.abort.load()) L.wake_all();
        tl_launch = nullptr;
        {
            std::lock_guard<std::mutex> g(done_m);
            finished.fetch_add(1);
        }
        done_cv.notify_all();
    };

    std::vector<std::thread> pool;
    pool.reserve(L.nthreads);
    try {
        for (int t = 0; t < L.nthreads; ++t) pool.emplace_back(worker, t);
    } catch (const std::exception& e) {
        L.fail(std::string("could not start emulation threads: ") + e.what());
        L.wake_all();
    }

    // Watchdog: a block whose threads stop passing barriers for this long is deadlocked (a barrier
    // in divergent code waits forever on the GPU too); abort it with a message instead of hanging.
    double timeout_s = 60.0;
    if (const char* env = std::getenv("NANOFAST_EMU_TIMEOUT_S")) timeout_s = std::atof(env);
    auto last_change = std::chrono::steady_clock::now();
    std::uint64_t last_progress = L.progress.load();
    {
        std::unique_lock<std::mutex> lk(done_m);
        while (finished.load() < static_cast<int>(pool.size())) {
            done_cv.wait_for(lk, std::chrono::milliseconds(100));
            const std::uint64_t p = L.progress.load();
            const auto now = std::chrono::steady_clock::now();
            if (p != last_progress) {
                last_progress = p;
                last_change = now;
            } else if (std::chrono::duration<double>(now - last_change).count() > timeout_s) {
                lk.unlock();
                L.fail("deadlock: no thread passed a barrier for " + std::to_string(timeout_s) +
                       " s (a __syncthreads or shuffle reached by only part of the block/warp?)");
                L.wake_all();
                lk.lock();
                last_change = now;
            } else if (L.abort.load()) {
                lk.unlock();
                L.wake_all();
                lk.lock();
            }
        }
    }
    for (auto& th : pool) th.join();
    if (!L.error.empty()) {
        last_error_storage() = L.error;
        return 1;
    }
    return 0;
}

}  // namespace emu

// ---------------------------------------------------------------- intrinsics
inline void __syncthreads() {
    emu::Launch& L = emu::current();
    L.arrive_and_wait(L.block_bar);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    (void)mask;
    emu::Launch& L = emu::current();
    L.arrive_and_wait(L.warp_bar[emu::tl_tid >> 5]);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return emu::shuffle(mask, var, width, "__shfl_sync",
                        [&](int, int seg_lo) { return seg_lo + (src_lane & (width - 1)); });
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return emu::shuffle(mask, var, width, "__shfl_xor_sync", [&](int lane, int) { return lane ^ lane_mask; });
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return emu::shuffle(mask, var, width, "__shfl_down_sync",
                        [&](int lane, int) { return lane + static_cast<int>(delta); });
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return emu::shuffle(mask, var, width, "__shfl_up_sync",
                        [&](int lane, int) { return lane - static_cast<int>(delta); });
}
