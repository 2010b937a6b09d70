"""The report card: each stage writes a JSON section; the report stage renders report.md from them."""
from __future__ import annotations

import json
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


def plot_losses(losses: list[tuple[int, float]], evals: list[dict], path: Path) -> Path:
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
    ax.set_title("pretraining")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(report_dir: str | Path, out_path: str | Path) -> Path:
    """Render report.md (and loss_curve.png beside it) from the stage sections present."""
    report_dir, out_path = Path(report_dir), Path(out_path)
    sections = {s: read_section(report_dir, s) for s in STAGE_ORDER}
    lines = [f"# nanofast report", "", f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.", ""]
    lines += ["## System", ""] + [f"- {k}: {v}" for k, v in system_info().items()] + [""]

    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for stage in STAGE_ORDER:
        sec = sections[stage]
        status = "done" if sec else "not run"
        lines.append(f"| {stage} | {status} | {sec.get('seconds', 0):.1f} |" if sec else f"| {stage} | {status} | - |")
    lines.append("")

    tok = sections["tokenizer"]
    if tok:
        lines += ["## Tokenizer", "", f"- vocab size: {tok['vocab_size']:,}",
                  f"- trained on {tok['train_chars']:,} characters in {tok['train_seconds']:.1f} s", "",
                  tok.get("compression_table", ""), ""]

    pre = sections["pretrain"]
    if pre:
        mfu = "n/a (no GPU peak known)" if pre.get("mfu") is None else f"{pre['mfu']:.1f}%"
        lines += ["## Base model (pretrain)", "",
                  f"- config: {pre['model_config']}",
                  f"- parameters: {pre['params']['total']:,} (matrices {pre['params']['transformer_matrices']:,}, "
                  f"lm_head {pre['params']['lm_head']:,}, embeddings {pre['params']['wte'] + pre['params']['value_embeds']:,})",
                  f"- FLOPs per token: {pre['flops_per_token']:.3e}",
                  f"- steps: {pre['num_iterations']:,} x {pre['total_batch_size']:,} tokens "
                  f"({pre['num_iterations'] * pre['total_batch_size']:,} tokens), {pre['world_size']} process(es), "
                  f"{pre['device']} {pre['dtype']}",
                  f"- final train loss: {pre['final_loss']:.4f}; val bpb: {pre['val_bpb']:.4f}",
                  f"- throughput: {pre['median_tokens_per_second']:,.0f} tokens/s (median step), MFU: {mfu}",
                  f"- training time: {pre['train_seconds']:.1f} s", ""]
        png = plot_losses([tuple(x) for x in pre.get("losses", [])], pre.get("evals", []),
                          out_path.with_name("loss_curve.png"))
        lines += [f"![loss curve]({png.name})", ""]
        if pre.get("samples"):
            lines += ["### Samples", ""] + [f"```\n{s}\n```" for s in pre["samples"]] + [""]

    missing = [s for s in STAGE_ORDER if sections[s] is None]
    if missing:
        lines += [f"Stages without results: {', '.join(missing)}.", ""]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines))
    return out_path
