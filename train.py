"""nanofast's one entry point: every stage of the pipeline, on a laptop CPU or on 8xH100.

    python train.py --stage all                                   # CPU: the `cpu` preset
    torchrun --standalone --nproc_per_node=8 train.py --stage all # 8 GPUs: the `speedrun` preset
"""
from __future__ import annotations

import argparse
import os
import sys

from nanofast.common import autodetect_device, base_dir, init_distributed, print0, shutdown_distributed
from nanofast.kernels import BACKENDS
from nanofast.ops import KERNEL_BACKEND_HELP
from nanofast.pipeline import STAGES, Run, report_path, run_stages
from nanofast.presets import PRESETS, check_run_name, make_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help=f"one of: {', '.join(STAGES)}, all")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="default: speedrun with a GPU, cpu without")
    p.add_argument("--base-dir", default=None, help="artefact folder (env NANOFAST_BASE_DIR, default ~/.cache/nanofast)")
    p.add_argument("--run-name", default=None,
                   help="this run's folder, <base-dir>/runs/NAME (default: from the architecture, e.g. d24)")
    p.add_argument("--data", choices=["default", "climbmix"], default=None, help="pretraining corpus")
    p.add_argument("--depth", type=int, default=None, help="the model-size dial (d_model = 64 x depth)")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--window-pattern", default=None, help="sliding windows tiled over layers, e.g. SSSL")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--device-batch-size", type=int, default=None)
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step; -1 = nanochat's rule")
    p.add_argument("--num-iterations", type=int, default=None, help="-1 = from --target-param-data-ratio")
    p.add_argument("--target-param-data-ratio", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--core-every", type=int, default=None,
                   help="CORE during pretraining every N steps (a multiple of --eval-every) and at the end; <= 0: off")
    p.add_argument("--core-examples", type=int, default=None, help="examples per CORE task during pretraining")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (<= 0: by time only)")
    p.add_argument("--save-minutes", type=float, default=None,
                   help="also checkpoint every this many minutes of training (default 30; <= 0: off)")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help="newest checkpoints kept per stage (default 2; <= 0: all)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--linear-precision", default=None,
                   help="GEMM precision of the linears in pretraining: fp8 | fp16 | bf16 | fp32 (attention and "
                        "MLP), or per class, e.g. attn=fp8,mlp=fp8,lm_head=bf16; fp8 layers run in the compute "
                        "dtype for evaluation and inference")
    p.add_argument("--fp8-recipe", choices=["tensorwise", "rowwise"], default=None, help="fp8 dynamic scaling")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the training step")
    p.add_argument("--kernel-backend", choices=BACKENDS, default=None, help=KERNEL_BACKEND_HELP)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dist-timeout-minutes", type=float, default=None,
                   help="several ranks: collective timeout (default 30)")
    p.add_argument("--wait-minutes", type=float, default=None,
                   help="several ranks: how long the others wait for rank 0's own work, e.g. evaluations (default 360)")
    p.add_argument("--download-tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch the real task datasets (SmolTalk, MMLU, ARC, GSM8K, HumanEval, CORE); "
                        "default: cached data, else generated offline data")
    p.add_argument("--task-size", type=int, default=None, help="cap on examples per task")
    p.add_argument("--midtrain-iterations", type=int, default=None, help="-1 = one epoch of the mixture")
    p.add_argument("--sft-iterations", type=int, default=None, help="-1 = one epoch of the mixture")
    p.add_argument("--rl-steps", type=int, default=None)
    p.add_argument("--rl-samples", type=int, default=None, help="answers per question (GRPO group size)")
    p.add_argument("--rl-lr-scale", type=float, default=None, help="RL learning rates relative to pretraining's")
    p.add_argument("--rl-eval-examples", type=int, default=None,
                   help="held-out questions answered before and after RL (greedy and sampled)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="RL compute precision; fp16 (with loss scaling) removes most of the sampler/trainer "
                        "mismatch that bf16 rounding causes")
    p.add_argument("--eval-examples", type=int, default=None, help="examples per evaluation task (-1: all)")
    args = p.parse_args(argv)
    valid = list(STAGES) + ["all"]
    if args.stage not in valid:
        p.error(f"unknown stage {args.stage!r}: choose one of {', '.join(valid)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = autodetect_device()
    preset = args.preset or ("speedrun" if device == "cuda" else "cpu")
    overrides = {k: v for k, v in vars(args).items() if k not in ("stage", "preset", "base_dir", "run_name")}
    try:
        settings = make_settings(preset, **overrides)
        name = check_run_name(args.run_name) if args.run_name is not None else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        base = base_dir(args.base_dir)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Run(settings=settings, base=base, device=device,
              dist=init_distributed(device, settings.dist_timeout_minutes), name=name)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    try:
        outcome = run_stages(run, stages)
    except (ValueError, FileNotFoundError) as e:  # our one-line, actionable errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    print0("\nstages: " + "; ".join(f"{s}: {o}" for s, o in outcome.items()))
    if "report" in outcome:
        print0(f"report: {report_path(run)}")
    return 0


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:
        # gloo's worker threads occasionally abort the interpreter's teardown after the group is
        # destroyed ("terminate called without an active exception"), turning a finished run into a
        # failed one: skip the teardown once everything is written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
