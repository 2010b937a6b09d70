"""The performance page: markdown tables and a roofline plot from the latest benchmark results.

    python -m bench.performance                       # refresh bench/performance.md, the PNG, README's section
    python -m bench.performance --results a.json b.json --guard guard.json --no-readme

Inputs: pytest-benchmark JSON files (default: the newest per machine class under bench/baselines/),
bench/baselines/kernel_facts.json, and optionally the guard's `--guard-json` output (default:
bench/baselines/<class>/guard.json when present). Per kernel, bytes and FLOPs per call come from the
benchmark files' byte models; achieved throughput and % of peak only from a GPU result. A cell
with no GPU measurement says so; nothing is extrapolated from CPU timings.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
BASELINES = BENCH / "baselines"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
NOT_MEASURED = "not measured (no GPU run yet)"

# Spec peaks (dense, no sparsity): DRAM bytes/s, bf16 and fp8 FLOP/s, by GPU name fragment.
GPU_PEAKS = [("H100 PCIe", 2.0e12, 756e12, 1513e12), ("H100 NVL", 3.9e12, 835e12, 1671e12),
             ("H100", 3.35e12, 989e12, 1979e12), ("H200", 4.8e12, 989e12, 1979e12), ("A100", 2.039e12, 312e12, None)]
REFERENCE_ROOF = ("H100 SXM", 3.35e12, 989e12, 1979e12)  # drawn when no GPU result exists: the spec, labelled so


@dataclass(frozen=True)
class KernelModel:
    """One kernel call at a nanochat shape: the GPU benchmark that times it and its byte/FLOP model."""
    label: str
    benchmark: str  # pytest-benchmark `name` of the GPU case
    bytes: int
    flops: int
    precision: str  # which FLOP peak applies: "bf16" or "fp8"


def kernel_models() -> list[KernelModel]:
    """Bytes and FLOPs per call from the benchmark files' own models (each tensor moved once)."""
    from bench import test_bench_fp8_quant as fq
    from bench import test_bench_newton_schulz as ns
    from bench import test_bench_paged_attention as pa
    from bench import test_bench_qk_norm_rope as qk
    from bench import test_bench_rms_norm as rn

    def elementwise_flops(n: int, per: int) -> int:  # a few FLOPs per element: intensity well below 1
        return n * per

    gemm_m, gemm_n, gemm_k = 1 << 15, 5120, 1280
    return [
        KernelModel("rms_norm fwd 16384x1280 bf16", "test_bench_rms_norm[16384x1280-triton-fwd-plain]",
                    rn.bytes_moved(16384, 1280, "fwd", False, 2), elementwise_flops(16384 * 1280, 4), "bf16"),
        KernelModel("rms_norm fwd+bwd 16384x1280 bf16", "test_bench_rms_norm[16384x1280-triton-fwd+bwd-plain]",
                    rn.bytes_moved(16384, 1280, "fwd+bwd", False, 2), elementwise_flops(16384 * 1280, 10), "bf16"),
        KernelModel("qk_norm_rope fwd B32 T2048 H10 D128 bf16", "test_bench_qk_norm_rope_gpu[triton-B32xT2048xH10-fwd]",
                    qk.bytes_moved(32, 2048, 10, 10, 128, 2, backward=False),
                    elementwise_flops(32 * 2048 * 20 * 128, 8), "bf16"),
        KernelModel("paged decode B64 ctx2048 Hq32 Hkv8 D128 bf16",
                    "test_bench_paged_decode[B64-ctx2048-q32kv8-D128-triton]",
                    pa.bytes_read([2048] * 64, 32, 8, 128, 2), 4 * 64 * 32 * 2048 * 128, "bf16"),
        KernelModel("fp8 quant tensorwise+T 16384x6144 bf16", "test_bench_fp8_quant[16384x6144-triton-tensorwise+T]",
                    fq.bytes_moved(16384, 6144, "tensorwise+T", 2), elementwise_flops(16384 * 6144, 3), "bf16"),
        KernelModel("Muon prologue 12x5120x1280 fp32->bf16", "test_bench_prologue_gpu[12x5120x1280-fused_triton]",
                    ns.prologue_bytes((12, 5120, 1280), __import__("torch").bfloat16),
                    elementwise_flops(12 * 5120 * 1280, 8), "bf16"),
        KernelModel("Newton-Schulz 5 steps 5120x1280 bf16", "test_bench_newton_schulz_gpu[5120x1280-triton]",
                    5 * 3 * 2 * (5120 * 1280 * 2 + 1280 * 1280 * 2), ns.newton_schulz_flops((5120, 1280)), "bf16"),
        KernelModel("fp8 GEMM 32768x5120x1280 e4m3->bf16", "test_bench_fp8_gemm_gpu[mlp_up_d1280-M32768-triton]",
                    gemm_m * gemm_k + gemm_n * gemm_k + 2 * gemm_m * gemm_n, 2 * gemm_m * gemm_n * gemm_k, "fp8"),
    ]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def latest_results(root: Path = BASELINES) -> list[Path]:
    """The newest pytest-benchmark JSON per machine-class directory under `root`."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in root.glob("*/**/*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        cls = path.relative_to(root).parts[0]
        stamp = str(data.get("datetime", ""))
        if cls not in newest or stamp > newest[cls][0]:
            newest[cls] = (stamp, path)
    return [p for _, p in sorted(newest.values(), key=lambda t: str(t[1]))]


def gpu_name(result: dict) -> str | None:
    info = result.get("machine_info", {})
    return (info.get("nanofast") or {}).get("gpu")


def peaks_for(name: str) -> tuple[float, float, float | None] | None:
    return next(((bw, bf, f8) for key, bw, bf, f8 in GPU_PEAKS if key in name), None)


def seconds_per_call(bench: dict) -> float:
    """Median of a round divided by the calls each round makes (extra_info calls_per_round)."""
    return bench["stats"]["median"] / max(int(bench.get("extra_info", {}).get("calls_per_round", 1)), 1)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

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


def gpu_kernel_table(models: list[KernelModel], results: list[dict]) -> tuple[str, list[dict]]:
    """Per kernel: bytes, FLOPs, intensity, and achieved / % of peak from GPU results only."""
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
    rows = list(facts.get("kernels", {}).values())
    tri = [r for r in rows if r.get("source") == "triton"]
    cu = [r for r in rows if r.get("source") == "cuda"]
    from bench.guard import facts_problems

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


def roofline_png(models: list[KernelModel], points: list[dict], results: list[dict], path: Path) -> None:
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
        label, bw, bf16, fp8 = REFERENCE_ROOF[0] + " spec (no GPU run yet)", *REFERENCE_ROOF[1:]
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


def render(results: list[dict], facts: dict, guard: dict | None, png_rel: str, page_rel: str) -> tuple[str, str]:
    """(the full page, README's section) as markdown."""
    models = kernel_models()
    gpu_tab, points = gpu_kernel_table(models, results)
    runs = "\n".join(f"- {machine_line(r)}" for r in results) or "- no benchmark results found"
    gpu_note = ("No GPU run has happened yet: every GPU cell says so, and no number is estimated from CPU timings."
                if not any(gpu_name(r) for r in results) else "GPU cells come from the GPU results listed above.")
    note = ("Bytes: each tensor read or written once (the benchmark files' byte models). FLOPs: exact for the "
            "GEMM-like kernels; for elementwise ones an approximate few per element, only to place them on the roofline.")
    common = [f"Results:\n\n{runs}\n", "### Kernels on the GPU (byte/FLOP model per call; achieved only when measured)\n",
              gpu_note + " " + note + "\n", gpu_tab + "\n", f"![roofline]({png_rel})\n"]
    if guard:
        common += ["### Guarded same-run ratios (CPU)\n", f"{machine_line(guard)}\n", guard_table(guard) + "\n"]
    for path in sorted(BASELINES.glob("*/vs_nanochat.json")):
        from bench.vs_nanochat import render as render_vs_nanochat
        common += [f"### nanofast vs nanochat, side by side ({path.parent.name})\n",
                   render_vs_nanochat(json.loads(path.read_text())) + "\n"]
    common += ["### Compiled kernels on a GPU (`make gpu-check`)\n", gpu_check_section() + "\n"]
    common += ["### Kernel machine code (guarded against bench/baselines/kernel_facts.json)\n", facts_summary(facts) + "\n"]
    page = ["# nanofast performance\n", "Generated by `python -m bench.performance`; do not edit by hand.\n", *common]
    for r in results:
        page += [f"### All benchmarks: {machine_line(r)}\n", benchmark_table(r) + "\n"]
    page += ["### Machine-code facts of every kernel config\n", facts_table(facts) + "\n"]
    section = ["### Performance\n", f"Generated by `python -m bench.performance` (full page: [{page_rel}]({page_rel})).\n",
               *common]
    return "\n".join(page), "\n".join(section)


def gpu_check_section(root: Path = BASELINES) -> str:
    """Each device class's committed `python -m bench.gpu_check` record, or why there is none."""
    from bench.gpu_check import render as render_gpu_check

    records = [(p.parent.name, json.loads(p.read_text())) for p in sorted(root.glob("*/gpu_check.json"))]
    if not records:
        return ("No GPU has run `make gpu-check` yet: no compiled kernel has executed on hardware, and each op's "
                "backend on a GPU is its unmeasured default (README, \"Which backend runs on a GPU\").")
    return "\n\n".join(f"**{name}**: {render_gpu_check(rec)}" for name, rec in records)


def replace_section(readme: str, section: str) -> str:
    """README text with the part between the performance markers replaced by `section`."""
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section.rstrip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="*", type=Path, default=None, help="pytest-benchmark JSON files")
    p.add_argument("--facts", type=Path, default=BASELINES / "kernel_facts.json")
    p.add_argument("--guard", type=Path, default=None, help="the guard's --guard-json output")
    p.add_argument("--out", type=Path, default=BENCH / "performance.md")
    p.add_argument("--png", type=Path, default=BENCH / "roofline.png")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--no-readme", action="store_true", help="do not touch the README")
    args = p.parse_args(argv)
    paths = args.results if args.results is not None else latest_results()
    results = [json.loads(Path(x).read_text()) for x in paths]
    guard_path = args.guard
    if guard_path is None:
        found = sorted(BASELINES.glob("*/guard.json"))
        guard_path = found[-1] if found else None
    guard = json.loads(guard_path.read_text()) if guard_path else None
    facts = json.loads(args.facts.read_text()) if args.facts.exists() else {"kernels": {}}
    out_dir = args.out.resolve().parent

    def rel(target: Path, base: Path) -> str:
        import os

        return os.path.relpath(target.resolve(), base).replace("\\", "/")

    page, _ = render(results, facts, guard, rel(args.png, out_dir), rel(args.out, out_dir))
    args.out.write_text(page)
    roofline_png(kernel_models(), gpu_kernel_table(kernel_models(), results)[1], results, args.png)
    if not args.no_readme:
        base = args.readme.resolve().parent
        _, section = render(results, facts, guard, rel(args.png, base), rel(args.out, base))
        args.readme.write_text(replace_section(args.readme.read_text(), section))
    print(f"wrote {args.out}, {args.png}" + ("" if args.no_readme else f", {args.readme.name}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
