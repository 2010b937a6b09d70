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


MAX_TOKENS = 8192  # enough tokens for stable error statistics; bounds the report's logits memory


@torch.no_grad()
def precision_report(model: GPT, x: torch.Tensor, y: torch.Tensor, settings: tuple[str, ...] = SETTINGS,
                     max_tokens: int = MAX_TOKENS) -> dict:
    """model: any GPT (its weights are used in fp32); x, y: a (B, T) batch, of which the first
    max(1, max_tokens // T) rows are used. Returns {"fp32_loss", "tokens", "settings": {name: {"loss",
    "loss_delta", "logits_rel_err", "gemms": {layer: rel_err}}}}.

    "fp8" is tensorwise scaling, "fp8-rowwise" rowwise; fp8 GEMMs are measured in training mode
    (where fp8 applies) with dropout-free layers, so train mode changes nothing else. Every GEMM
    goes through the path training takes (ops.linear -> the fp8 backend of this device, on a GPU
    torch._scaled_mm under its CUDA contract: row-wise GEMMs write bf16 there, see
    kernels/fp8_linear.py).

    Memory: one fp32 copy of the model (the given one keeps training's dtypes), and per setting one
    forward without autograd. Each layer's own GEMM error is measured inside the fp32 forward, on
    that layer's input, for every setting at once, and only the numbers are kept: no layer's input
    outlives its layer. The largest temporaries are two logits tensors (tokens x vocab fp32) and a
    layer's outputs. At d24 (1.4B parameters, vocab 32768, 4 x 2048 tokens): 5.5 GB for the copy,
    2 x 1.07 GB of logits, ~2.2 GB for the lm_head's two GEMM outputs: under 10 GB beside the
    trained model.
    """
    if not x.ndim == 2 or x.shape != y.shape:
        raise ValueError(f"x and y must be (B, T) token batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    rows = max(1, max_tokens // x.size(1))
    x, y = x[:rows], y[:rows]
    ref = copy.deepcopy(model).float()
    ref.compute_dtype = torch.float32
    ref.set_linear_precision({})
    ref.train()
    plans = {name: (("fp8", "rowwise") if name == "fp8-rowwise" else (name, "tensorwise")) for name in settings}
    gemms: dict[str, dict[str, float]] = {name: {} for name in settings}
    names = {m: n for n, m in ref.named_modules()}

    def measure(mod, inp, out) -> None:  # out: this layer's fp32 output, the reference
        for name, (prec, recipe) in plans.items():
            gemms[name][names[mod]] = _rel(ops.linear(inp[0], mod.weight, prec, recipe), out)

    hooks = [m.register_forward_hook(measure) for layers in ref.linears().values() for m in layers]
    try:
        ref_logits = ref(x)  # the logits forward calls every layer as a module (the loss fuses lm_head)
    finally:
        for h in hooks:
            h.remove()
    ref_loss = ref(x, y).item()
    out = {"fp32_loss": ref_loss, "tokens": x.numel(), "settings": {}}
    for name, (prec, recipe) in plans.items():
        ref.set_linear_precision({"attn": prec, "mlp": prec, "lm_head": prec}, recipe)
        loss = ref(x, y).item()
        out["settings"][name] = {"loss": loss, "loss_delta": loss - ref_loss,
                                 "logits_rel_err": _rel(ref(x), ref_logits), "gemms": gemms[name]}
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
