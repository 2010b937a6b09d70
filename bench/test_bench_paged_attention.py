"""Paged KV-cache decode attention: the Triton kernel against what a user would otherwise run.

    python -m pytest bench/test_bench_paged_attention.py --benchmark-only

Implementations:
  triton  paged_decode_attention(backend="triton"): reads each sequence's pages in place
          (GQA-packed, split-KV with automatic split count).
  sdpa    the usual fallback: gather every sequence's pages into dense (B, S, Hkv, D) K/V tensors
          (k_cache[block_table]) and call torch's scaled_dot_product_attention with a length mask
          and enable_gqa=True. Pays the gather (a read + write of the whole padded KV) first.
  torch   paged_decode_attention_reference: the module's per-sequence loop (the CPU path).

On a GPU: decode shapes of a serving batch, B in {1, 16, 64} sequences of context 512 .. 8192,
D = 128, page_size 16, bf16, MHA (16 / 16 heads) and GQA (32 query / 8 kv heads). extra_info
records the bytes of K/V the attention must read (sum over sequences of L * Hkv * D * 2 tensors,
plus q and the output), the achieved GB/s against that, and the % of the device's DRAM bandwidth.

Prefill (test_bench_paged_prefill): one engine step's chunks in the engine's batched call against
one gather + SDPA per chunk, on a step of like prompts (RL) and a mixed one (prompts and tool outputs).

On CPU: only the torch paths are timed (their ratio in the same run is meaningful; absolute CPU
times say nothing about a GPU). The Triton kernel would run through the interpreter (numpy), whose
speed says nothing about the kernel, so it is not timed there; one tiny case checks, when the
interpreter is active (TRITON_INTERPRET=1 before triton is imported), that the benchmarked
call path returns the reference's result.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from nanofast import attention
from nanofast.kernels import vendor
from nanofast.kernels.backend import triton_interpreting
from nanofast.kernels.registry import OPS

from bench.gpu_peaks import bandwidth_info

pa = importlib.import_module("nanofast.kernels.paged_attention")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
PAGE_SIZE = 16

if GPU:
    SHAPES = [(b, ctx, hq, hkv, 128) for b in (1, 16, 64) for ctx in (512, 2048, 8192)
              for hq, hkv in ((16, 16), (32, 8))]
else:
    SHAPES = [(1, 256, 8, 2, 64), (4, 512, 8, 2, 64)]
IMPLS = ["triton", "sdpa", "torch"]

def make_inputs(B: int, ctx: int, hq: int, hkv: int, d: int):
    """A paged cache holding B sequences of exactly ctx tokens on shuffled pages (as a serving pool
    looks after some churn), plus a few free pages."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pages_per_seq = -(-ctx // PAGE_SIZE)
    num_pages = B * pages_per_seq + 8
    k_cache = torch.randn((num_pages, PAGE_SIZE, hkv, d), generator=g).to(DEVICE, DTYPE)
    v_cache = torch.randn((num_pages, PAGE_SIZE, hkv, d), generator=g).to(DEVICE, DTYPE)
    block_table = torch.randperm(num_pages, generator=g)[:B * pages_per_seq].view(B, pages_per_seq)
    block_table = block_table.to(DEVICE, torch.int32)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
    q = torch.randn((B, hq, d), generator=g).to(DEVICE, DTYPE)
    return q, k_cache, v_cache, block_table, seq_lens


def sdpa_gather(q, k_cache, v_cache, block_table, seq_lens):
    """Dense fallback: gather pages to (B, Hkv, S, D), mask positions >= seq_len, call SDPA."""
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    idx = block_table.long()
    k = k_cache[idx].flatten(1, 2).transpose(1, 2)  # (B, Hkv, max_pages * page, D)
    v = v_cache[idx].flatten(1, 2).transpose(1, 2)
    mask = (torch.arange(k.shape[2], device=q.device) < seq_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=hq != hkv)
    return out[:, :, 0, :]


def make_impl(impl: str):
    if impl == "triton":
        return lambda *a: pa.paged_decode_attention(*a, backend="triton")
    if impl == "sdpa":
        return sdpa_gather
    if impl == "torch":
        return lambda *a: pa.paged_decode_attention_reference(*a)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-ctx{s[1]}-q{s[2]}kv{s[3]}-D{s[4]}")
def test_bench_paged_decode(benchmark, shape, impl):
    if not GPU and impl == "triton":
        pytest.skip("triton on CPU would run Triton's interpreter, whose speed says nothing about the kernel")
    B, ctx, hq, hkv, d = shape
    if GPU and impl == "torch" and B * ctx > 16 * 2048:
        pytest.skip("the per-sequence reference loop is only timed on small batches (it syncs per sequence)")
    args = make_inputs(B, ctx, hq, hkv, d)
    fn = make_impl(impl)
    inner = 20 if GPU else 2  # calls per timed round: launch overhead and timer resolution do not dominate

    def run():
        with torch.no_grad():
            for _ in range(inner):
                out = fn(*args)
        if GPU:
            torch.cuda.synchronize()
        return out

    out = run()  # warm-up: compilation outside the timed rounds, and a correctness check
    ref = pa.paged_decode_attention_reference(*args)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    benchmark.group = f"paged decode B={B} ctx={ctx} Hq={hq} Hkv={hkv} D={d} {DEVICE}"
    benchmark.pedantic(run, rounds=10 if GPU else 3, iterations=1, warmup_rounds=1)
    nbytes = OPS["paged_attention"].cost(seq_lens=[ctx] * B, hq=hq, hkv=hkv, d=d, itemsize=args[0].element_size())["bytes"]
    info = dict(device=torch.cuda.get_device_name(0) if GPU else "cpu", dtype=str(DTYPE).replace("torch.", ""),
                batch=B, context=ctx, hq=hq, hkv=hkv, d=d, page_size=PAGE_SIZE, bytes_per_call=nbytes,
                calls_per_round=inner)
    info.update(bandwidth_info(benchmark, nbytes, inner))
    benchmark.extra_info.update(info)


GATHER_SHAPES = [(64, 8, 4, 64), (8, 32, 4, 128)]  # (sequences, pages each, Hkv, D): RL's decode batch, longer contexts


@pytest.mark.parametrize("impl", ["gather_pages", "advanced_index"])
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: f"B{s[0]}-pages{s[1]}-kv{s[2]}-D{s[3]}")
def test_bench_page_gather(benchmark, shape, impl):
    """The torch path's page gather (what the CPU decode and prefill pay per layer, for K and V):
    `gather_pages` (index_select, one block copy per page) against `cache[pages]` (advanced
    indexing, the generic element-wise index kernel)."""
    B, per_seq, hkv, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    num_pages = B * per_seq + 8
    cache = torch.randn((num_pages, PAGE_SIZE, hkv, d), generator=g).to(DEVICE, DTYPE)
    pages = torch.randperm(num_pages, generator=g)[:B * per_seq].view(B, per_seq).to(DEVICE, torch.int32)
    fn = (lambda: pa.gather_pages(cache, pages)) if impl == "gather_pages" else (lambda: cache[pages.long()])
    assert torch.equal(fn(), cache[pages.long()])

    def run():
        for _ in range(10):
            out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"page gather B={B} pages={per_seq} Hkv={hkv} D={d} {DEVICE}"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bytes_per_call=2 * cache[0].numel() * cache.element_size() * B * per_seq,
                                calls_per_round=10)


def test_triton_path_sanity_cpu():
    """The benchmarked Triton call path on a tiny case, through the interpreter (CPU only)."""
    if GPU:
        pytest.skip("on a GPU the benchmark cases themselves check the Triton path against the reference")
    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (as tests/conftest.py does)")
    args = make_inputs(2, 40, 4, 2, 64)
    for splits in (1, 3):
        out = pa.paged_decode_attention(*args, num_splits=splits, backend="triton")
        torch.testing.assert_close(out, pa.paged_decode_attention_reference(*args), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_gather(*args), pa.paged_decode_attention_reference(*args), rtol=1e-5, atol=1e-5)


# Prefill of one engine step: every chunk (new prompts, tool outputs) against its pages. `batched`
# is the engine's call (attention.paged_prefill_attention_batched: flash-attn varlen on a GPU with
# flash-attn, else SDPA per group of like shapes); `per_chunk` is what a user would otherwise
# write: one gather + SDPA per chunk (attention.paged_prefill_attention_per_chunk). Chunk lengths
# (queries, context).
if GPU:
    PREFILL_STEPS = {"rl16x256": [(256, 256)] * 16, "mixed": [(2048, 2048), (512, 512), (3, 1500), (5, 900)] * 2}
    PREFILL_HEADS = (32, 8, 128)
else:
    PREFILL_STEPS = {"rl16x64": [(64, 64)] * 16, "mixed": [(256, 256), (64, 64), (3, 200), (5, 120)] * 2}
    PREFILL_HEADS = (8, 2, 64)


def make_prefill_step(chunks: list[tuple[int, int]], hq: int, hkv: int, d: int):
    """A paged cache with each chunk's context on shuffled pages, the step's queries back to back,
    and the engine's (row, start, n) chunk list and host context lengths."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pages = [-(-ctx // PAGE_SIZE) for _, ctx in chunks]
    perm = torch.randperm(sum(pages) + 1, generator=g).tolist()
    width, rows, used = max(pages), [], 0
    for n_pages in pages:
        rows.append(perm[used:used + n_pages] + [perm[-1]] * (width - n_pages))
        used += n_pages
    block_table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    shape = (sum(pages) + 1, PAGE_SIZE, hkv, d)
    k_cache = torch.randn(shape, generator=g).to(DEVICE, DTYPE)
    v_cache = torch.randn(shape, generator=g).to(DEVICE, DTYPE)
    starts = [0]
    for n, _ in chunks:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], hq, d), generator=g).to(DEVICE, DTYPE)
    spec = [(row, starts[row], n) for row, (n, _) in enumerate(chunks)]
    return q, k_cache, v_cache, block_table, spec, [ctx for _, ctx in chunks]


@pytest.mark.parametrize("impl", ["batched", "per_chunk"])
@pytest.mark.parametrize("step", list(PREFILL_STEPS))
def test_bench_paged_prefill(benchmark, step, impl):
    chunks = PREFILL_STEPS[step]
    args = make_prefill_step(chunks, *PREFILL_HEADS)
    window = max(ctx for _, ctx in chunks)

    def run():
        with torch.no_grad():
            if impl == "batched":  # a fresh plan per call: what the step's first layer pays
                out = attention.paged_prefill_attention_batched(*args, window, {})
            else:
                out = attention.paged_prefill_attention_per_chunk(*args, window)
        if GPU:
            torch.cuda.synchronize()
        return out

    want = attention.paged_prefill_attention_per_chunk(*args, window)
    torch.testing.assert_close(run().float(), want.float(), rtol=2e-2, atol=2e-2)
    benchmark.group = f"paged prefill {step} Hq,Hkv,D={PREFILL_HEADS} {DEVICE}"
    benchmark.pedantic(run, rounds=10 if GPU else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(0) if GPU else "cpu", chunks=len(chunks),
                                tokens=sum(n for n, _ in chunks),
                                attention=vendor.attention_backend(args[0].device, args[0].dtype))
