"""The 8xH100 speedrun's code path, rehearsed on CPU: `torchrun train.py --stage all` on the
`rehearsal` preset, which changes only sizes. What each switch stands for on the GPU:

- `torchrun --nproc_per_node=2` (gloo): the 8 NCCL ranks. Each rank reads its own row groups and
  saves its own loader position and optimizer shard; Muon/AdamW reduce-scatter the gradients and
  all-gather the updates; the losses are all-reduced.
- `compile` (the preset's default, as in `speedrun`): the compiled training step of pretraining,
  mid-training and SFT. Inductor emits C++ here and Triton on the GPU; the fp8 linears are
  torch.library custom ops, opaque to both.
- `dtype=bf16`: the H100's compute dtype for activations, the engine's KV cache and RL's sampler.
- `linear_precision`, the speedrun's (attention, MLP and lm_head in fp8): pretraining's linears run
  FP8 GEMMs (E4M3 operands, E5M2 gradients, tensorwise scales): Triton's FP8 kernels, QGMMA on an
  H100, run here by the interpreter on the same source. Mid-training and SFT are bf16, as there.
- CORE during pretraining (the speedrun's every 2000 steps): here at the last step, four examples
  per task, shared out over the ranks and summed.
- gradient accumulation (the speedrun's 4 micro-steps per step): here 2 of one row per rank, in
  pretraining and fine-tuning, under compile.
- fine-tuning as the speedrun does it: each rank continues from its own optimizer shard of the
  stage before (the Adam moments and Muon momenta), with the stage's own LRs.
- the speedrun's checkpoint defaults: every 30 minutes (a per-step all-reduce of the time flag)
  and every 2 steps here, the 2 newest kept.
- `dispatch_as=gpu-H100` (TRITON_INTERPRET=1): every op runs the backend an H100 run picks
  (nanofast.dispatch: the committed H100 table, or the unmeasured defaults), not the torch
  fallback a CPU run would pick: the Triton kernels of the norms, fused QK-norm+rotary, paged KV
  writes and decode, the fused loss head and FP8 quantisation; `torch._scaled_mm` for the FP8
  GEMMs and torch.matmul for Muon's Newton-Schulz until a measurement says nanofast's win.
- post-training: nanofast's (mid-training, SFT, RL), a superset of the speedrun's nanochat SFT: its
  mid-training starts from the base model as the speedrun's SFT does, with the same loop, warm
  start and dtypes (tests/test_pipeline.py checks the presets differ only in sizes and this).
- the SIGKILL in pretraining: a preempted or crashed node. The rerun of the same command skips the
  finished tokenizer, resumes pretraining at the last step every rank saved, and runs the rest.
- the chat CLI and the HTTP server load the finished checkpoints with the same backend and dtype.

A second, shorter run does pretraining and chat with `kernel_backend=cuda`: the CUDA sources (norms,
QK-norm+rotary, paged attention) through their CPU emulation build, the fp8 linears and
Newton-Schulz on their Triton kernels (they have no CUDA source).

What this cannot show: speed, and the numerics of the compiled GPU kernels (the interpreter runs the
kernels' source in numpy, and Inductor emits C++ here); see docs/rehearsal.md.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from killing import kill_once_saved
from nanofast.presets import default_run_name, make_settings

ROOT = Path(__file__).resolve().parents[1]
# The interpreter, with fused multiply-adds as the GPU compiles them; one thread per rank (2 cores).
ENV = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1",
           PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
STAGES = ("tokenizer", "pretrain", "midtrain", "sft", "rl", "eval", "report")
KILL_AFTER_STEP = 2  # pretraining saves every 2 of its 6 steps: killed during step 3
RUN = default_run_name(make_settings("rehearsal"))  # train.py's folder for the preset's run


def run_dir(base: Path) -> Path:
    return base / "runs" / RUN


def section(base: Path, stage: str) -> dict:
    return json.loads((run_dir(base) / "report" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory) -> tuple[Path, str]:
    """A base dir after the whole rehearsal: killed in pretraining, then rerun to the report.
    Returns it and the rerun's output."""
    base = tmp_path_factory.mktemp("rehearsal")
    cmd = [*TORCHRUN, "--stage", "all", "--preset", "rehearsal", "--base-dir", str(base)]
    killed = kill_once_saved(cmd, ROOT, ENV, run_dir(base) / "checkpoints" / "base", KILL_AFTER_STEP,
                             base.parent / "killed.log", world_size=2)
    assert len(killed) >= 3, killed  # torchrun and both ranks (in sessions of their own), each checked gone by pid
    assert not (run_dir(base) / "report" / "pretrain.json").exists()  # it really died inside pretraining
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return base, out.stdout


def finite_and_falling(losses: list) -> None:
    values = [v for _, v in losses]
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0], values


def test_the_rerun_resumes_pretraining_and_runs_every_stage(rehearsed):
    base, stdout = rehearsed
    assert f"resumed from {run_dir(base) / 'checkpoints' / 'base'} at step {KILL_AFTER_STEP}" in stdout
    assert ("stages: tokenizer: skipped (already done); pretrain: ran; midtrain: ran; sft: ran; rl: ran; "
            "eval: ran; report: ran") in stdout
    pre = section(base, "pretrain")
    assert pre["world_size"] == 2 and [s for s, _ in pre["losses"]] == list(range(1, 7))
    finite_and_falling(pre["losses"])
    assert [(e["step"], "core" in e) for e in pre["evals"]][-1] == (6, True)
    for stage, init in (("midtrain", "base"), ("sft", "mid")):
        assert f"{stage}: optimizer moments from {run_dir(base) / 'checkpoints' / init} step" in stdout


def test_every_training_stage_learns_in_bf16_with_fp8_linears(rehearsed):
    base, _ = rehearsed
    pre = section(base, "pretrain")
    assert (pre["dtype"], pre["linear_precision"], pre["kernel_backend"], pre["dispatch_as"], pre["compile"]) \
        == ("bfloat16", make_settings("speedrun").linear_precision, "by device", "gpu-H100", True)
    for stage in ("midtrain", "sft"):
        sec = section(base, stage)
        assert len(sec["losses"]) == sec["iterations"] == 3
        assert (sec["total_batch_size"], sec["grad_accum"]) == (256, 2)  # accumulation, as the speedrun's 4
        # 3 steps on different conversations (one may hold no assistant token in its 64-token
        # rows and log 0.0): single batches' losses do not order, the held-out bpb does
        assert all(math.isfinite(v) for _, v in sec["losses"])
        assert sec["evals"][-1]["val_bpb"] < sec["evals"][0]["val_bpb"]
    rl = section(base, "rl")
    assert len(rl["history"]) == 2
    # bf16 sampler (the engine's paged decode kernel) against the bf16 trainer: close, not equal
    assert math.isfinite(rl["mean_kl"]) and rl["mean_kl"] < 1e-3
    results = section(base, "eval")["results"]
    assert set(results) == {"base", "mid", "sft", "rl"} and results["sft"]["chatcore"] is not None


def test_the_report_has_every_section(rehearsed):
    base, stdout = rehearsed
    assert f"report: {run_dir(base) / 'report.md'}" in stdout
    report = (run_dir(base) / "report.md").read_text()
    for needle in ("## System", "## Tokenizer", "val bpb", "## Mid-training", "## SFT", "## RL (GRPO)",
                   "KL(engine||trainer)", "- kernels: each op's backend as a gpu-H100 run picks it, compiled training step",
                   "## Metrics", "| CORE | ", "| ChatCORE |", "## Time and cost"):
        assert needle in report, needle
    assert "Stages without results" not in report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_once(base: Path, backend: str, prompt: str = "Hi there", max_tokens: int = 6) -> str:
    """`python -m nanofast.chat -p` on the latest checkpoint under `base`, greedy."""
    out = subprocess.run([sys.executable, "-m", "nanofast.chat", "-p", prompt, "--temperature", "0",
                          "--max-tokens", str(max_tokens), "--device", "cpu", "--dtype", "bf16",
                          "--kernel-backend", backend],
                         cwd=ROOT, env=dict(ENV, NANOFAST_BASE_DIR=str(base)), capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out.stdout.decode("utf-8")


def test_the_checkpoints_load_in_the_chat_cli_and_the_server(rehearsed):
    base, _ = rehearsed
    answer = chat_once(base, "triton")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nanofast.serve", "--port", str(port), "--device", "cpu",
                               "--dtype", "bf16", "--kernel-backend", "triton"],
                              cwd=ROOT, env=dict(ENV, NANOFAST_BASE_DIR=str(base)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 180 s"
                time.sleep(1)
        body = json.dumps({"messages": [{"role": "user", "content": "Hi there"}], "temperature": 0,
                           "max_tokens": 6}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    message = reply["choices"][0]["message"]["content"]
    # The same greedy decode through the same engine and kernels: the CLI and the server agree.
    assert answer == message + "\n"
    assert reply["usage"]["completion_tokens"] >= 1


def test_the_cuda_sources_train_and_decode(rehearsed, tmp_path):
    """Pretraining (2 ranks, compiled, bf16, fp8) and chat with the kernel backend `cuda`."""
    src, _ = rehearsed
    base = tmp_path / "cuda"
    base.mkdir()
    shutil.copytree(src / "default_corpus", base / "default_corpus")
    shutil.copytree(run_dir(src) / "tokenizer", run_dir(base) / "tokenizer")
    cmd = [*TORCHRUN, "--stage", "pretrain", "--preset", "rehearsal", "--base-dir", str(base),
           "--kernel-backend", "cuda", "--num-iterations", "3", "--eval-every", "-1", "--save-every", "-1"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pre = section(base, "pretrain")
    assert pre["kernel_backend"] == "cuda" and pre["world_size"] == 2
    finite_and_falling(pre["losses"])
    assert chat_once(base, "cuda", max_tokens=4)


def test_the_speedruns_post_training_sft_from_the_base_model(rehearsed, tmp_path):
    """The speedrun's own post-training (`--post-training nanochat`: SFT from the base model on
    nanochat's mixture) with every rehearsal switch: 2 ranks, compiled, bf16 after fp8 pretraining,
    gradient accumulation, each rank warm-starting from its base optimizer shard."""
    src, _ = rehearsed
    base = tmp_path / "nanochat_sft"
    shutil.copytree(src, base)
    shutil.rmtree(run_dir(base) / "checkpoints" / "sft")
    cmd = [*TORCHRUN, "--stage", "sft", "--preset", "rehearsal", "--base-dir", str(base), "--post-training", "nanochat"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"sft: optimizer moments from {run_dir(base) / 'checkpoints' / 'base'} step" in out.stdout
    sft = section(base, "sft")
    assert set(sft["task_sources"]) == {"smoltalk", "mmlu", "gsm8k"} and sft["settings"]["post_training"] == "nanochat"
    assert (sft["total_batch_size"], sft["grad_accum"]) == (256, 2) and len(sft["losses"]) == sft["iterations"] == 3
    assert all(math.isfinite(v) for _, v in sft["losses"])
