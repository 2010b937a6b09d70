"""The report card: each stage writes a JSON section; the report stage renders report.md from them."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from nanofast.common import system_info

STAGE_ORDER = ("tokenizer", "pretrain", "midtrain", "sft", "rl", "eval")


def write_section(report_dir: str | Path, stage: str, data: dict) -> Path:
    """Record a finished stage's metrics as `<report_dir>/<stage>.json` (written atomically)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"{stage}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(data, stage=stage), indent=2, default=str))
    tmp.replace(path)
    return path


def read_section(report_dir: str | Path, stage: str) -> dict | None:
    path = Path(report_dir) / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


# The rate the cost line uses: a typical on-demand H100 SXM price (nanochat's $24/h for 8 GPUs).
DOLLARS_PER_GPU_HOUR = 3.0
CHAT_COLUMNS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")
MODEL_LABELS = (("base", "BASE"), ("mid", "MID"), ("sft", "SFT"), ("rl", "RL"))


def plot_losses(losses: list[tuple[int, float]], evals: list[dict], path: Path, title: str = "pretraining") -> Path:
    """Training loss per step (and val bpb where measured) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, label="train loss (nats/token)", linewidth=1)
    points = [(e["step"], e["val_bpb"]) for e in evals if "val_bpb" in e]
    if points:
        ax2 = ax.twinx()
        ax2.plot(*zip(*points), "o-", color="tab:red", label="val bpb")
        ax2.set_ylabel("val bits per byte")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(report_dir: str | Path, out_path: str | Path, planned: Sequence[str] = STAGE_ORDER) -> Path:
    """Render report.md (and loss_curve.png beside it) from the stage sections present; a `planned`
    stage (those `--stage all` runs) without a section is listed as missing."""
    report_dir, out_path = Path(report_dir), Path(out_path)
    sections = {s: read_section(report_dir, s) for s in STAGE_ORDER}
    lines = ["# nanofast report", "", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.", ""]
    lines += ["## System", ""] + [f"- {k}: {v}" for k, v in system_info().items()] + [""]

    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for stage in STAGE_ORDER:
        sec = sections[stage]
        status = "done" if sec else "not run" if stage in planned else "not planned (--post-training)"
        lines.append(f"| {stage} | {status} | {sec.get('seconds', 0):.1f} |" if sec else f"| {stage} | {status} | - |")
    lines.append("")

    tok = sections["tokenizer"]
    if tok:
        lines += ["## Tokenizer", "", f"- vocab size: {tok['vocab_size']:,}",
                  f"- trained on {tok['train_chars']:,} characters in {tok['train_seconds']:.1f} s", "",
                  tok.get("compression_table", ""), ""]

    pre = sections["pretrain"]
    if pre:
        lines += ["## Base model (pretrain)", "",
                  f"- config: {pre['model_config']}",
                  f"- parameters: {pre['params']['total']:,} (matrices {pre['params']['transformer_matrices']:,}, "
                  f"lm_head {pre['params']['lm_head']:,}, embeddings {pre['params']['wte'] + pre['params']['value_embeds']:,})",
                  f"- FLOPs per token: {pre['flops_per_token']:.3e}",
                  f"- steps: {pre['num_iterations']:,} x {pre['total_batch_size']:,} tokens "
                  f"({pre['num_iterations'] * pre['total_batch_size']:,} tokens), {pre['world_size']} process(es), "
                  f"{pre['device']} {pre['dtype']}",
                  f"- kernels: {_kernels(pre)}, "
                  f"{'compiled' if pre.get('compile') else 'eager'} training step",
                  f"- attention: {pre.get('attention', 'not recorded')}",
                  f"- final train loss: {pre['final_loss']:.4f}; val bpb: {pre['val_bpb']:.4f}",
                  f"- throughput: {pre['median_tokens_per_second']:,.0f} tokens/s (median step), MFU: {_mfu(pre.get('mfu'))}",
                  f"- training time: {pre['train_seconds']:.1f} s", ""]
        if pre.get("precision_report"):
            from nanofast.precision import precision_table

            lines += [f"### Matmul precision ({pre['linear_precision']}, fp8 recipe {pre['fp8_recipe']})", "",
                      precision_table(pre["precision_report"]), ""]
        png = plot_losses([tuple(x) for x in pre.get("losses", [])], pre.get("evals", []),
                          out_path.with_name("loss_curve.png"))
        lines += [f"![loss curve]({png.name})", ""]
        if pre.get("samples"):
            lines += ["### Samples", ""] + [f"```\n{s}\n```" for s in pre["samples"]] + [""]

    for stage, title in (("midtrain", "Mid-training"), ("sft", "SFT")):
        sec = sections[stage]
        if not sec:
            continue
        bpb = "n/a" if sec.get("val_bpb") is None else f"{sec['val_bpb']:.4f}"
        lines += [f"## {title}", "",
                  f"- {sec['iterations']:,} steps over {sec['conversations']:,} conversations; task data: "
                  + ", ".join(f"{k} ({v})" for k, v in sec["task_sources"].items()),
                  f"- final train loss: {sec['final_loss']:.4f}; val bpb (held-out conversations): {bpb}",
                  f"- throughput: {sec['median_tokens_per_second']:,.0f} tokens/s computed (padding included)"
                  + (f", of which {sec['median_target_tokens_per_second']:,.0f}/s carry loss"
                     if "median_target_tokens_per_second" in sec else "")
                  + f"; MFU: {_mfu(sec.get('mfu'))}", ""]
        png = plot_losses([tuple(x) for x in sec.get("losses", [])], sec.get("evals", []),
                          out_path.with_name(f"loss_{stage}.png"), title=title)
        lines += [f"![{stage} loss]({png.name})", ""]

    rl = sections["rl"]
    if rl:
        b, a = rl.get("heldout_before") or {}, rl.get("heldout_after") or {}
        nan = {"accuracy": float("nan"), "n": 0}
        lines += ["## RL (GRPO)", "",
                  f"- {rl['steps']} steps x {rl['questions_per_step']} questions x {rl['samples']} samples on "
                  f"{rl['task']} ({rl['source']} data), precision {rl['precision']}"]
        changes = rl.get("heldout_change") or {}
        for mode in ("greedy", "sampled"):
            before, after = b.get(mode, nan), a.get(mode, nan)
            line = (f"- held-out accuracy ({mode}{', temperature 1' if mode == 'sampled' else ''}): "
                    f"{before['accuracy']:.4f} before -> {after['accuracy']:.4f} after (n={after['n']})")
            if mode in changes:
                c = changes[mode]
                line += (f"; paired change {c['change']:+.4f}, 95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] "
                         f"({c['improved']} questions gained, {c['worsened']} lost)")
            lines.append(line)
        lines += [f"- sampler/trainer mismatch ({rl['precision']}): mean |logp_engine - logp_trainer| "
                  f"{_num(rl.get('mean_logp_abs_diff'))}, KL(engine||trainer) {_num(rl.get('mean_kl'))}", ""]
        hist = rl.get("history", [])
        if hist:
            png = plot_rl(hist, out_path.with_name("rl_curve.png"))
            lines += [f"![rl]({png.name})", ""]

    ev = sections["eval"]
    if ev:
        results = ev["results"]
        lines += ["## Metrics", "", "| metric | " + " | ".join(lbl for key, lbl in MODEL_LABELS) + " |",
                  "|---|" + "---|" * len(MODEL_LABELS)]
        core = results.get("base", {}).get("core")
        lines.append("| CORE | " + " | ".join([f"{core['core']:.4f} ({core['source']})" if core else "-"]
                                             + ["-"] * (len(MODEL_LABELS) - 1)) + " |")
        bpb = results.get("base", {}).get("bpb")
        if bpb:
            lines.append(f"| bpb train / val | {bpb['train']:.4f} / {bpb['val']:.4f} | "
                         + " | ".join(["-"] * (len(MODEL_LABELS) - 1)) + " |")
        for task in (*CHAT_COLUMNS, "chatcore"):
            cells = []
            for key, _ in MODEL_LABELS:
                r = results.get(key, {})
                if task == "chatcore":
                    cells.append("-" if r.get("chatcore") is None else f"{r['chatcore']:.4f}")
                else:
                    t = r.get("tasks", {}).get(task)
                    cells.append("-" if t is None else f"{t['accuracy']:.4f} ({t['source']}, n={t['n']})")
            lines.append(f"| {'ChatCORE' if task == 'chatcore' else task} | " + " | ".join(cells) + " |")
        lines += ["", "Sources: real = the published dataset; offline = generated by nanofast when it was not "
                  "available (numbers are not comparable with published ones).", ""]

    total = sum(sections[st].get("seconds", 0.0) for st in STAGE_ORDER if sections[st])
    info = system_info()
    gpus = info.get("gpu_count") or 0
    cost = (f"${total / 3600 * gpus * DOLLARS_PER_GPU_HOUR:,.2f} at ${DOLLARS_PER_GPU_HOUR:.2f}/GPU-hour "
            f"({gpus} GPUs)" if gpus else "n/a (no GPU)")
    lines += ["## Time and cost", "", f"- wall time of all stages: {total / 60:.1f} min", f"- cost estimate: {cost}", ""]

    missing = [s for s in STAGE_ORDER if sections[s] is None and s in planned]
    if missing:
        lines += [f"Stages without results: {', '.join(missing)}.", ""]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines))
    return out_path


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def _kernels(pre: dict) -> str:
    """Who ran the kernel-backed ops of a pretraining run, for the report."""
    backend = pre.get("kernel_backend", "by device")
    if backend == "by device" and pre.get("dispatch_as"):
        return f"each op's backend as a {pre['dispatch_as']} run picks it"
    return f"{backend} backend"


def _mfu(x) -> str:
    return "n/a (no GPU peak known)" if x is None else f"{x:.1f}%"


def plot_rl(history: list[dict], path: Path) -> Path:
    """Mean reward and the sampler/trainer KL per RL step as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h["reward"] for h in history], label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["kl_engine_trainer"] for h in history], color="tab:red", label="KL(engine||trainer)")
    ax2.set_ylabel("KL")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title("RL")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
