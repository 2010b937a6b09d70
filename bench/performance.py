"""The performance page: markdown tables and a roofline plot from the latest benchmark results.

    python -m bench.performance                       # refresh bench/performance.md and bench/roofline.png
    python -m bench.performance --results a.json b.json --guard guard.json --out page.md --png roof.png

Inputs: pytest-benchmark JSON files (default: the newest per machine class under bench/baselines/),
bench/baselines/kernel_facts.json, and optionally the guard's `--guard-json` output (default:
bench/baselines/<class>/guard.json when present). Per kernel, bytes and FLOPs per call come from the
benchmark files' byte models; achieved throughput and % of peak only from a GPU result (peaks:
nanofast.common.GPU_PEAKS). A cell with no GPU measurement says so; nothing is extrapolated from
CPU timings. The markdown and the PNG are drawn by bench/render.py; this writes only those two files.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench.render import gpu_kernel_table, performance_page, roofline_png

BENCH = Path(__file__).resolve().parent
BASELINES = BENCH / "baselines"


@dataclass(frozen=True)
class KernelModel:
    """One kernel call at a nanochat shape: the GPU benchmark that times it and its byte/FLOP model."""
    label: str
    benchmark: str  # pytest-benchmark `name` of the GPU case
    bytes: int
    flops: int
    precision: str  # which FLOP peak applies: "bf16" or "fp8"


def kernel_models() -> list[KernelModel]:
    """Bytes and FLOPs per call from each op's own model (nanofast.kernels.registry: each tensor
    moved once)."""
    from nanofast.kernels.newton_schulz import prologue_cost
    from nanofast.kernels.registry import OPS

    def model(label: str, benchmark: str, cost: dict, precision: str = "bf16") -> KernelModel:
        return KernelModel(label, benchmark, cost["bytes"], cost["flops"], precision)

    return [
        model("rms_norm fwd 16384x1280 bf16", "test_bench_rms_norm[16384x1280-triton-fwd-plain]",
              OPS["rms_norm"].cost(tokens=16384, d=1280, mode="fwd")),
        model("rms_norm fwd+bwd 16384x1280 bf16", "test_bench_rms_norm[16384x1280-triton-fwd+bwd-plain]",
              OPS["rms_norm"].cost(tokens=16384, d=1280, mode="fwd+bwd")),
        model("qk_norm_rope fwd B32 T2048 H10 D128 bf16", "test_bench_qk_norm_rope_gpu[triton-B32xT2048xH10-fwd]",
              OPS["qk_norm_rope"].cost(B=32, T=2048, HQ=10, HK=10, D=128)),
        model("paged decode B64 ctx2048 Hq32 Hkv8 D128 bf16", "test_bench_paged_decode[B64-ctx2048-q32kv8-D128-triton]",
              OPS["paged_attention"].cost(seq_lens=[2048] * 64, hq=32, hkv=8, d=128)),
        model("fp8 quant tensorwise+T 16384x6144 bf16", "test_bench_fp8_quant[16384x6144-triton-tensorwise+T]",
              OPS["fp8_quant"].cost(tokens=16384, d=6144, recipe="tensorwise+T")),
        model("Muon prologue 12x5120x1280 fp32->bf16", "test_bench_prologue_gpu[12x5120x1280-fused_triton]",
              prologue_cost((12, 5120, 1280))),
        model("Newton-Schulz 5 steps 5120x1280 bf16", "test_bench_newton_schulz_gpu[5120x1280-triton]",
              OPS["newton_schulz"].cost(shape=(5120, 1280), steps=5)),
        model("fp8 GEMM 32768x5120x1280 e4m3->bf16", "test_bench_fp8_gemm_gpu[mlp_up_d1280-M32768-triton]",
              OPS["fp8_gemm"].cost(m=1 << 15, n=5120, k=1280), "fp8"),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="*", type=Path, default=None, help="pytest-benchmark JSON files")
    p.add_argument("--facts", type=Path, default=BASELINES / "kernel_facts.json")
    p.add_argument("--guard", type=Path, default=None, help="the guard's --guard-json output")
    p.add_argument("--out", type=Path, default=BENCH / "performance.md")
    p.add_argument("--png", type=Path, default=BENCH / "roofline.png")
    args = p.parse_args(argv)
    paths = args.results if args.results is not None else latest_results()
    results = [json.loads(Path(x).read_text()) for x in paths]
    guard_path = args.guard
    if guard_path is None:
        found = sorted(BASELINES.glob("*/guard.json"))
        guard_path = found[-1] if found else None
    guard = json.loads(guard_path.read_text()) if guard_path else None
    facts = json.loads(args.facts.read_text()) if args.facts.exists() else {"kernels": {}}
    models = kernel_models()
    png_rel = os.path.relpath(args.png.resolve(), args.out.resolve().parent).replace("\\", "/")
    args.out.write_text(performance_page(models, results, facts, guard, png_rel))
    roofline_png(models, gpu_kernel_table(models, results)[1], results, args.png)
    print(f"wrote {args.out}, {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
