"""What each matmul precision costs in accuracy, measured on a fixed batch against fp32.

For every precision setting: the loss and the logits of the whole model (relative error vs the
fp32 model), and each GEMM's own relative error, measured on the fp32 model's input to that layer
(so one layer's error is not mixed up with what earlier layers passed on).

    python -m nanofast.precision --checkpoint DIR [--tokens 2048] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from nanofast import ops
from nanofast.model import GPT

SETTINGS = ("bf16", "fp16", "fp8", "fp8-rowwise")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def precision_report(model: GPT, x: torch.Tensor, y: torch.Tensor, settings: tuple[str, ...] = SETTINGS) -> dict:
    """model: any GPT (its weights are used in fp32); x, y: a (B, T) batch. Returns
    {"fp32_loss", "settings": {name: {"loss", "loss_delta", "logits_rel_err", "gemms": {layer: rel_err}}}}.
    "fp8" is tensorwise scaling, "fp8-rowwise" rowwise; fp8 GEMMs are measured in training mode
    (where fp8 applies) with dropout-free layers, so train mode changes nothing else."""
    ref = copy.deepcopy(model).float()
    ref.compute_dtype = torch.float32
    ref.set_linear_precision({})
    ref.train()
    inputs: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in ref.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, inp, out: inputs.__setitem__(names[mod], inp[0]))
             for cls in ref.linears().values() for m in cls]
    ref_logits = ref(x)
    ref_loss = ref(x, y).item()
    for h in hooks:
        h.remove()
    out = {"fp32_loss": ref_loss, "settings": {}}
    for name in settings:
        prec, recipe = ("fp8", "rowwise") if name == "fp8-rowwise" else (name, "tensorwise")
        m = copy.deepcopy(ref)
        m.set_linear_precision({"attn": prec, "mlp": prec, "lm_head": prec}, recipe)
        logits, loss = m(x), m(x, y).item()
        gemms = {}
        for layer_name, inp in inputs.items():
            layer = m.get_submodule(layer_name)
            want = torch.nn.functional.linear(inp, layer.weight)
            gemms[layer_name] = _rel(ops.linear(inp, layer.weight, layer.precision, recipe), want)
        out["settings"][name] = {"loss": loss, "loss_delta": loss - ref_loss,
                                 "logits_rel_err": _rel(logits, ref_logits), "gemms": gemms}
    return out


def precision_table(report: dict) -> str:
    """Markdown: one row per setting (loss, logits error, worst and mean GEMM error)."""
    lines = [f"fp32 loss: {report['fp32_loss']:.5f}", "",
             "| GEMMs in | loss | loss - fp32 | logits rel. err | GEMM rel. err (mean / worst, layer) |",
             "|---|---:|---:|---:|---|"]
    for name, r in report["settings"].items():
        errs = r["gemms"]
        worst = max(errs, key=errs.get)
        mean = sum(errs.values()) / len(errs)
        lines.append(f"| {name} | {r['loss']:.5f} | {r['loss_delta']:+.2e} | {r['logits_rel_err']:.2e} | "
                     f"{mean:.2e} / {errs[worst]:.2e} ({worst}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from nanofast.checkpoint import load_nanochat

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a nanofast/nanochat checkpoint directory")
    p.add_argument("--tokens", type=int, default=1024, help="tokens in the random batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = load_nanochat(args.checkpoint, args.device)
    T = min(model.config.sequence_len, args.tokens)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (max(1, args.tokens // T), T + 1), generator=g).to(args.device)
    print(precision_table(precision_report(model, ids[:, :-1], ids[:, 1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
