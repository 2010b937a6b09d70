"""nanofast against nanochat on the same machine, in the same run: CPU pretraining steps and
decoding, each system in its own child process, alternating, so that a machine's drift hits both.

    python -m bench.vs_nanochat                  # the full comparison (several minutes on 2 cores)
    python -m bench.vs_nanochat --what decode    # one part: train | decode
    python -m bench.vs_nanochat --what decode --decode-step compile   # nanofast's compiled static decode step

nanochat is imported from NANOCHAT_SRC (default: `../shared/peers/nanochat` beside the checkout).
Each system runs as its own command would:
- pretraining: nanochat as its `scripts.base_train` does (GPT built on the meta device, `init_weights`,
  `setup_optimizer`, `torch.compile(model, dynamic=False)`), nanofast as `train.py` does with its
  `cpu` preset (`nanofast.common.cpu_process_setup`, the preset's compile setting, MuonAdamW, the
  training loop's loss and step functions). Same architecture, tokens per step and dtype.
- decoding: one nanochat checkpoint (random weights), written once; nanochat's `Engine.generate`
  decodes `batch` samples of one prompt, nanofast loads that checkpoint (`load_nanochat`) and its
  `Engine` decodes `batch` distinct prompts (more work: every row prefills its own prompt). Greedy,
  so both produce exactly `new_tokens` tokens per row; the time includes the prefill.
A process's tokens/s is the median over its timed steps (training) or its best of `repeats`
generations (decoding); a system's figure is the best of its processes; the ratio is
nanofast / nanochat. Speed is reported, never asserted: this is not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("nanochat", "nanofast")


def nanochat_src() -> Path:
    return Path(os.environ.get("NANOCHAT_SRC", ROOT.parent / "shared" / "peers" / "nanochat"))


@dataclass(frozen=True)
class Shape:
    """One comparison's sizes. The defaults are issue 17's: nanofast's cpu preset architecture
    (depth 4, head 64, SSSL windows) at T 512, batch 8 (4,096 tokens per step), vocab 32768."""
    depth: int = 4
    head_dim: int = 64
    seq_len: int = 512
    batch: int = 8
    vocab: int = 32768
    dtype: str = "fp32"
    steps: int = 6          # timed training steps per process
    warmup: int = 2         # untimed first steps (allocation, compilation)
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 2        # timed generations per decoding process
    decode_step: str = "auto"  # nanofast's Engine(decode_step=...): "auto" (exact on CPU), "compile", ...

    @property
    def model_dim(self) -> int:
        return -(-self.depth * 64 // self.head_dim) * self.head_dim  # both round d_model up to the head


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---- the children -------------------------------------------------------------------------------
def _import_nanochat(shape: Shape):
    # nanochat reads its compute dtype from the environment once, at import
    os.environ["NANOCHAT_DTYPE"] = TORCH_DTYPES[shape.dtype]
    sys.path.insert(0, str(nanochat_src()))
    import nanochat.engine
    import nanochat.gpt
    return nanochat.gpt, nanochat.engine


def _nanochat_model(shape: Shape):
    import torch
    gpt, _ = _import_nanochat(shape)
    n_head = shape.model_dim // shape.head_dim
    config = gpt.GPTConfig(sequence_len=shape.seq_len, vocab_size=shape.vocab, n_layer=shape.depth, n_head=n_head,
                           n_kv_head=n_head, n_embd=shape.model_dim, window_pattern="SSSL")
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _timed_steps(step, shape: Shape) -> float:
    times = []
    for i in range(shape.warmup + shape.steps):
        t0 = time.perf_counter()
        step()
        if i >= shape.warmup:
            times.append(time.perf_counter() - t0)
    return shape.batch * shape.seq_len / statistics.median(times)


def train_nanochat(shape: Shape) -> dict:
    import torch
    torch.manual_seed(0)
    model = _nanochat_model(shape)
    optimizer = model.setup_optimizer()
    run = torch.compile(model, dynamic=False)
    x, y = (torch.randint(0, shape.vocab, (shape.batch, shape.seq_len)) for _ in range(2))

    def step():
        loss = run(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    return {"tokens_per_second": _timed_steps(step, shape)}


def _nanofast_settings(shape: Shape):
    from nanofast.presets import make_settings
    return make_settings("cpu", vocab_size=shape.vocab, depth=shape.depth, head_dim=shape.head_dim,
                         seq_len=shape.seq_len, device_batch_size=shape.batch, dtype=shape.dtype)


def train_nanofast(shape: Shape) -> dict:
    import torch
    from nanofast.common import cpu_process_setup, parse_dtype
    from nanofast.model import GPT, config_for_depth
    from nanofast.optim import MuonAdamW
    from nanofast.pipeline import compiled
    from nanofast.trainer import backward, optimizer_step, token_loss

    cpu_process_setup()
    s = _nanofast_settings(shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config_for_depth(s.depth, s.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                                     window_pattern=s.window_pattern), compute_dtype=parse_dtype(s.dtype))
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = MuonAdamW(model.param_groups())
    run = compiled(model, s)
    x, y = (torch.randint(0, shape.vocab, (shape.batch, shape.seq_len)) for _ in range(2))

    def step():
        loss, _ = token_loss(run, x, y)
        backward(loss / y.numel())
        optimizer_step(optimizer)
        model.zero_grad(set_to_none=True)
        loss.item()

    return {"tokens_per_second": _timed_steps(step, shape), "compile": s.compile}


def write_checkpoint(shape: Shape, directory: str) -> dict:
    """A nanochat checkpoint (step 0, random weights) in nanochat's own layout."""
    import torch
    torch.manual_seed(0)
    model = _nanochat_model(shape)
    torch.save(model.state_dict(), Path(directory) / "model_000000.pt")
    meta = {"step": 0, "model_config": asdict(model.config)}
    (Path(directory) / "meta_000000.json").write_text(json.dumps(meta))
    return {"params": sum(p.numel() for p in model.parameters())}


def _prompts(shape: Shape, count: int) -> list[list[int]]:
    import random
    rng = random.Random(count)
    return [[rng.randrange(shape.vocab) for _ in range(shape.prompt_len)] for _ in range(count)]


def _best_rate(generate, tokens: int, shape: Shape) -> float:
    generate(shape.new_tokens)  # warm-up: first-call allocations, and every shape a compiled step meets
    best = float("inf")
    for _ in range(shape.repeats):
        t0 = time.perf_counter()
        produced = generate(shape.new_tokens)
        best = min(best, time.perf_counter() - t0)
        if produced != tokens:
            raise RuntimeError(f"expected {tokens} generated tokens, got {produced}")
    return tokens / best


class _NoSpecialTokens:
    """What nanochat's Engine asks of a tokenizer, with special ids past the vocabulary: greedy
    decoding of random weights then never stops early or enters the calculator."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    NAMES = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>")

    def encode_special(self, name: str) -> int:
        return self.vocab + self.NAMES.index(name)  # a name nanochat's Engine does not ask for raises

    def get_bos_token_id(self) -> int:
        return self.vocab + len(self.NAMES)


def decode_nanochat(shape: Shape, checkpoint: str) -> dict:
    import torch
    gpt, engine_mod = _import_nanochat(shape)
    config = gpt.GPTConfig(**json.loads((Path(checkpoint) / "meta_000000.json").read_text())["model_config"])
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()  # the rotary buffers; the weights come from the checkpoint
    model.load_state_dict(torch.load(Path(checkpoint) / "model_000000.pt", map_location="cpu"), strict=True)
    model.eval()
    engine = engine_mod.Engine(model, _NoSpecialTokens(shape.vocab))
    prompt = _prompts(shape, 1)[0]

    def generate(new_tokens: int) -> int:
        return sum(len(column) for column, _ in engine.generate(prompt, num_samples=shape.batch,
                                                                 max_tokens=new_tokens, temperature=0.0))

    return {"tokens_per_second": _best_rate(generate, shape.batch * shape.new_tokens, shape)}


def decode_nanofast(shape: Shape, checkpoint: str) -> dict:
    from nanofast.checkpoint import load_nanochat
    from nanofast.common import cpu_process_setup, parse_dtype
    from nanofast.engine import Engine, SamplingParams

    cpu_process_setup()
    model = load_nanochat(checkpoint, compute_dtype=parse_dtype(shape.dtype))
    prompts = _prompts(shape, shape.batch)
    engine = Engine(model, max_num_seqs=shape.batch, max_batch_tokens=max(2048, shape.batch * shape.prompt_len),
                    decode_step=shape.decode_step)

    def generate(new_tokens: int) -> int:
        return sum(map(len, engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))))

    return {"tokens_per_second": _best_rate(generate, shape.batch * shape.new_tokens, shape)}


CHILDREN = {("nanochat", "train"): train_nanochat, ("nanofast", "train"): train_nanofast,
            ("nanochat", "decode"): decode_nanochat, ("nanofast", "decode"): decode_nanofast,
            ("nanochat", "checkpoint"): write_checkpoint}


# ---- the parent ---------------------------------------------------------------------------------
def child(system: str, what: str, shape: Shape, *args: str) -> dict:
    """Run one measurement in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", "bench.vs_nanochat", "--child", system, what, json.dumps(asdict(shape)), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if out.returncode != 0:
        raise RuntimeError(f"{system} {what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def alternate(what: str, shape: Shape, rounds: int, *args: str) -> dict:
    """`rounds` processes per system in A B B A order; each system's best tokens/s and the ratio."""
    runs: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for r in range(rounds):
        for system in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
            runs[system].append(child(system, what, shape, *args)["tokens_per_second"])
    best = {s: max(v) for s, v in runs.items()}
    return {"what": what, "dtype": shape.dtype, "batch": shape.batch, "runs": runs,
            "nanochat": best["nanochat"], "nanofast": best["nanofast"], "ratio": best["nanofast"] / best["nanochat"]}


def compare_train(shape: Shape, rounds: int = 2) -> dict:
    return alternate("train", shape, rounds)


def compare_decode(shape: Shape, batches: tuple[int, ...] = (1, 8, 32, 64), rounds: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        child("nanochat", "checkpoint", shape, directory)
        return [alternate("decode", replace(shape, batch=b), rounds, directory) for b in batches]


def table(results: list[dict], shape: Shape) -> str:
    head = (f"| measure (d{shape.depth}, head {shape.head_dim}, T {shape.seq_len}, vocab {shape.vocab}) "
            f"| nanochat tok/s | nanofast tok/s | ratio |\n|---|---:|---:|---:|\n")
    rows = []
    for r in results:
        what = (f"pretraining, batch {r['batch']}, {r['dtype']}" if r["what"] == "train"
                else f"decode, batch {r['batch']}, {shape.prompt_len}-token prompt, {shape.new_tokens} new, {r['dtype']}"
                + (f", decode_step {shape.decode_step}" if shape.decode_step != "auto" else ""))
        rows.append(f"| {what} | {r['nanochat']:,.0f} | {r['nanofast']:,.0f} | {r['ratio']:.2f}x |")
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=("all", "train", "decode"), default="all")
    parser.add_argument("--rounds", type=int, default=2, help="processes per system per measurement")
    parser.add_argument("--dtypes", default="fp32,bf16", help="pretraining dtypes, comma-separated")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--shape", default="", help="Shape fields to change, e.g. depth=1,seq_len=64 (CI's short run)")
    parser.add_argument("--batches", default="1,8,32,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--decode-step", default="auto", help="nanofast's Engine(decode_step=...) for decoding: "
                        "auto (exact on CPU), exact, eager, compile or off")
    args = parser.parse_args(argv)
    if args.child:
        system, what, shape_json, *rest = args.child
        print(json.dumps(CHILDREN[system, what](Shape(**json.loads(shape_json)), *rest)))
        return 0
    changes = dict(item.split("=", 1) for item in args.shape.split(",") if item)
    shape = replace(Shape(), **{k: int(v) if k != "dtype" else v for k, v in changes.items()},
                    decode_step=args.decode_step)
    results = []
    if args.what in ("all", "train"):
        results += [compare_train(replace(shape, dtype=d), args.rounds) for d in args.dtypes.split(",")]
    if args.what in ("all", "decode"):
        results += compare_decode(shape, tuple(int(b) for b in args.batches.split(",")), args.rounds)
    print(table(results, shape))
    if args.json:
        import datetime

        import torch

        from nanofast.common import system_info
        machine = dict(system_info(), torch_threads=torch.get_num_threads())
        record = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine, "shape": asdict(shape), "rounds": args.rounds, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def render(record: dict) -> str:
    """The performance page's section for a `--json` record."""
    m = record["machine"]
    return (f"`python -m bench.vs_nanochat` on {m['cpu']} x{m['cpu_count']} cores ({m['torch_threads']} torch "
            f"threads), torch {m['torch']}, commit {m.get('git_commit') or '?'}, {record['datetime'][:16]}; "
            f"{record['rounds']} processes per system per row, alternating, best of each:\n\n"
            + table(record["results"], Shape(**record["shape"])))


if __name__ == "__main__":
    sys.exit(main())
