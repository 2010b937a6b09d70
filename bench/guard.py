"""The throughput guard's checks: same-run speed ratios, machine-code facts, GPU peak fractions.

Run through pytest (`pytest bench -m guard`, see bench/test_guard.py); this module holds the
measurements and the checks so tests/test_bench_guard.py can exercise them directly.

Ratios, not times: a noisy 2-core CI machine cannot hold an absolute time, but it can hold "the
fused path is faster than the unfused one" measured in the same process, A and B interleaved
(ABBA ...: drift and a neighbour's load hit both alike), compared by medians, with a floor set well
below the worst ratio observed (0.5 x the worst of several runs). A failing ratio is measured once
more before the check fails, so one unlucky burst cannot fail CI while a real regression (which is
slow every time) still does.
"""
from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class GuardFailure(AssertionError):
    """A guard check failed; the message names the benchmark or kernel config and the numbers."""


# --------------------------------------------------------------------------------------------
# Ratios measured in the same run
# --------------------------------------------------------------------------------------------

@dataclass
class RatioResult:
    """Interleaved timings of a fast and a slow implementation and the ratio of their medians."""
    name: str
    fast_label: str
    slow_label: str
    fast_s: list[float]
    slow_s: list[float]

    @property
    def fast_median(self) -> float:
        return statistics.median(self.fast_s)

    @property
    def slow_median(self) -> float:
        return statistics.median(self.slow_s)

    @property
    def ratio(self) -> float:
        """How many times faster the fast implementation is (slow median / fast median)."""
        return self.slow_median / self.fast_median

    def describe(self) -> str:
        return (f"{self.name}: {self.fast_label} {1e3 * self.fast_median:.2f} ms vs {self.slow_label} "
                f"{1e3 * self.slow_median:.2f} ms (medians of {len(self.fast_s)} interleaved repetitions) = "
                f"{self.ratio:.2f}x")

    def as_dict(self) -> dict:
        return {"name": self.name, "fast": self.fast_label, "slow": self.slow_label, "ratio": self.ratio,
                "fast_median_s": self.fast_median, "slow_median_s": self.slow_median, "repetitions": len(self.fast_s)}


def measure_ratio(name: str, fast: Callable[[], object], slow: Callable[[], object], reps: int,
                  fast_label: str = "fast", slow_label: str = "slow", warmup: int = 1) -> RatioResult:
    """Time `fast` and `slow` `reps` times each, interleaved A B B A A B ... (each order equally
    often, so neither always runs right after the other); medians are robust to bursts."""
    for _ in range(warmup):
        fast()
        slow()
    gc.collect()
    times: dict[str, list[float]] = {"fast": [], "slow": []}
    pairs = (("fast", fast), ("slow", slow))
    for i in range(reps):
        for label, fn in (pairs if i % 2 == 0 else pairs[::-1]):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return RatioResult(name, fast_label, slow_label, times["fast"], times["slow"])


@dataclass(frozen=True)
class RatioCase:
    """One guarded ratio: `make()` returns (fast, slow) callables; the check wants ratio >= floor."""
    name: str
    fast_label: str
    slow_label: str
    floor: float
    reps: int
    make: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    measured: str  # what was observed when the floor was set (for the failure message)
    # torch threads while measuring: one thread is not slowed by a neighbour process taking the
    # other core (a 2-thread op waits for its slower half); None keeps the process's setting.
    threads: int | None = 1


def check_ratio(case: RatioCase, fast: Callable[[], object] | None = None, slow: Callable[[], object] | None = None,
                attempts: int = 2) -> RatioResult:
    """Measure `case` (or the given implementations under its name and floor); GuardFailure when
    the ratio is below the floor in every one of `attempts` measurements."""
    if fast is None or slow is None:
        made = case.make()
        fast, slow = fast or made[0], slow or made[1]
    import torch

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(case.threads or before)
    try:
        for _ in range(attempts):
            result = measure_ratio(case.name, fast, slow, case.reps, case.fast_label, case.slow_label)
            if result.ratio >= case.floor:
                return result
            seen.append(result)
    finally:
        torch.set_num_threads(before)
    raise GuardFailure(f"ratio below its floor: {case.name} needs {case.fast_label} >= {case.floor:.2f}x faster than "
                       f"{case.slow_label}; measured " + "; then ".join(r.describe() for r in seen)
                       + f" (when the floor was set: {case.measured})")


# The implementations: the benchmarks' own workloads (bench/workloads.py), small sizes so the whole
# guard takes seconds.

def _prologue_pair():
    import torch

    from bench.workloads import unfused_prologue
    from nanofast.kernels.newton_schulz import nesterov_normalize_

    gen = torch.Generator().manual_seed(0)
    g, m = (torch.randn((4, 512, 2048), generator=gen) for _ in range(2))
    # Both update g and m in place (lerps toward each other): the values stay bounded over reps.
    return (lambda: nesterov_normalize_(g, m, 0.95, dtype=torch.float32, backend="torch"),
            lambda: unfused_prologue(g, m, 0.95, torch.float32))


def _engine_pair():
    import torch

    from bench.workloads import offline_throughput
    from nanofast.engine import SamplingParams
    from nanofast.model import GPT, config_for_depth

    torch.manual_seed(0)
    model = GPT(config_for_depth(2, 4096, 256, head_dim=64), compute_dtype=torch.float32)
    model.init_weights()
    model.eval()
    rng = random.Random(0)  # 8 requests of mixed prompt lengths, 16 greedy tokens each: ~0.3 s one at a time
    requests = [([1] + [rng.randrange(2, 4096) for _ in range(rng.randint(8, 48))],
                 SamplingParams(max_tokens=16, temperature=0.0)) for _ in range(8)]
    return (lambda: offline_throughput(model, requests, one_at_a_time=False),
            lambda: offline_throughput(model, requests, one_at_a_time=True))


def _tokenizer_pair():
    from bench.workloads import split_documents, tokenizer_sources
    from nanofast.tokenizer import Tokenizer

    sources = tokenizer_sources()
    tok = Tokenizer.train(sources[:4], vocab_size=1024)  # a small vocab trains in a fraction of a second
    docs = split_documents("\n".join(sources))
    return (lambda: tok.encode(docs, prepend="<|bos|>"),
            lambda: [[tok.bos_token_id] + tok.encode(d) for d in docs])


def paged_decode_loop(q, k_cache, v_cache, block_table, seq_lens):
    """Paged decode one sequence at a time (what a caller without a batched kernel writes): each
    sequence's own pages only, so no padding, but one call per sequence."""
    import torch

    from nanofast.kernels.paged_attention import paged_decode_attention_reference

    page = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = -(-int(seq_lens[b]) // page)
        outs.append(paged_decode_attention_reference(q[b:b + 1], k_cache, v_cache, block_table[b:b + 1, :n],
                                                     seq_lens[b:b + 1]))
    return torch.cat(outs)


def _paged_decode_pair():
    import torch

    from nanofast.kernels.paged_attention import paged_decode_attention_reference

    gen = torch.Generator().manual_seed(0)
    B, page, hq, hkv, d = 32, 16, 8, 2, 64
    lens = torch.randint(16, 257, (B,), generator=gen, dtype=torch.int32)  # a serving batch's mixed contexts
    pages = -(-int(lens.max()) // page)
    num_pages = B * pages + 4
    k_cache, v_cache = (torch.randn((num_pages, page, hkv, d), generator=gen) for _ in range(2))
    block_table = torch.randperm(num_pages, generator=gen)[:B * pages].view(B, pages).to(torch.int32)
    q = torch.randn((B, hq, d), generator=gen)
    args = (q, k_cache, v_cache, block_table, lens)
    torch.testing.assert_close(paged_decode_loop(*args), paged_decode_attention_reference(*args))
    return (lambda: paged_decode_attention_reference(*args), lambda: paged_decode_loop(*args))


def _train_step_pair():
    import torch

    from nanofast.model import GPT, config_for_depth
    from nanofast.optim import MuonAdamW

    def make(compiled: bool):
        torch.manual_seed(0)
        model = GPT(config_for_depth(1, 2048, 128, head_dim=64), compute_dtype=torch.float32)
        model.init_weights()
        opt = MuonAdamW(model.param_groups())
        run = torch.compile(model, dynamic=False) if compiled else model
        x = torch.randint(0, 2048, (4, 128))

        def step():
            run(x, x).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        return step

    return make(True), make(False)


# Floors: 0.5 x the worst ratio observed on the 2-core CPU machine (load average 4-5 from other
# processes while measuring), rounded down; `measured` lists what was seen (1 torch thread).
RATIO_CASES: dict[str, RatioCase] = {c.name: c for c in [
    # On CPU at one thread the fused torch formulation is only about as fast as the unfused steps
    # (both are bandwidth-bound at this size), so this floor catches a >3x regression of the fused
    # path, not a lost 10%: the GPU peak-fraction checks guard the Triton kernel itself.
    RatioCase("muon_prologue", "nesterov_normalize_ (fused, torch backend)", "unfused prologue", floor=0.3, reps=15,
              make=_prologue_pair, measured="0.72, 1.04, 1.13, 0.85, 1.27, 0.76, 1.39 (and 0.65-1.39 at 2 threads); ~8-16 ms vs ~7-20 ms"),
    RatioCase("paged_engine", "paged engine, 8 requests batched", "one request at a time", floor=1.5, reps=5,
              make=_engine_pair, measured="4.82, 4.19, 4.89, 5.13, 3.12, 4.46, 4.29; ~50-70 ms vs ~210-230 ms"),
    # The batch runs on 2 threads: with the other core busy it gains nothing, hence a low floor.
    RatioCase("tokenizer_batch", "batched encode", "encode loop", floor=0.4, reps=7,
              make=_tokenizer_pair, measured="1.24, 1.20, 0.92, 0.94, 0.96, 0.89, 1.02, 1.17, 1.49, 1.49; ~60-80 ms vs ~65-85 ms"),
    RatioCase("paged_decode", "batched-gather paged decode reference", "per-sequence loop", floor=0.8, reps=15,
              make=_paged_decode_pair, measured="1.77, 1.71, 1.66, 1.72, 2.01, 2.03, 1.87 (3.2-4.9 at 2 threads); ~6 ms vs ~10-13 ms"),
    # The first call compiles (~30 s on 2 cores): the largest part of the guard's run time.
    RatioCase("train_step_compiled", "torch.compile'd train step", "eager train step", floor=0.55, reps=7,
              make=_train_step_pair,
              measured="1.78, 1.80, 1.75, 1.74, 1.53, 1.19, 1.11; ~20 ms vs ~22-38 ms (depth 1, B4 x T128)"),
]}


# --------------------------------------------------------------------------------------------
# Machine-code facts against the committed table
# --------------------------------------------------------------------------------------------

REGISTER_MARGIN = 8  # registers may grow by max(8, 10%) (an allocation wobble), not more
REGISTER_MARGIN_FRACTION = 0.10
TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "HMMA")  # a kernel that had tensor-core MMAs must keep them
# 128-bit loads, cp.async tile loads, stores, TMA tile loads and stores
VECTOR_OPS = ("LDG.E.128", "LDGSTS.E.BYPASS.128", "STG.E.128", "UTMALDG", "UTMASTG")


def register_limit(before: int) -> int:
    """The most registers a config may use now, given the table's count."""
    return before + max(REGISTER_MARGIN, math.ceil(REGISTER_MARGIN_FRACTION * before))


def facts_problems(key: str, now: dict, before: dict | None) -> list[str]:
    """What is wrong with one config's current facts `now` against the table's `before`."""
    problems = []
    ins = now.get("instructions", {})
    # Triton: spills land in the stack frame (cuobjdump's STACK) or LOCAL; CUDA kernels may have a
    # legitimate stack frame, so there ptxas's spill byte counts decide. STL is a spill store in both.
    triton_frame = now.get("local_bytes", 0) + now.get("stack_bytes", 0) if now.get("source") != "cuda" else 0
    spill_bytes, stl = now.get("spill_bytes", 0), ins.get("STL", 0)
    if triton_frame > 0 or spill_bytes > 0 or stl > 0:
        problems.append(f"{key}: spills registers (local {now.get('local_bytes', 0)} B, stack {now.get('stack_bytes', 0)} B, "
                        f"spill {spill_bytes} B, STL x{stl}; registers {now.get('registers')})")
    if before is None:
        return problems
    limit = register_limit(before["registers"])
    if now["registers"] > limit:
        problems.append(f"{key}: registers {before['registers']} -> {now['registers']} (allowed up to {limit})")
    was = before.get("instructions", {})
    for op in TENSOR_CORE_OPS:
        if was.get(op, 0) > 0 and ins.get(op, 0) == 0:
            problems.append(f"{key}: lost its tensor-core MMAs: {op} x{was[op]} -> x0")
    for op in VECTOR_OPS:
        if was.get(op, 0) > 0 and ins.get(op, 0) == 0:
            problems.append(f"{key}: lost its vectorised memory access: {op} x{was[op]} -> x0")
    return problems


def check_kernel_facts(current: dict[str, dict], table: dict[str, dict]) -> list[str]:
    """All problems of the current facts against the committed table (empty: the guard passes).

    A config that is new, or gone, is a problem too: the table must describe what ships, so it is
    regenerated (`python -m bench.kernel_facts --write`) in the same change that alters the configs.
    """
    problems = []
    for key, now in current.items():
        problems += facts_problems(key, now, table.get(key))
        if key not in table:
            problems.append(f"{key}: not in the committed table (registers {now['registers']}); "
                            "regenerate it with `python -m bench.kernel_facts --write`")
    for key in table.keys() - current.keys():
        problems.append(f"{key}: in the committed table but no longer compiled; regenerate the table")
    return problems


# --------------------------------------------------------------------------------------------
# GPU: fraction of the device's peak, against floors (unmeasured until the first GPU run)
# --------------------------------------------------------------------------------------------

@dataclass
class PeakResult:
    """One kernel call on a GPU: its byte/FLOP model, time, and fraction of the device's peak."""
    name: str
    seconds: float
    bytes: int
    flops: int
    peak_bytes_per_s: float | None
    peak_flops: float | None
    bound: str  # "memory" or "compute": which peak the floor is a fraction of
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if self.bound == "memory":
            return None if not self.peak_bytes_per_s else self.bytes / self.seconds / self.peak_bytes_per_s
        return None if not self.peak_flops else self.flops / self.seconds / self.peak_flops


def check_peak_fraction(result: PeakResult, floor: float | None) -> None:
    """GuardFailure when the kernel reaches less than `floor` of the peak (floor None: unmeasured)."""
    frac = result.fraction
    if floor is None or frac is None:
        return
    if frac < floor:
        raise GuardFailure(f"{result.name}: {100 * frac:.1f}% of peak {result.bound} throughput "
                           f"({1e6 * result.seconds:.1f} us per call, {result.bytes} B, {result.flops} FLOP), "
                           f"floor {100 * floor:.1f}%")
