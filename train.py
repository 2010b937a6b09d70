"""nanofast's one entry point: every stage of the pipeline, on a laptop CPU or on 8xH100.

    python train.py --stage all                                   # CPU: the `cpu` preset
    torchrun --standalone --nproc_per_node=8 train.py --stage all # 8 GPUs: the `speedrun` preset

The device: CUDA when torch can use it. Where GPUs are present but CUDA cannot use them (an old
driver, a CPU-only wheel, a CUDA_VISIBLE_DEVICES that hides them), or where several ranks find no
GPU, train.py stops with an error rather than train the CPU preset: to run on CPU there, name a CPU
preset (--preset smoke|cpu|rehearsal) or set NANOFAST_DEVICE=cpu (NANOFAST_DEVICE=cuda: CUDA or an
error).
"""
from __future__ import annotations

import os

# A torchrun rank's launcher, read before the imports below (seconds): if it dies meanwhile, the
# rank is reparented and die_with_parent sees it.
_PARENT = os.getppid()

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import fields  # noqa: E402

from nanofast.common import (DeviceError, base_dir, choose_device, cpu_process_setup,  # noqa: E402
                             die_with_parent, init_distributed, print0, shutdown_distributed)
from nanofast.pipeline import STAGES, Run, report_path, run_stages, stages_of  # noqa: E402
from nanofast.presets import PRESETS, Settings, check_run_name, make_settings  # noqa: E402

GPU_PRESETS = ("speedrun",)  # naming any other preset asks for a CPU-sized run: CPU is then fine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help=f"one of: {', '.join(STAGES)}, all")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="default: speedrun with a GPU, cpu without (one process; see above: a broken GPU "
                        "or several ranks without one is an error unless a preset other than speedrun is "
                        "named or NANOFAST_DEVICE=cpu)")
    p.add_argument("--base-dir", default=None, help="artefact folder (env NANOFAST_BASE_DIR, default ~/.cache/nanofast)")
    p.add_argument("--run-name", default=None,
                   help="this run's folder, <base-dir>/runs/NAME (default: from the architecture, e.g. d24)")
    for f in fields(Settings):  # one flag per setting, as the preset's override
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).replace(" | None", "")
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            choices = f.metadata["choices"]
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=None,
                           metavar="|".join(choices) if choices else None, help=f.metadata["help"])
    args = p.parse_args(argv)
    valid = list(STAGES) + ["all"]
    if args.stage not in valid:
        p.error(f"unknown stage {args.stage!r}: choose one of {', '.join(valid)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = choose_device(asked_cpu=args.preset is not None and args.preset not in GPU_PRESETS)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    stages = stages_of(args.stage, settings)
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
    if "RANK" in os.environ:  # a torchrun rank: it dies with its launcher (see die_with_parent)
        die_with_parent(_PARENT)
    cpu_process_setup()  # why: nanofast.common.keep_freed_memory (measured: docs/cpu-performance.md)
    code = main()
    if "RANK" in os.environ:
        # gloo's worker threads occasionally abort the interpreter's teardown after the group is
        # destroyed ("terminate called without an active exception"), turning a finished run into a
        # failed one: skip the teardown once everything is written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
