"""Inference benchmarks: the paged engine's latency/throughput schema and an offline-throughput
run against one-prompt-at-a-time generation, in the same run.

    python -m pytest bench/test_bench_engine.py --benchmark-only -s

Per batch size (nanochat's inference-benchmark schema): TTFT (time to the first token of every
request), TPOT (time per output token after the first), tokens/s, MBU (bytes of weights and KV
read per decode step / step time / peak bandwidth) and MFU (2 FLOPs per weight per token + attention
/ peak FLOP/s), peak memory; a JSON summary line is printed last. MBU/MFU need the device's peak:
known for GPUs (nanofast.common.peak_flops); on CPU they are reported as null, not guessed.

Offline throughput (like nano-vllm's): many requests with random prompt and output lengths, all
submitted at once, vs the same requests run one at a time (each alone in the engine: a dense
per-request KV cache, like nanochat's engine).
"""
from __future__ import annotations

import json
import random
import resource
import time

import pytest
import torch

from bench.gpu_peaks import peak_bandwidth_gbps
from bench.workloads import offline_throughput
from nanofast.common import peak_flops
from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT, config_for_depth

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# nanochat's depth-4 reference config on CPU (its own inference numbers are for this model).
DEPTH, VOCAB, SEQ = (20, 65536, 2048) if ON_GPU else (4, 32768, 512)
PROMPT_LEN, NEW_TOKENS = 32, (256 if ON_GPU else 64)
BATCHES = [1, 8, 32, 128] if ON_GPU else [1, 8]


def _model() -> GPT:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    with torch.device(DEVICE):
        model = GPT(config_for_depth(DEPTH, VOCAB, SEQ), compute_dtype=dtype)
        model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return _model()


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def run_batch(model: GPT, batch: int, prompt_len: int = PROMPT_LEN, new_tokens: int = NEW_TOKENS) -> dict:
    """One batch of distinct prompts decoded together; the inference-benchmark metrics."""
    engine = Engine(model, page_size=16, max_num_seqs=max(batch, 1), max_batch_tokens=max(4096, batch * prompt_len))
    engine.generate([[1] * 8], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    rng = random.Random(batch)
    prompts = [[1] + [rng.randrange(2, model.config.vocab_size) for _ in range(prompt_len - 1)] for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    first: dict[int, float] = {}
    generated = 0
    while engine.has_unfinished():
        events = engine.step()
        _sync()
        now = time.perf_counter() - t0
        for ev in events:
            first.setdefault(ev.request_id, now)
        generated += len(events)
    total = time.perf_counter() - t0
    ttft = max(first.values())
    decode_time = total - ttft
    tpot = decode_time / max(new_tokens - 1, 1)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.finfo(model.compute_dtype).bits // 8
    mean_ctx = prompt_len + new_tokens / 2
    step_bytes = weight_bytes + batch * mean_ctx * kv_per_token  # one decode step reads all weights + every KV
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    step_flops = batch * (2 * matmul_params + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * mean_ctx)
    gbps, peak = peak_bandwidth_gbps(), peak_flops(DEVICE)
    bw = gbps * 1e9 if gbps else None  # None on CPU: MBU is reported as null, not guessed
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "device": DEVICE,
        "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "tokens_per_s": generated / total,
        "decode_tokens_per_s": batch * (new_tokens - 1) / max(decode_time, 1e-9),
        "mbu": (step_bytes / tpot / bw) if bw else None,
        "mfu": (step_flops / tpot / peak) if peak else None,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() if ON_GPU
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30,
        "preemptions": engine.stats["preemptions"],
    }


@pytest.mark.expensive  # ~40 s on a 2-core CPU
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_inference(benchmark, model, batch):
    result = benchmark.pedantic(run_batch, args=(model, batch), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(json.dumps(result))
    assert result["tokens_per_s"] > 0 and result["preemptions"] == 0


def offline_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(2, vocab) for _ in range(rng.randint(8, 96))]
        out.append((prompt, SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.0)))
    return out


@pytest.mark.expensive
def test_bench_offline_throughput_vs_one_at_a_time(model):
    """The same requests both ways, in one run; the outputs must agree (greedy)."""
    requests = offline_requests(64 if ON_GPU else 16, model.config.vocab_size)
    offline_throughput(model, requests[:2], one_at_a_time=False)  # warm-up
    batched = offline_throughput(model, requests, one_at_a_time=False)
    single = offline_throughput(model, requests, one_at_a_time=True)
    summary = {"requests": len(requests), "device": DEVICE, "paged_tokens_per_s": batched["tokens_per_s"],
               "one_at_a_time_tokens_per_s": single["tokens_per_s"],
               "speedup": batched["tokens_per_s"] / single["tokens_per_s"]}
    print(json.dumps(summary))
    assert batched["outputs"] == single["outputs"]
    assert summary["speedup"] > 1.0, summary
