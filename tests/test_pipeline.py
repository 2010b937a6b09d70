"""train.py end to end on the smoke preset: stages, skipping, exact resume, torchrun, and its errors."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from killing import kill_once_saved
from nanofast.pipeline import STAGES, stages_of
from nanofast.presets import default_run_name, make_settings

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
RUN = default_run_name(make_settings("smoke"))  # train.py's folder for the preset's run


def run_dir(base: Path) -> Path:
    return base / "runs" / RUN


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A base dir holding the smoke corpus and tokenizer (the tokenizer stage run once)."""
    base = tmp_path_factory.mktemp("base")
    assert train.main(["--stage", "tokenizer", "--preset", "smoke", "--base-dir", str(base)]) == 0
    return base


def copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def pretrain(base: Path, *extra: str) -> int:
    return train.main(["--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base), *extra])


def section(base: Path, stage: str) -> dict:
    return json.loads((run_dir(base) / "report" / f"{stage}.json").read_text())


def interrupt_before(base: Path, stage: str, checkpoints: str, step: int) -> None:
    """Make a finished run look killed before it saved `step`: drop that step's checkpoint files
    (model, meta, every rank's optimizer shard) and the stage's report section."""
    for f in (run_dir(base) / "checkpoints" / checkpoints).glob(f"*{step:06d}*"):
        f.unlink()
    (run_dir(base) / "report" / f"{stage}.json").unlink()


def test_resume_reproduces_the_uninterrupted_run(tokenized, tmp_path):
    """Also with CORE during pretraining (nanochat's every 2000 steps, here every 3 on 3 examples
    per task): at steps 3 and 6, not at step 0; the resumed run has the same numbers."""
    base = copy_base(tokenized, tmp_path / "run")
    args = ("--num-iterations", "6", "--save-every", "3", "--eval-every", "3", "--core-every", "3",
            "--core-examples", "3")
    assert pretrain(base, *args) == 0
    full = section(base, "pretrain")
    # Interrupt after step 3: drop everything written later, then run the stage again.
    interrupt_before(base, "pretrain", "base", 6)
    assert pretrain(base, *args) == 0
    resumed = section(base, "pretrain")
    assert [s for s, _ in resumed["losses"]] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), atol=1e-6, rtol=0)
    assert resumed["val_bpb"] == pytest.approx(full["val_bpb"], abs=1e-6)
    assert [(e["step"], "core" in e) for e in full["evals"]] == [(0, False), (3, True), (6, True)]
    assert [e.get("core") for e in resumed["evals"]] == pytest.approx([e.get("core") for e in full["evals"]], abs=1e-6)
    with pytest.raises(ValueError, match="core_every 4 must be a multiple of eval_every 3"):
        make_settings("smoke", core_every=4, eval_every=3)
    a = torch.load(run_dir(base) / "checkpoints" / "base" / "model_000006.pt")
    assert all(torch.isfinite(v).all() for v in a.values())


def stage_all(base: Path) -> list[str]:
    return [sys.executable, "train.py", "--stage", "all", "--preset", "smoke", "--base-dir", str(base),
            "--num-iterations", "8", "--eval-every", "4"]


@pytest.fixture(scope="module")
def ran_all(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted `--stage all` run of the smoke preset."""
    base = tmp_path_factory.mktemp("run") / "all"
    out = subprocess.run(stage_all(base), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return base, out


def test_stage_all_runs_end_to_end_and_skips_finished_stages(ran_all):
    base, out = ran_all
    cmd = stage_all(base)
    assert ("tokenizer: ran; pretrain: ran; midtrain: ran; sft: ran; rl: ran; eval: ran; report: ran"
            in out.stdout), out.stdout[-3000:]
    assert f"report: {run_dir(base) / 'report.md'}" in out.stdout
    report = (run_dir(base) / "report.md").read_text()
    for needle in ("## System", "git_commit", "## Tokenizer", "bytes/token", "val bpb", "tokens/s",
                   "![loss curve](loss_curve.png)", "## Mid-training", "## SFT", "## RL (GRPO)",
                   "held-out accuracy", "KL(engine||trainer)", "## Metrics", "| CORE | ", "| ChatCORE |",
                   "## Time and cost", "cost estimate"):
        assert needle in report, needle
    assert "Stages without results" not in report
    for stage, init in (("midtrain", "base"), ("sft", "mid")):  # fine-tuning continues the optimizer moments
        assert f"{stage}: optimizer moments from {run_dir(base) / 'checkpoints' / init} step" in out.stdout
    for png in ("loss_curve.png", "loss_midtrain.png", "loss_sft.png", "rl_curve.png"):
        assert (run_dir(base) / png).read_bytes()[:4] == b"\x89PNG", png
    pre = section(base, "pretrain")
    assert pre["num_iterations"] == 8 and len(pre["losses"]) == 8 and pre["mfu"] is None
    assert pre["losses"][-1][1] < pre["losses"][0][1]  # it learns
    for stage in ("midtrain", "sft"):
        sec = section(base, stage)
        assert len(sec["losses"]) == sec["iterations"] and sec["val_bpb"] > 0
        assert set(sec["task_sources"].values()) == {"offline"}  # no network here: generated data, and it says so
        assert sec["evals"][-1]["val_bpb"] < sec["evals"][0]["val_bpb"]  # the conversations are learned
    rl = section(base, "rl")
    for mode in ("greedy", "sampled"):
        assert len(rl["history"]) == 3 and rl["heldout_before"][mode]["n"] == rl["heldout_after"][mode]["n"] == 12
        change = rl["heldout_change"][mode]
        assert change["n"] == 12 and change["ci95"][0] <= change["change"] <= change["ci95"][1]
        assert change["change"] == pytest.approx(rl["heldout_after"][mode]["accuracy"]
                                                 - rl["heldout_before"][mode]["accuracy"])
    assert "paired change" in report and "95% CI" in report and "/s carry loss" in report
    assert rl["mean_kl"] < 1e-4  # fp32 sampler and trainer agree (same maths, different kernels)
    results = section(base, "eval")["results"]
    assert set(results) == {"base", "mid", "sft", "rl"} and results["base"]["core"]["source"] == "offline"
    bpb = results["base"]["bpb"]  # after training, on the corpus' train and val splits
    assert 0 < bpb["train"] < 10 and 0 < bpb["val"] < 10 and f"| bpb train / val | {bpb['train']:.4f}" in report
    for label in ("mid", "sft", "rl"):
        assert {t["source"] for t in results[label]["tasks"].values()} == {"offline"}
        assert results[label]["chatcore"] is not None
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tokenizer: skipped (already done); pretrain: skipped (already done); midtrain: skipped" in again.stdout


def test_killed_in_each_training_stage_it_resumes_with_the_same_losses(ran_all, tmp_path):
    """kill -9 in pretraining, then in mid-training, then in SFT, each time rerunning the same
    command: each stage resumes at its last checkpoint, and every loss equals the uninterrupted
    run's (fp32, one process: bitwise)."""
    reference, _ = ran_all
    base = tmp_path / "killed"
    cmd = [*stage_all(base), "--save-every", "2"]
    for stage, checkpoints in (("pretrain", "base"), ("midtrain", "mid"), ("sft", "sft")):
        kill_once_saved(cmd, ROOT, ENV, run_dir(base) / "checkpoints" / checkpoints, 2, tmp_path / f"{stage}.log")
        assert not (run_dir(base) / "report" / f"{stage}.json").exists(), f"{stage} finished before the kill"
        if stage != "pretrain":
            assert f"resumed from {run_dir(base) / 'checkpoints' / last} at step 2" in (tmp_path / f"{stage}.log").read_text()
        last = checkpoints
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run_dir(base) / 'checkpoints' / 'sft'} at step 2" in out.stdout
    for stage in ("pretrain", "midtrain", "sft"):
        assert section(base, stage)["losses"] == section(reference, stage)["losses"], stage


def test_torchrun_two_processes_train_and_resume_exactly(tokenized, tmp_path):
    base = copy_base(tokenized, tmp_path / "dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base), "--num-iterations", "4",
           "--save-every", "2", "--device-batch-size", "2", "--eval-every", "0", "--eval-tokens", "512"]

    def torchrun() -> dict:
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return section(base, "pretrain")

    full = torchrun()
    assert full["world_size"] == 2 and len(full["losses"]) == 4
    ckpt = run_dir(base) / "checkpoints" / "base"
    assert (ckpt / "optim_000004_rank1.pt").exists()
    # Each rank resumes its own loader position: the resumed run repeats the uninterrupted one.
    interrupt_before(base, "pretrain", "base", 4)
    resumed = torchrun()
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), atol=1e-6, rtol=0)


def test_compiled_pretraining_matches_eager(tokenized, tmp_path):
    """--compile (the speedrun's default) through the real loop: same losses as eager within fp32
    reassociation (Inductor fuses and reorders sums; measured 1e-6 here over 30 steps; a wrong
    gradient or a skipped op moves the loss by > 1e-2)."""
    eager = copy_base(tokenized, tmp_path / "eager")
    compiled = copy_base(tokenized, tmp_path / "compiled")
    assert pretrain(eager, "--no-compile") == 0
    assert pretrain(compiled, "--compile") == 0
    a, b = section(eager, "pretrain")["losses"], section(compiled, "pretrain")["losses"]
    assert [s for s, _ in a] == [s for s, _ in b]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=2e-4, rtol=0)


def test_compile_on_a_cpu_without_a_cpp_compiler_trains_eager_and_says_so(monkeypatch, capsys):
    """make run's preset compiles; torch.compile's CPU code is C++, so a laptop without a compiler
    must still train (eager), told why, not crash at the first step."""
    from nanofast import pipeline
    from nanofast.model import GPT, config_for_depth

    model = GPT(config_for_depth(1, 64, 16, head_dim=16))
    s = make_settings("cpu")
    assert s.compile
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(pipeline.shutil, "which", lambda name: None)
    assert pipeline.cpp_compiler() is None and pipeline.compiled(model, s) is model
    assert "no C++ compiler found" in capsys.readouterr().out
    monkeypatch.setenv("CXX", "my-c++")
    monkeypatch.setattr(pipeline.shutil, "which", lambda name: f"/opt/bin/{name}" if name == "my-c++" else None)
    assert pipeline.cpp_compiler() == "/opt/bin/my-c++" and pipeline.compiled(model, s) is not model
    assert pipeline.compiled(model, make_settings("cpu", compile=False)) is model


def run_main(capsys, *argv) -> tuple[int, str]:
    code = train.main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_unknown_stages_and_choices_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "pretrian"])
    assert e.value.code == 2 and "unknown stage 'pretrian'" in capsys.readouterr().err
    for flag, value, choices in (("--rl-dtype", "fp8", "fp32, bf16, fp16"), ("--dtype", "fp64", "fp32, bf16, fp16"),
                                 ("--data", "web", "default, climbmix"), ("--fp8-recipe", "blockwise", "tensorwise"),
                                 ("--kernel-backend", "metal", "torch, triton, cuda")):
        code, err = run_main(capsys, "--stage", "rl", flag, value)
        assert code == 2 and err.startswith(f"error: {flag} {value!r}: choose one of {choices}") and "\n" not in err


def test_every_setting_has_a_flag_with_help():
    """train.py's flags are made from Settings: each field overridable, its help from the field."""
    from dataclasses import fields

    from nanofast.presets import Settings

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(out.getvalue().split())
    for f in fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in help_text, f.name
        assert " ".join(f.metadata["help"].split())[:40] in help_text, f.name
    args = train.parse_args(["--stage", "all", "--no-compile", "--corpus-chars", "5", "--rl-lr-scale", "0.1"])
    assert (args.compile, args.corpus_chars, args.rl_lr_scale, args.depth) == (False, 5, 0.1, None)


def test_a_stage_without_its_input_checkpoint_is_a_one_line_error(tokenized, tmp_path, capsys):
    base = copy_base(tokenized, tmp_path / "nosft")
    for stage, needed in (("midtrain", "pretrain"), ("sft", "midtrain"), ("rl", "sft")):
        code, err = run_main(capsys, "--stage", stage, "--preset", "smoke", "--base-dir", str(base))
        assert code == 1 and f"run `train.py --stage {needed}` first" in err and "\n" not in err


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(tmp_path))
    assert code == 1 and "run `python train.py --stage tokenizer` first" in err and "\n" not in err


def test_impossible_model_shape_is_a_one_line_error(tokenized, tmp_path, capsys):
    base = copy_base(tokenized, tmp_path / "shape")
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base), "--head-dim", "3",
                         "--run-name", RUN)  # the tokenized run's folder (by default head dim 3 names another)
    assert code == 1 and "impossible model shape" in err and "\n" not in err


def test_empty_corpus_is_a_one_line_error(tokenized, tmp_path, capsys):
    base = copy_base(tokenized, tmp_path / "empty")
    shutil.rmtree(base / "default_corpus")
    (base / "default_corpus").mkdir()
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base))
    assert code == 1 and "no parquet shards" in err and "\n" not in err


def test_corrupt_checkpoint_is_a_one_line_error(tokenized, tmp_path, capsys):
    base = copy_base(tokenized, tmp_path / "corrupt")
    assert pretrain(base, "--num-iterations", "2", "--eval-every", "0") == 0
    capsys.readouterr()
    (run_dir(base) / "checkpoints" / "base" / "model_000002.pt").write_bytes(b"garbage")
    (run_dir(base) / "report" / "pretrain.json").unlink()
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base))
    assert code == 1 and "corrupt" in err and "\n" not in err


def test_batch_that_does_not_divide_is_a_clear_error(tokenized, tmp_path, capsys):
    base = copy_base(tokenized, tmp_path / "batch")
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base),
                         "--total-batch-size", "700")
    assert code == 1 and "not a multiple" in err


def test_presets_adapt_the_device_batch_to_the_world_size(capsys):
    """The batch a preset is tuned for is kept on more ranks: fewer rows per micro-step (said in
    one line), gradient accumulation for the rest; a batch no device batch can fill is an error."""
    from nanofast.model import GPT, config_for_depth
    from nanofast.plan import plan_training

    def plan(preset: str, world: int, **overrides):
        s = make_settings(preset, **overrides)
        with torch.device("meta"):
            model = GPT(config_for_depth(s.depth, s.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                                         window_pattern=s.window_pattern))
        p = plan_training(model, s, world)
        return p.total_batch_size, p.device_batch_size, p.grad_accum

    assert plan("smoke", 1) == (512, 4, 1) and capsys.readouterr().out == ""
    assert plan("smoke", 2) == (512, 2, 1)
    assert "device batch 4 -> 2 rows: 2 process(es) x 2 x 128 tokens divide the 512-token batch" in capsys.readouterr().out
    assert plan("cpu", 2) == (4096, 4, 1) and plan("cpu", 8) == (4096, 1, 1)
    assert plan("speedrun", 8) == (2 ** 20, 16, 4) and plan("speedrun", 1) == (2 ** 20, 16, 32)
    assert plan("smoke", 3, total_batch_size=3 * 128 * 2) == (768, 2, 1)  # 3 rows do not divide 768 / 3
    with pytest.raises(ValueError, match="no device batch fills it"):
        plan("smoke", 8)  # 8 ranks x 128 tokens > 512


@pytest.mark.parametrize("flag, value", [
    ("--device-batch-size", "0"), ("--depth", "-1"), ("--seq-len", "0"), ("--vocab-size", "0"),
    ("--head-dim", "0"), ("--rl-samples", "0"), ("--task-size", "0"), ("--wait-minutes", "0"),
    ("--dist-timeout-minutes", "-5"), ("--eval-tokens", "0"), ("--core-examples", "0"),
])
def test_bad_cli_values_are_one_line_errors(flag, value, tmp_path, capsys):
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(tmp_path), flag, value)
    assert code == 2 and f"error: {flag} must be > 0, got " in err and "\n" not in err, err


def test_a_base_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for where, message in ((tmp_path / "file", "is a file, not a directory"), (tmp_path / "file" / "sub", "cannot create")):
        code, err = run_main(capsys, "--stage", "tokenizer", "--preset", "smoke", "--base-dir", str(where))
        assert code == 2 and message in err and "\n" not in err, err


def test_settings_overrides_and_unknown_preset():
    s = make_settings("cpu", depth=3, dtype=None)
    assert s.depth == 3 and s.seq_len == make_settings("cpu").seq_len
    with pytest.raises(ValueError, match="unknown preset"):
        make_settings("huge")
    with pytest.raises(ValueError, match="--data 'web': choose one of default, climbmix"):
        make_settings("cpu", data="web")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_compute_dtypes_train(tokenized, tmp_path, dtype):
    base = copy_base(tokenized, tmp_path / dtype)
    assert pretrain(base, "--dtype", dtype, "--num-iterations", "3", "--eval-every", "0") == 0
    pre = section(base, "pretrain")
    assert pre["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert all(math.isfinite(loss) for _, loss in pre["losses"]) and math.isfinite(pre["val_bpb"])


@pytest.fixture(scope="module")
def sft_base(tokenized, tmp_path_factory) -> Path:
    """A base dir with the smoke pretrain, midtrain and SFT checkpoints."""
    base = copy_base(tokenized, tmp_path_factory.mktemp("post") / "run")
    for stage in ("pretrain", "midtrain", "sft"):
        assert train.main(["--stage", stage, "--preset", "smoke", "--base-dir", str(base), "--num-iterations", "4"]) == 0
    return base


def rl(base: Path, *extra: str) -> int:
    return train.main(["--stage", "rl", "--preset", "smoke", "--base-dir", str(base), *extra])


def test_rl_in_fp16_with_loss_scaling_logs_the_mismatch(sft_base, tmp_path):
    base = copy_base(sft_base, tmp_path / "fp16")
    assert rl(base, "--rl-dtype", "fp16") == 0
    sec = section(base, "rl")
    assert sec["precision"] == "float16" and len(sec["history"]) == 3
    for row in sec["history"]:
        assert math.isfinite(row["loss"]) and 0 <= row["kl_engine_trainer"] < 1.0 and row["logp_abs_diff"] >= 0
    report = run_dir(base) / "report.md"
    assert train.main(["--stage", "report", "--preset", "smoke", "--base-dir", str(base)]) == 0
    assert "precision float16" in report.read_text()


def test_rl_resumes_exactly(sft_base, tmp_path):
    base = copy_base(sft_base, tmp_path / "rl")
    args = ("--rl-steps", "4", "--save-every", "2")
    assert rl(base, *args) == 0
    full = section(base, "rl")
    interrupt_before(base, "rl", "rl", 4)
    assert rl(base, *args) == 0
    resumed = section(base, "rl")
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(resumed["history"], full["history"]):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert resumed["heldout_before"] == full["heldout_before"]


def test_sft_trains_compiled_with_gradient_accumulation(sft_base, tmp_path):
    """Mid-training and SFT compile their step too when --compile is on (the speedrun's default),
    and take pretraining's batch: here 1,024 tokens of 512 per micro-step, so 2 micro-steps (the
    speedrun's 2^20 tokens are 4 micro-steps of 8 x 16 x 2048)."""
    base = copy_base(sft_base, tmp_path / "compiled_sft")
    shutil.rmtree(run_dir(base) / "checkpoints" / "sft")
    (run_dir(base) / "report" / "sft.json").unlink()
    assert train.main(["--stage", "sft", "--preset", "smoke", "--base-dir", str(base), "--sft-iterations", "4",
                       "--compile", "--total-batch-size", "1024"]) == 0
    sft = section(base, "sft")
    assert (sft["total_batch_size"], sft["grad_accum"]) == (1024, 2)
    assert len(sft["losses"]) == 4 and all(math.isfinite(l) for _, l in sft["losses"])


def test_sft_resumes_exactly(sft_base, tmp_path):
    base = copy_base(sft_base, tmp_path / "sft")
    shutil.rmtree(run_dir(base) / "checkpoints" / "sft")
    args = ["--stage", "sft", "--preset", "smoke", "--base-dir", str(base), "--sft-iterations", "6",
            "--save-every", "3", "--eval-every", "3"]
    assert train.main(args) == 0
    full = section(base, "sft")
    interrupt_before(base, "sft", "sft", 6)
    assert train.main(args) == 0
    resumed = section(base, "sft")
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), atol=1e-6, rtol=0)
    assert resumed["val_bpb"] == pytest.approx(full["val_bpb"], abs=1e-6)


def test_speedrun_preset_plans_nanochats_run_on_8_gpus():
    """runs/speedrun.sh's pretraining at depth 24: 2^20 tokens per step (4 micro-steps of 16 x 2048
    on 8 ranks) for 5,568 steps (ratio 8 x 729,810,624 scaling params), fp8 in every linear class."""
    from nanofast.model import GPT, config_for_depth, parse_linear_precision
    from nanofast.plan import plan_training, scaling_params

    s = make_settings("speedrun")
    with torch.device("meta"):
        model = GPT(config_for_depth(s.depth, s.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                                     window_pattern=s.window_pattern))
    assert scaling_params(model) == 729_810_624
    plan = plan_training(model, s, world_size=8)
    assert (plan.total_batch_size, plan.grad_accum, plan.num_iterations) == (2 ** 20, 4, 5568)
    assert plan.lr_scale == pytest.approx(2 ** 0.5) and plan.weight_decay == pytest.approx(0.05974, abs=1e-5)
    assert parse_linear_precision(s.linear_precision) == {"attn": "fp8", "mlp": "fp8", "lm_head": "fp8"}
    assert (s.data, s.corpus_shards, s.eval_examples, s.compile, s.save_minutes) == ("climbmix", 170, -1, True, 30.0)
    # CORE in pretraining every 2000 steps on 500 examples per task; fine-tuning at pretraining's
    # batch-scaled LRs, the rate nanochat's SFT ends up with once it loads pretraining's optimizer
    assert (s.core_every, s.core_examples, s.eval_every) == (2000, 500, 250)
    assert s.finetune_lr_scale == pytest.approx(plan.lr_scale)
    # post-training as runs/speedrun.sh: SFT from the base model, then the chat evaluation
    assert stages_of("all", s) == ["tokenizer", "pretrain", "sft", "eval", "report"]
    assert stages_of("all", make_settings("cpu")) == list(STAGES) and stages_of("rl", s) == ["rl"]


def test_the_rehearsal_is_the_speedrun_with_only_sizes_changed():
    """Every setting where the rehearsal preset (what CI runs on two ranks) differs from the
    speedrun's is a size, a value that a CPU without network forces, or its post-training, which
    is a superset of the speedrun's: mid-training starts from the base model as the speedrun's SFT
    does (the same loop, warm start and dtypes), and SFT and RL run after it."""
    from dataclasses import asdict

    speedrun, rehearsal = asdict(make_settings("speedrun")), asdict(make_settings("rehearsal"))
    sizes = {"corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars", "depth", "head_dim", "seq_len",
             "device_batch_size", "total_batch_size", "num_iterations", "target_param_data_ratio", "eval_every",
             "eval_tokens", "core_every", "core_examples", "save_every", "log_every", "sample_tokens", "task_size",
             "midtrain_iterations", "sft_iterations", "rl_steps", "rl_questions", "rl_samples", "rl_max_tokens",
             "rl_eval_examples", "eval_examples", "eval_max_tokens", "finetune_lr_scale"}
    # what the speedrun picks by device (bf16, each op's backend as on an H100) named explicitly; offline data
    forced = {"dtype": "bf16", "dispatch_as": "gpu-H100", "data": "default", "download_tasks": False}
    differ = {k for k in speedrun if speedrun[k] != rehearsal[k]}
    assert differ - sizes - set(forced) == {"post_training"}
    assert {k: rehearsal[k] for k in forced} == forced and speedrun["dtype"] is speedrun["dispatch_as"] is None
    assert speedrun["kernel_backend"] is rehearsal["kernel_backend"] is None
    assert stages_of("all", make_settings("rehearsal")) == list(STAGES)


def test_nanochats_post_training_runs_sft_from_the_base_model(sft_base, tmp_path):
    """`--stage all --post-training nanochat` (the speedrun's): SFT starts from the base model, on
    nanochat's SmolTalk + 3x MMLU + 4x GSM8K, with pretraining's optimizer moments; no mid-training
    or RL runs, the evaluation covers the base and SFT models and the report does not call the
    stages left out missing."""
    base = copy_base(sft_base, tmp_path / "nanochat")
    for stage, folder in (("midtrain", "mid"), ("sft", "sft")):
        shutil.rmtree(run_dir(base) / "checkpoints" / folder)
        (run_dir(base) / "report" / f"{stage}.json").unlink()
    out = subprocess.run([sys.executable, "train.py", "--stage", "all", "--preset", "smoke", "--base-dir", str(base),
                          "--num-iterations", "4", "--sft-iterations", "3", "--post-training", "nanochat"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokenizer: skipped (already done); pretrain: skipped (already done); sft: ran; eval: ran; report: ran" \
        in out.stdout
    assert f"sft: optimizer moments from {run_dir(base) / 'checkpoints' / 'base'} step" in out.stdout
    assert set(section(base, "sft")["task_sources"]) == {"smoltalk", "mmlu", "gsm8k"}
    assert not (run_dir(base) / "checkpoints" / "mid").exists() and not (run_dir(base) / "report" / "rl.json").exists()
    assert set(section(base, "eval")["results"]) == {"base", "sft"}
    report = (run_dir(base) / "report.md").read_text()
    assert "| midtrain | not planned (--post-training) | - |" in report and "Stages without results" not in report


SLOW_RANKS = """
# Test scaffolding (tests/test_pipeline.py): rank 1 is slow to fetch the corpus (45 s, longer than
# the test's 30 s collective timeout), rank 0 slow to start CORE (10 s, within it).
import os
import time

if os.environ.get("RANK") in ("0", "1"):
    from nanofast import core_eval, dataset

    def slowed(fn, seconds):
        def wrapper(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return wrapper

    if os.environ["RANK"] == "1":
        dataset.write_default_corpus = slowed(dataset.write_default_corpus, 45)
    else:
        core_eval.evaluate_core = slowed(core_eval.evaluate_core, 10)
"""


def test_two_nodes_with_a_slow_rank_outlast_the_collective_timeout(tmp_path):
    """Two torchrun "nodes" of one rank each on this machine (a loopback rendezvous, one --base-dir),
    with a 30 s collective timeout: rank 1 spends 45 s fetching the corpus while rank 0 trains the
    tokenizer; the ranks meet on disk at each stage's end (their own wait), so that does not time
    out. Both ranks evaluate, each its share (rank 0 starting CORE 10 s late), and the numbers are
    the ones one process computes on the same checkpoints."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RANKS)
    base = tmp_path / "slow"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=slow-{port}"]
    args = ["train.py", "--stage", "all", "--preset", "smoke", "--base-dir", str(base), "--num-iterations", "4",
            "--eval-every", "0", "--dist-timeout-minutes", "0.5"]  # the preset as it is: its batch adapts
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]))
    nodes = [subprocess.Popen([*node, f"--node-rank={r}", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (stdout, stderr) in zip(nodes, outs):
        assert n.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "report: ran" in "".join(o for o, _ in outs) and section(base, "pretrain")["world_size"] == 2
    assert "device batch 4 -> 2 rows" in outs[0][0]  # the smoke preset's 4 rows x 2 ranks: 2 rows each
    # the slow parts really ran: rank 1 finished the tokenizer stage long after rank 0, CORE waited
    marks = {r: (run_dir(base) / "sync" / f"tokenizer.rank{r}").stat().st_mtime for r in (0, 1)}
    assert marks[1] - marks[0] > 30 and section(base, "eval")["seconds"] > 10
    def task_scores(results: dict) -> dict:  # bpb reads each rank's row groups: other tokens per world size
        return {label: {k: v for k, v in r.items() if k != "bpb"} for label, r in results.items()}

    two_ranks = section(base, "eval")["results"]
    (run_dir(base) / "report" / "eval.json").unlink()
    assert train.main(["--stage", "eval", "--preset", "smoke", "--base-dir", str(base)]) == 0
    assert task_scores(section(base, "eval")["results"]) == task_scores(two_ranks)
    assert "bpb" in two_ranks["base"]


def test_stage_all_refuses_finished_stages_that_ran_with_other_settings(ran_all, capsys):
    """After `--seed 7` the seed-42 pretraining is not this run's: skipping it would mix two runs
    in one report. The refusal names the stage, the setting and both values; an operational
    setting (checkpoint cadence) or a later stage's own setting does not stale an earlier stage."""
    base, _ = ran_all
    args = ["--stage", "all", "--preset", "smoke", "--base-dir", str(base), "--num-iterations", "8",
            "--eval-every", "4"]
    code, err = run_main(capsys, *args, "--seed", "7")
    assert code == 1 and "finished pretrain stage" in err and "seed=42 (now 7)" in err and "\n" not in err
    code, err = run_main(capsys, *args, "--eval-examples", "5")
    assert code == 1 and "finished eval stage" in err and "eval_examples=12 (now 5)" in err
    assert run_main(capsys, *args, "--save-every", "3", "--save-minutes", "5")[0] == 0  # all skipped, report rebuilt


def test_each_run_has_its_own_directory(ran_all, capsys):
    """The architecture names the run's folder (another depth is another run, nothing refused or
    mixed); --run-name picks it explicitly and must be one safe path component."""
    from nanofast.presets import PRESETS, default_run_name

    assert default_run_name(PRESETS["speedrun"]) == "d24"
    assert default_run_name(make_settings("speedrun", depth=26)) == "d26"
    assert RUN == "d2-h64-wSL-s128-v1024"
    base, _ = ran_all
    code, _ = run_main(capsys, "--stage", "report", "--preset", "smoke", "--base-dir", str(base), "--run-name", "other")
    assert code == 0 and "Stages without results" in (base / "runs" / "other" / "report.md").read_text()
    assert (run_dir(base) / "report" / "pretrain.json").is_file()  # the first run is untouched
    assert train.main(["--stage", "tokenizer", "--preset", "smoke", "--base-dir", str(base), "--run-name", "again"]) == 0
    assert "tokenizer: the one trained with these settings" in capsys.readouterr().out  # not trained twice
    tokenizers = [(base / "runs" / r / "tokenizer" / "tokenizer.json").read_bytes() for r in (RUN, "again")]
    assert tokenizers[0] == tokenizers[1]
    for bad in ("../x", "a/b", ".hidden", ""):
        code, err = run_main(capsys, "--stage", "report", "--preset", "smoke", "--base-dir", str(base), "--run-name", bad)
        assert code == 2 and "--run-name" in err, bad


def test_every_setting_is_either_a_stage_input_or_operational():
    """Each field declares its kind where it is defined: exactly one of a stage (with a stage that
    has settings) and operational; the lists derived from that cover every field once."""
    from dataclasses import fields

    from nanofast.presets import SETTING_STAGES, Settings, operational_settings, setting, stage_settings

    for f in fields(Settings):
        stage, operational = f.metadata["stage"], f.metadata["operational"]
        assert (stage is not None) + operational == 1 and stage in (None, *SETTING_STAGES), f.name
    classified = [n for stage in SETTING_STAGES for n in stage_settings(stage)] + list(operational_settings())
    assert sorted(classified) == sorted(f.name for f in fields(Settings))
    assert list(SETTING_STAGES) == list(STAGES[:-1]) and STAGES[-1] == "report"
    for bad in (dict(), dict(stage="pretrain", operational=True), dict(stage="report")):
        with pytest.raises(TypeError, match="declare exactly one of operational=True and stage="):
            setting(1, "a setting of no kind", **bad)


def test_settings_kinds_keep_their_values():
    """What the code derives from the fields' declarations: the sizes that must be positive, each
    stage's own settings, the operational ones and the architecture's run-name tags."""
    from nanofast.presets import model_tags, operational_settings, positive_settings, stage_settings

    assert set(positive_settings()) == {
        "corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars", "depth", "aspect_ratio", "head_dim",
        "seq_len", "device_batch_size", "target_param_data_ratio", "eval_tokens", "core_examples",
        "dist_timeout_minutes", "wait_minutes", "task_size", "rl_steps", "rl_questions", "rl_samples",
        "rl_max_tokens", "rl_lr_scale", "rl_eval_examples", "finetune_lr_scale", "eval_max_tokens"}
    assert {s: set(stage_settings(s)) for s in ("tokenizer", "midtrain", "sft", "rl", "eval")} == {
        "tokenizer": {"data", "corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars"},
        "midtrain": {"download_tasks", "task_size", "midtrain_iterations", "finetune_lr_scale"},
        "sft": {"post_training", "sft_iterations"},
        "rl": {"rl_steps", "rl_questions", "rl_samples", "rl_max_tokens", "rl_lr_scale", "rl_eval_examples",
               "rl_dtype"},
        "eval": {"eval_examples", "eval_max_tokens"}}
    assert set(stage_settings("pretrain")) == {
        "depth", "aspect_ratio", "head_dim", "window_pattern", "seq_len", "total_batch_size", "num_iterations",
        "target_param_data_ratio", "dtype", "linear_precision", "fp8_recipe", "seed",
        # nanochat's base_train optimizer hyperparameters
        "embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "warmup_steps",
        "warmdown_ratio", "final_lr_frac"}
    assert set(operational_settings()) == {
        "device_batch_size", "eval_every", "eval_tokens", "core_every", "core_examples", "save_every",
        "save_minutes", "keep_checkpoints", "log_every", "sample_tokens", "compile", "kernel_backend",
        "dispatch_as", "dist_timeout_minutes", "wait_minutes", "wandb"}
    assert model_tags() == (("depth", "d"), ("aspect_ratio", "a"), ("head_dim", "h"), ("window_pattern", "w"),
                            ("seq_len", "s"), ("vocab_size", "v"))


def test_pretraining_hyperparameters_are_settings_and_old_records_stay_valid():
    """nanochat's base_train LRs, weight decay and LR schedule are settings (flags), with its
    defaults, which the model's param groups, the optimizer's schedules and the loop default to; a
    changed one stales pretraining (and so every later stage); a record written before they were
    settings does not name them and stays valid."""
    import inspect
    from dataclasses import asdict

    from nanofast.model import GPT, config_for_depth
    from nanofast.optim import apply_schedules, lr_multiplier, muon_momentum
    from nanofast.presets import DEFAULTS, changed_settings
    from nanofast.trainer import LoopSettings

    groups = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28)
    schedule = dict(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)
    nanochat = {**groups, **schedule}
    assert {k: getattr(DEFAULTS, k) for k in nanochat} == nanochat
    for fn in (lr_multiplier, muon_momentum, apply_schedules, LoopSettings):
        for name, p in inspect.signature(fn).parameters.items():
            if name in schedule:
                assert p.default == schedule[name], (fn, name)

    def hyper(param_groups):
        return [{k: v for k, v in g.items() if k != "params"} for g in param_groups]

    model = GPT(config_for_depth(1, 64, 16, head_dim=64))
    assert hyper(model.param_groups()) == hyper(model.param_groups(**groups))
    assert hyper(model.param_groups()) != hyper(model.param_groups(**dict(groups, matrix_lr=0.03)))
    s = make_settings("smoke", matrix_lr=0.03, warmup_steps=5)
    args = train.parse_args(["--stage", "all", "--matrix-lr", "0.03", "--warmup-steps", "5", "--final-lr-frac", "0"])
    assert (args.matrix_lr, args.warmup_steps, args.final_lr_frac) == (0.03, 5, 0.0)
    recorded = asdict(make_settings("smoke"))
    for stage in ("pretrain", "sft", "report"):
        assert changed_settings(recorded, s, stage) == {"matrix_lr": (0.02, 0.03), "warmup_steps": (40, 5)}
    assert changed_settings(recorded, s, "tokenizer") == {}
    old_record = {k: v for k, v in recorded.items() if k not in nanochat}
    assert changed_settings(old_record, make_settings("smoke"), "report") == {}
    assert changed_settings(old_record, s, "report") == {}


def test_wandb_logs_the_reports_numbers_offline(tokenized, tmp_path, monkeypatch):
    """--wandb PROJECT, in wandb's offline mode, read back from wandb's own run files: every
    pretraining step's loss and every val bpb equal the report's, the report's numbers are the run's
    summary, and a killed run started again continues the same wandb run."""
    pytest.importorskip("wandb")
    from wandb_records import read_offline_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = copy_base(tokenized, tmp_path / "wandb")
    args = ("--num-iterations", "4", "--save-every", "2", "--eval-every", "2", "--wandb", "nanofast-test")
    assert pretrain(base, *args) == 0
    full = section(base, "pretrain")
    interrupt_before(base, "pretrain", "base", 4)
    assert pretrain(base, *args) == 0
    resumed = section(base, "pretrain")
    history, summary, ids = read_offline_runs(run_dir(base))
    assert len(ids) == 1  # one wandb run across both processes
    logged = [(r["pretrain/step"], r["pretrain/loss"]) for r in history if "pretrain/loss" in r]
    expected = full["losses"] + resumed["losses"][2:]  # steps 1-4, then 3-4 again after the resume
    assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2, 3, 4, 3, 4]
    assert [loss for _, loss in logged] == pytest.approx([loss for _, loss in expected], abs=1e-6)
    bpb = [(r["pretrain/step"], r["pretrain/val_bpb"]) for r in history if "pretrain/val_bpb" in r]
    assert bpb == [(e["step"], e["val_bpb"]) for e in full["evals"] + resumed["evals"][-1:]]
    assert all("pretrain/tokens_per_second" in r for r in history if "pretrain/loss" in r)
    assert summary["pretrain/val_bpb"] == resumed["val_bpb"]
    assert summary["pretrain/params/total"] == resumed["params"]["total"]


def test_wandb_logs_rl_steps_offline(sft_base, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_records import read_offline_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = copy_base(sft_base, tmp_path / "rl_wandb")
    assert rl(base, "--wandb", "nanofast-test") == 0
    sec = section(base, "rl")
    history, summary, _ = read_offline_runs(run_dir(base))
    rows = [r for r in history if "rl/reward" in r]
    assert [(r["rl/step"], r["rl/reward"], r["rl/kl_engine_trainer"]) for r in rows] == \
        [(h["step"], h["reward"], h["kl_engine_trainer"]) for h in sec["history"]]
    assert summary["rl/heldout_after/greedy/accuracy"] == sec["heldout_after"]["greedy"]["accuracy"]


def test_wandb_without_the_package_is_a_one_line_error(tokenized, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    base = copy_base(tokenized, tmp_path / "no_wandb")
    code, err = run_main(capsys, "--stage", "pretrain", "--preset", "smoke", "--base-dir", str(base),
                         "--wandb", "nanofast-test")
    assert code == 1 and "--wandb nanofast-test: the wandb package is not installed" in err
    assert not (run_dir(base) / "checkpoints").exists()  # refused before any work
