"""nanofast's one entry point: every stage of the pipeline, on a laptop CPU or on 8xH100.

    python train.py --stage all                                   # CPU: the `cpu` preset
    torchrun --standalone --nproc_per_node=8 train.py --stage all # 8 GPUs: the `speedrun` preset
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from nanofast.common import (autodetect_device, base_dir, init_distributed, cpu_process_setup, print0,
                             shutdown_distributed)
from nanofast.pipeline import STAGES, Run, report_path, run_stages, stages_of
from nanofast.presets import PRESETS, Settings, check_run_name, make_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help=f"one of: {', '.join(STAGES)}, all")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="default: speedrun with a GPU, cpu without")
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
    cpu_process_setup()  # measured: see nanofast.common.keep_freed_memory and the README
    code = main()
    if "RANK" in os.environ:
        # gloo's worker threads occasionally abort the interpreter's teardown after the group is
        # destroyed ("terminate called without an active exception"), turning a finished run into a
        # failed one: skip the teardown once everything is written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
