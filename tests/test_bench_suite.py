"""The benchmark suite stays importable and collectable (its timings run with `make bench`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_collect():
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    for name in ("test_bench_train_step", "test_bench_tokenizer", "test_bench_newton_schulz",
                 "test_bench_optimizer_step", "test_bench_rms_norm", "test_bench_qk_norm_rope",
                 "test_bench_paged_attention", "test_bench_engine", "test_bench_fp8_quant",
                 "test_bench_fp8_gemm", "test_bench_fp8_linear", "test_bench_cpu_memory",
                 "test_bench_decode_linear", "test_bench_linear_cross_entropy", "test_bench_policy_step"):
        assert any(name in line for line in collected), name


def test_the_decode_step_benchmark_splits_a_step_into_model_and_host_time():
    """bench/test_bench_decode_step.py's measurement on a toy model: every timed step of the static
    modes is static, and the model's share of a step is positive."""
    import torch

    from bench.test_bench_decode_step import measure
    from nanofast.model import GPT, config_for_depth

    torch.manual_seed(0)
    model = GPT(config_for_depth(1, vocab_size=300, sequence_len=64, head_dim=16))
    model.init_weights()
    model.eval()
    for mode in ("off", "eager"):
        row = measure(model, mode, batch=3, steps=3)
        assert row["mode"] == mode and row["batch"] == 3 and row["step_ms"] > 0 and row["model_ms"] > 0
        assert abs(row["model_ms"] + row["host_ms"] - row["step_ms"]) < 1e-6
