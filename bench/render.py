"""Markdown (and the roofline PNG) of bench's results: one `python -m bench.gpu_check` record, and
the performance page (bench/performance.md) that `python -m bench.performance` writes.

The tools import this module; it imports none of them (only bench.guard's machine-code rule and
bench.vs_nanochat's table, which import nothing of bench), so bench has no import circle. It runs
on a bare GPU machine (torch only: matplotlib is imported inside `roofline_png`), as
`python3 -m bench.gpu_check` needs.
"""
from __future__ import annotations

import json
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "baselines"
NOT_MEASURED = "not measured (no GPU run yet)"
STATUSES = ("pass", "fail", "error", "crashed", "timeout", "skipped")  # a gpu_check record's check statuses


# --------------------------------------------------------------------------------------------
# One gpu_check record
# --------------------------------------------------------------------------------------------

def check_summary(rec: dict) -> str:
    """": why" for a check that did not pass, its times for a speed check, its failing cases."""
    if rec["status"] in ("error", "crashed", "timeout", "skipped"):
        why = rec.get("error", rec.get("reason", ""))
        last = rec.get("output_tail", "").strip().splitlines()[-1:]
        return ": " + why + (f" | {last[0][:200]}" if last else "")
    if "times_ms" in rec:
        return ": " + ", ".join(f"{k} {v:.3f} ms" for k, v in rec["times_ms"].items())
    bad = [c["case"] for c in rec.get("cases", []) if not c["ok"]]
    return f": failing {bad}" if bad else ""


def status_counts(record: dict) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in record["checks"]) for s in STATUSES}


def gpu_check_markdown(record: dict) -> str:
    """Markdown of one gpu_check record for the performance page: what passed, the speed of each
    implementation (and its fraction of peak), and the backend each op gets from it."""
    m = record.get("machine", {})
    counts = status_counts(record)
    lines = [f"{m.get('gpu') or record['machine_class']}, torch {m.get('torch')}, triton {m.get('triton')}, "
             f"{record['elapsed_s']} s{' (dry run: CPU timings of toy shapes)' if record['dry_run'] else ''}: "
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
             f"{counts['crashed']} crashed, {counts['timeout']} timed out, {counts['skipped']} skipped"
             f"{'' if record.get('finished', True) else ' (the run ended early)'}.", ""]
    bad = [r for r in record["checks"] if r["status"] != "pass"]
    if bad:
        lines += ["| check | status | why |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {check_summary(r).lstrip(': ').replace('|', '/')} |"
                  for r in bad] + [""]
    lines += ["| speed check | time per call (ms) | fraction of peak |", "|---|---|---|"]
    for r in record["checks"]:
        if r["section"] == "speed" and r["status"] == "pass":
            times = ", ".join(f"{k} {v:.3f}" for k, v in r["times_ms"].items())
            fracs = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("fraction_of_peak", {}).items())
            extra = f" ({r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.0f}%)" if r.get("mfu") else ""
            lines.append(f"| {r['name']} | {times}{extra} | {fracs or 'n/a'} |")
    return "\n".join(lines)


def gpu_check_section(root: Path = BASELINES) -> str:
    """Each device class's committed `python -m bench.gpu_check` record, or why there is none."""
    records = [(p.parent.name, json.loads(p.read_text())) for p in sorted(root.glob("*/gpu_check.json"))]
    if not records:
        return ("No GPU has run `make gpu-check` yet: no compiled kernel has executed on hardware, and each op's "
                "backend on a GPU is its unmeasured default (docs/dispatch.md).")
    return "\n\n".join(f"**{name}**: {gpu_check_markdown(rec)}" for name, rec in records)


# --------------------------------------------------------------------------------------------
# Benchmark results
# --------------------------------------------------------------------------------------------

def gpu_name(result: dict) -> str | None:
    info = result.get("machine_info", {})
    return (info.get("nanofast") or {}).get("gpu")


def peaks_for(name: str) -> tuple[float, float, float | None] | None:
    """(DRAM bytes/s, bf16 FLOP/s, fp8 FLOP/s or None) of a GPU by name, from nanofast.common's
    table; None when the GPU or its bandwidth is not listed."""
    from nanofast.common import gpu_peak

    peak = gpu_peak(name)
    if peak is None or not peak.gbps:
        return None
    return peak.gbps * 1e9, peak.bf16_flops, peak.fp8_flops


def reference_roof() -> tuple[str, float, float, float | None]:
    """Drawn when no GPU result exists: the H100 SXM's spec roof, labelled so."""
    return ("H100 SXM", *peaks_for("H100 SXM"))


def seconds_per_call(bench: dict) -> float:
    """Median of a round divided by the calls each round makes (extra_info calls_per_round)."""
    return bench["stats"]["median"] / max(int(bench.get("extra_info", {}).get("calls_per_round", 1)), 1)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def machine_line(result: dict) -> str:
    info = result.get("machine_info", {})
    ours = info.get("nanofast") or (info if "machine_class" in info else {})  # guard JSON: the summary itself
    commit = ours.get("git_commit") or result.get("commit_info", {}).get("id", "")[:7] or "?"
    return (f"{ours.get('machine_class', info.get('node', '?'))}: CPU {ours.get('cpu', '?')} x{ours.get('cpu_count', '?')} "
            f"cores ({ours.get('torch_threads', '?')} torch threads), GPU {ours.get('gpu') or 'none'}, "
            f"torch {ours.get('torch', '?')}, triton {ours.get('triton', '?')}, CUDA {ours.get('cuda') or 'none'}, "
            f"commit {commit}, {str(result.get('datetime', '?'))[:19]}")


def gpu_kernel_table(models: list, results: list[dict]) -> tuple[str, list[dict]]:
    """Per kernel model (bench.performance.KernelModel: label, benchmark, bytes, flops, precision):
    bytes, FLOPs, intensity, and achieved / % of peak from GPU results only."""
    gpu_runs = [r for r in results if gpu_name(r)]
    rows = ["| kernel (GPU shape) | bytes / call | FLOPs / call | FLOP/byte | GPU | time / call | achieved | % of peak |",
            "|---|---:|---:|---:|---|---:|---:|---:|"]
    points = []
    for m in models:
        intensity = m.flops / m.bytes
        cells = [m.label, _fmt_bytes(m.bytes), _fmt_flops(m.flops), f"{intensity:.2f}"]
        found = None
        for run in gpu_runs:
            bench = next((b for b in run["benchmarks"] if b.get("name") == m.benchmark), None)
            if bench is not None:
                found = (run, bench)
        if found is None:
            rows.append("| " + " | ".join(cells + [NOT_MEASURED] * 4) + " |")
            continue
        run, bench = found
        name, sec = gpu_name(run), seconds_per_call(bench)
        peak = peaks_for(name)
        bw, fl = m.bytes / sec, m.flops / sec
        if peak is None:
            frac_txt = "peak unknown"
        else:
            flop_peak = peak[2] if m.precision == "fp8" and peak[2] else peak[1]
            roof = min(flop_peak, intensity * peak[0])  # the roofline's attainable rate at this intensity
            frac_txt = f"{100 * fl / roof:.1f}% of roof"
            points.append({"label": m.label, "intensity": intensity, "flops_per_s": fl})
        rows.append("| " + " | ".join(cells + [name, f"{1e6 * sec:.1f} us", f"{bw / 1e9:.0f} GB/s, {fl / 1e12:.2f} TFLOP/s",
                                               frac_txt]) + " |")
    return "\n".join(rows), points


def benchmark_table(result: dict) -> str:
    """Every benchmark of one run: group, name, median, rounds, and x slower than the group's best."""
    groups: dict[str, list[dict]] = {}
    for b in result["benchmarks"]:
        groups.setdefault(b.get("group") or "", []).append(b)
    rows = ["| group | benchmark | median | rounds | vs best in group |", "|---|---|---:|---:|---:|"]
    for group in sorted(groups):
        best = min(b["stats"]["median"] for b in groups[group])
        for b in sorted(groups[group], key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            rows.append(f"| {group or '-'} | `{b['name']}` | {1e3 * med:.2f} ms | {b['stats']['rounds']} | "
                        f"{med / best:.2f}x |")
    return "\n".join(rows)


def guard_table(guard: dict) -> str:
    rows = ["| guarded ratio | fast | slow | measured | floor |", "|---|---|---|---:|---:|"]
    for r in guard.get("results", []):
        if r.get("kind") != "ratio":
            continue
        if "ratio" in r:
            rows.append(f"| {r['name']} | {r['fast']} ({1e3 * r['fast_median_s']:.1f} ms) | {r['slow']} "
                        f"({1e3 * r['slow_median_s']:.1f} ms) | {r['ratio']:.2f}x | {r['floor']:.2f}x |")
        else:
            rows.append(f"| {r['name']} | - | - | FAILED | {r['floor']:.2f}x |")
    return "\n".join(rows)


def facts_summary(facts: dict) -> str:
    from bench.guard import facts_problems

    rows = list(facts.get("kernels", {}).values())
    tri = [r for r in rows if r.get("source") == "triton"]
    cu = [r for r in rows if r.get("source") == "cuda"]
    spills = [r for r in rows if any("spills" in p for p in facts_problems("", r, None))]
    tc = {op: sum(1 for r in rows if r.get("instructions", {}).get(op)) for op in ("HGMMA", "QGMMA", "HMMA")}
    wide_loads = ("LDG.E.128", "LDGSTS.E.BYPASS.128", "UTMALDG")
    vec = sum(1 for r in rows if any(r.get("instructions", {}).get(op) for op in wide_loads))
    versions = facts.get("versions", {})
    return (f"{len(tri)} Triton configs (sm_90) and {len(cu)} CUDA kernels (sm_90a) compiled with triton "
            f"{versions.get('triton')} / nvcc {versions.get('nvcc')}: {len(spills)} spill; tensor-core MMAs in "
            + ", ".join(f"{n} ({op})" for op, n in tc.items())
            + f"; 128-bit, cp.async or TMA loads in {vec}; most registers {max((r['registers'] for r in rows), default=0)}.")


def facts_table(facts: dict) -> str:
    rows = ["| kernel | config | arch | registers | shared (B) | local (B) | stack (B) | key instructions |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for r in facts.get("kernels", {}).values():
        ins = ", ".join(f"{k} x{v}" for k, v in sorted(r.get("instructions", {}).items()))
        rows.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['registers']} | {r['shared_bytes']} | "
                    f"{r['local_bytes']} | {r.get('stack_bytes', 0)} | {ins} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The performance page
# --------------------------------------------------------------------------------------------

def roofline_png(models: list, points: list[dict], results: list[dict], path: Path) -> None:
    """Roofline: the GPU's roof (or the H100 SXM spec roof, labelled, when no GPU run exists), each
    kernel's arithmetic intensity as a vertical line, measured kernels as points. No CPU timing is
    placed on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = next((gpu_name(r) for r in results if gpu_name(r) and peaks_for(gpu_name(r))), None)
    if gpu:
        label, (bw, bf16, fp8) = gpu, peaks_for(gpu)
    else:
        ref = reference_roof()
        label, bw, bf16, fp8 = ref[0] + " spec (no GPU run yet)", *ref[1:]
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [2 ** (i / 4) for i in range(-16, 60)]
    ax.plot(xs, [min(bf16, x * bw) for x in xs], "k-", label=f"{label}: bf16 roof")
    if fp8:
        ax.plot(xs, [min(fp8, x * bw) for x in xs], "k--", label=f"{label}: fp8 roof")
    for i, m in enumerate(models):
        color = f"C{i % 10}"
        ax.axvline(m.flops / m.bytes, color=color, lw=0.8, ls=":", label=m.label)
    for p in points:
        ax.plot([p["intensity"]], [p["flops_per_s"]], "o", color="red")
        ax.annotate(p["label"].split(" ")[0], (p["intensity"], p["flops_per_s"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, from the byte models)")
    ax.set_ylabel("FLOP/s")
    title = "measured kernels (points)" if points else "no GPU measurement yet: intensities only (dotted)"
    ax.set_title(f"Roofline: {title}")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: reproducible bytes
    plt.close(fig)


def performance_page(models: list, results: list[dict], facts: dict, guard: dict | None, png_rel: str,
                     baselines: Path = BASELINES) -> str:
    """bench/performance.md: the runs, the kernels on the GPU (byte/FLOP model, achieved only when
    measured), the guard's ratios, nanofast vs nanochat, the gpu_check records, the kernels' machine
    code, then every benchmark of every run."""
    from bench.vs_nanochat import render as vs_nanochat_markdown

    gpu_tab, _ = gpu_kernel_table(models, results)
    runs = "\n".join(f"- {machine_line(r)}" for r in results) or "- no benchmark results found"
    gpu_note = ("No GPU run has happened yet: every GPU cell says so, and no number is estimated from CPU timings."
                if not any(gpu_name(r) for r in results) else "GPU cells come from the GPU results listed above.")
    note = ("Bytes: each tensor read or written once (the benchmark files' byte models). FLOPs: exact for the "
            "GEMM-like kernels; for elementwise ones an approximate few per element, only to place them on the roofline.")
    page = ["# nanofast performance\n", "Generated by `python -m bench.performance`; do not edit by hand.\n",
            f"Results:\n\n{runs}\n", "### Kernels on the GPU (byte/FLOP model per call; achieved only when measured)\n",
            gpu_note + " " + note + "\n", gpu_tab + "\n", f"![roofline]({png_rel})\n"]
    if guard:
        page += ["### Guarded same-run ratios (CPU)\n", f"{machine_line(guard)}\n", guard_table(guard) + "\n"]
    for path in sorted(baselines.glob("*/vs_nanochat.json")):
        page += [f"### nanofast vs nanochat, side by side ({path.parent.name})\n",
                 vs_nanochat_markdown(json.loads(path.read_text())) + "\n"]
    page += ["### Compiled kernels on a GPU (`make gpu-check`)\n", gpu_check_section(baselines) + "\n"]
    page += ["### Kernel machine code (guarded against bench/baselines/kernel_facts.json)\n", facts_summary(facts) + "\n"]
    for r in results:
        page += [f"### All benchmarks: {machine_line(r)}\n", benchmark_table(r) + "\n"]
    page += ["### Machine-code facts of every kernel config\n", facts_table(facts) + "\n"]
    return "\n".join(page)
