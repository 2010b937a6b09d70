"""The engine's decode step: the static step (nanofast.decode_graph) against the general path, each
step split into model time and host time, in the same run.

    python -m pytest bench/test_bench_decode_step.py --benchmark-only -s

Modes: "off" (the general path: batch tensors rebuilt from lists, per-layer plans, the general
sampler), "eager" (the static step uncaptured, in the graphs' buckets), "exact" (uncaptured at the
step's own batch and width: the CPU default) and the captured form of the device: "compile" on
CPU, "graph" (CUDA graphs) on a GPU. Per mode and batch size, on nanochat's depth-4 CPU model (d20
on a GPU), a running greedy decode batch: ms per `Engine.step` (synchronised), the model's share
(static modes: the step's device work replayed alone, `graphs.steps[graphs.last_key]()`; "off": the
model's forward, timed by forward hooks) and the host's (the rest: scheduling, staging the inputs,
sampling bookkeeping, reading back). One JSON line per case.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench.workloads import sync
from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT, config_for_depth

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DEPTH, VOCAB, SEQ = (20, 65536, 2048) if GPU else (4, 32768, 512)
BATCHES = (1, 8, 32, 64)
MODES = ("off", "eager", "exact", "graph" if GPU else "compile")
PROMPT_LEN, WARM, STEPS = 32, 4, 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(config_for_depth(DEPTH, VOCAB, SEQ, head_dim=64 if not GPU else 128),
                    compute_dtype=torch.bfloat16 if GPU else torch.float32)
        model.init_weights()
    return model.eval()


def _timed(fn, n: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def measure(model: GPT, mode: str, batch: int, steps: int = STEPS) -> dict:
    """ms per decode step of `batch` running sequences, and its model / host split."""
    engine = Engine(model, page_size=16, max_num_seqs=batch, max_batch_tokens=max(2048, batch * PROMPT_LEN),
                    decode_step=mode)
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=2 * WARM + 2 * steps + 4, temperature=0.0)
    for _ in range(batch):
        engine.add_request(torch.randint(1, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist(), params)
    for _ in range(WARM):  # the prefill, then decode steps that capture / compile this shape
        engine.step()
    inside = [0.0]

    def start(module, args, kwargs):
        sync()
        inside.append(time.perf_counter())

    def stop(module, args, kwargs, out):
        sync()
        inside[0] += time.perf_counter() - inside.pop()

    if mode == "off":
        hooks = [model.register_forward_pre_hook(start, with_kwargs=True),
                 model.register_forward_hook(stop, with_kwargs=True)]
    static = engine.stats["static_steps"]
    step = _timed(engine.step, steps)
    if mode == "off":
        for h in hooks:
            h.remove()
        model_s = inside[0] / steps
    else:
        assert engine.stats["static_steps"] - static == steps  # every timed step took the static path
        with torch.inference_mode():  # as Engine.step runs it
            model_s = _timed(engine.graphs.steps[engine.graphs.last_key], steps)
    return {"mode": mode, "batch": batch, "device": DEVICE, "depth": DEPTH, "step_ms": step * 1e3,
            "model_ms": model_s * 1e3, "host_ms": (step - model_s) * 1e3, "tokens_per_s": batch / step}


@pytest.mark.expensive  # compiling each shape takes ~30 s on 2 CPU cores
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_decode_step(benchmark, model, batch):
    rows = [measure(model, mode, batch) for mode in MODES]
    rows += [measure(model, mode, batch) for mode in reversed(MODES)]  # again in reverse order: drift hits all
    best = {m: min((r for r in rows if r["mode"] == m), key=lambda r: r["step_ms"]) for m in MODES}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({m: best[m] for m in MODES})
    for r in best.values():
        print(json.dumps(r))
    assert all(r["tokens_per_s"] > 0 for r in best.values())
