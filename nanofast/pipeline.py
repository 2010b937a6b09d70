"""The stages `train.py` runs: tokenizer -> pretrain -> ... -> report, each resumable and skippable."""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanofast import dataset
from nanofast.common import Dist, default_dtype, parse_dtype, peak_flops, print0
from nanofast.dataloader import PackedLoader
from nanofast.download import download_climbmix
from nanofast.evaluate import evaluate_bpb
from nanofast.model import GPT, config_for_depth
from nanofast.optim import MuonAdamW
from nanofast.presets import Settings
from nanofast.report import build_report, read_section, write_section
from nanofast.tokenizer import Tokenizer, compression_report, compression_table
from nanofast.trainer import LoopSettings, LoopState, mfu_percent, resume_state, train

STAGES = ("tokenizer", "pretrain", "midtrain", "sft", "rl", "eval", "report")
AVAILABLE = ("tokenizer", "pretrain", "report")  # the post-training stages arrive in their own issue

# nanochat's reference point for its batch-size and horizon rules: depth 12 trains best at 2^19 tokens/step.
REF_DEPTH = 12
REF_BATCH = 2 ** 19


@dataclass
class Run:
    settings: Settings
    base: Path
    device: str
    dist: Dist

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.settings.dtype) if self.settings.dtype else default_dtype(self.device)

    @property
    def data_dir(self) -> Path:
        return self.base / ("climbmix" if self.settings.data == "climbmix" else "default_corpus")

    @property
    def tokenizer_dir(self) -> Path:
        return self.base / "tokenizer"

    @property
    def report_dir(self) -> Path:
        return self.base / "report"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.base / "checkpoints" / stage


def stage_done(run: Run, stage: str) -> bool:
    return read_section(run.report_dir, stage) is not None


def run_stages(run: Run, stages: list[str]) -> dict[str, str]:
    """Run `stages` in order; for `all`-style lists skip stages whose output exists. Returns
    {stage: "ran" | "skipped (already done)" | "not available in this version"}."""
    outcome = {}
    for stage in stages:
        if stage not in AVAILABLE:
            outcome[stage] = "not available in this version"
            continue
        if stage != "report" and len(stages) > 1 and stage_done(run, stage):
            outcome[stage] = "skipped (already done)"
            continue
        print0(f"=== stage: {stage} ===")
        t0 = time.perf_counter()
        {"tokenizer": stage_tokenizer, "pretrain": stage_pretrain, "report": stage_report}[stage](run, t0)
        outcome[stage] = "ran"
    return outcome


def _barrier(run: Run) -> None:
    if run.dist.world_size > 1:
        dist.barrier()


# ---- tokenizer --------------------------------------------------------------------------------
def ensure_corpus(run: Run) -> None:
    """The pretraining shards: the embedded default corpus (written once) or ClimbMix (downloaded once)."""
    s = run.settings
    if s.data == "climbmix":
        download_climbmix(run.data_dir, num_train_shards=s.corpus_shards)
    else:
        dataset.write_default_corpus(run.data_dir, num_shards=s.corpus_shards, max_chars=s.corpus_chars)


def training_texts(data_dir: Path, max_chars: int, counter: list[int]):
    """Documents from the training shards, in order, until `max_chars` characters were yielded;
    counter[0] accumulates the characters yielded."""
    for _, texts in dataset.iter_documents(dataset.split_shards(data_dir, "train")):
        for text in texts:
            yield text
            counter[0] += len(text)
            if counter[0] >= max_chars:
                return


def stage_tokenizer(run: Run, t0: float) -> None:
    if run.dist.is_master:
        ensure_corpus(run)
        chars = [0]
        t_train = time.perf_counter()
        tokenizer = Tokenizer.train(training_texts(run.data_dir, run.settings.tokenizer_chars, chars),
                                    vocab_size=run.settings.vocab_size)
        train_seconds = time.perf_counter() - t_train
        tokenizer.save(run.tokenizer_dir)
        val_texts = list(itertools.islice(
            (t for _, ts in dataset.iter_documents(dataset.split_shards(run.data_dir, "val")) for t in ts), 200))
        report = compression_report(tokenizer, val_texts)
        write_section(run.report_dir, "tokenizer", dict(
            vocab_size=tokenizer.vocab_size, train_chars=chars[0], train_seconds=train_seconds,
            compression=report, compression_table=compression_table(report), seconds=time.perf_counter() - t0))
        print0(compression_table(report))
    _barrier(run)


# ---- pretraining ------------------------------------------------------------------------------
@dataclass
class Plan:
    num_iterations: int
    total_batch_size: int
    grad_accum: int
    lr_scale: float
    weight_decay: float


def scaling_params(model: GPT) -> int:
    """The parameters nanochat's scaling laws count: transformer matrices + lm_head."""
    counts = model.num_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan_training(model: GPT, s: Settings, world_size: int, base_weight_decay: float = 0.28) -> Plan:
    """nanochat's rules. Horizon: `target_param_data_ratio` x scaling params tokens (unless
    num_iterations is given). Batch: 2^19 at depth 12, growing as D^0.383 (Power Lines), rounded to
    a power of two. LRs scale as sqrt(B/B_ref); weight decay as sqrt(B/B_ref) * D_ref/D."""
    with torch.device("meta"):
        ref = GPT(config_for_depth(REF_DEPTH, model.config.vocab_size, model.config.sequence_len,
                                   s.aspect_ratio, s.head_dim, window_pattern=s.window_pattern))
    ref_tokens = s.target_param_data_ratio * scaling_params(ref)
    target_tokens = s.target_param_data_ratio * scaling_params(model)
    batch = s.total_batch_size
    if batch <= 0:
        batch = 2 ** round(math.log2(REF_BATCH * (target_tokens / ref_tokens) ** 0.383))
    micro = s.device_batch_size * s.seq_len * world_size
    if batch % micro:
        raise ValueError(f"total_batch_size {batch:,} is not a multiple of device_batch_size x seq_len x "
                         f"processes = {micro:,}: change --total-batch-size or --device-batch-size")
    iterations = s.num_iterations if s.num_iterations > 0 else max(1, int(target_tokens // batch))
    return Plan(num_iterations=iterations, total_batch_size=batch, grad_accum=batch // micro,
                lr_scale=(batch / REF_BATCH) ** 0.5,
                weight_decay=base_weight_decay * (batch / REF_BATCH) ** 0.5 * ref_tokens / target_tokens)


SAMPLE_PROMPTS = ("import os\n", "def main(", "class ", "The capital of France is")


def load_tokenizer(run: Run) -> Tokenizer:
    return Tokenizer.load(run.tokenizer_dir)  # one-line FileNotFoundError naming the stage to run


def stage_pretrain(run: Run, t0: float) -> None:
    s, device = run.settings, run.device
    tokenizer = load_tokenizer(run)
    token_bytes = tokenizer.token_bytes().to(device)
    config = config_for_depth(s.depth, tokenizer.vocab_size, s.seq_len, s.aspect_ratio, s.head_dim,
                              window_pattern=s.window_pattern)
    torch.manual_seed(s.seed)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=run.dtype)
    model.to_empty(device=device)
    model.init_weights()
    plan = plan_training(model, s, run.dist.world_size)
    optimizer = MuonAdamW(model.param_groups(lr_scale=plan.lr_scale, weight_decay=plan.weight_decay))
    ckpt_dir = run.checkpoint_dir("base")
    resumed = resume_state(ckpt_dir, model, optimizer, run.dist.rank)
    state, loader_state = resumed if resumed else (LoopState(), None)

    params, flops = model.num_params(), model.flops_per_token()
    print0(f"model {config} | {params['total']:,} params | {flops:.3e} FLOPs/token | {plan}")
    loader = PackedLoader(tokenizer, run.data_dir, s.device_batch_size, s.seq_len, split="train",
                          rank=run.dist.rank, world_size=run.dist.world_size, device=device, state=loader_state)
    eval_steps = max(1, s.eval_tokens // (s.device_batch_size * s.seq_len * run.dist.world_size))

    def evaluate() -> dict:
        with PackedLoader(tokenizer, run.data_dir, s.device_batch_size, s.seq_len, split="val", rank=run.dist.rank,
                          world_size=run.dist.world_size, device=device, loop=False) as val:
            batches = ((x, y) for x, y, _ in itertools.islice(val, eval_steps))
            return {"val_bpb": evaluate_bpb(model, batches, token_bytes)}

    settings = LoopSettings(num_iterations=plan.num_iterations, grad_accum=plan.grad_accum,
                            eval_every=s.eval_every, save_every=s.save_every, log_every=s.log_every,
                            tokens_per_step=plan.total_batch_size, flops_per_token=flops, peak_flops=peak_flops(device))
    step_model = torch.compile(model, dynamic=False) if s.compile else model
    scaler = torch.amp.GradScaler(device) if run.dtype == torch.float16 else None
    meta = dict(settings=asdict(s), plan=asdict(plan))
    with loader:
        state = train(model, optimizer, loader, settings, ckpt_dir, run.dist, meta, evaluate=evaluate,
                      state=state, step_model=step_model, scaler=scaler)

    if run.dist.is_master:
        model.eval()
        samples = [p + tokenizer.decode(list(model.generate(tokenizer.encode(p, prepend="<|bos|>"), s.sample_tokens)))
                   for p in SAMPLE_PROMPTS]
        for sample in samples:
            print0(f"sample: {sample!r}")
        steady = state.tokens_per_second[1:] or state.tokens_per_second  # step 1 includes warm-up
        tps = statistics.median(steady) if steady else 0.0
        write_section(run.report_dir, "pretrain", dict(
            model_config=config.to_dict(), params=params, flops_per_token=flops,
            num_iterations=plan.num_iterations, total_batch_size=plan.total_batch_size,
            world_size=run.dist.world_size, device=device, dtype=str(run.dtype).removeprefix("torch."),
            final_loss=state.losses[-1][1] if state.losses else float("nan"),
            val_bpb=state.evals[-1]["val_bpb"], evals=state.evals, losses=state.losses,
            tokens_per_second=state.tokens_per_second, median_tokens_per_second=tps,
            mfu=mfu_percent(flops, tps, peak_flops(device), run.dist.world_size),
            train_seconds=state.train_seconds, samples=samples, checkpoint_dir=str(ckpt_dir),
            seconds=time.perf_counter() - t0))
    _barrier(run)


# ---- report -----------------------------------------------------------------------------------
def report_path(run: Run) -> Path:
    return run.base / "report.md"


def stage_report(run: Run, t0: float) -> None:
    if run.dist.is_master:
        build_report(run.report_dir, report_path(run))
    _barrier(run)
