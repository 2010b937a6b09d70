"""The stages `train.py` runs: tokenizer -> pretrain -> ... -> report, each resumable and skippable."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanofast import checkpoint, core_eval, dataset, ops
from nanofast.chat_eval import chatcore, evaluate_task, generative_outcomes, paired_change
from nanofast.common import Dist, default_dtype, launcher_gone, parse_dtype, peak_flops, print0
from nanofast.dataloader import ConversationLoader, PackedLoader
from nanofast.download import download_climbmix
from nanofast.evaluate import evaluate_bpb
from nanofast.kernels import vendor
from nanofast.model import GPT, config_for_depth, parse_linear_precision
from nanofast.optim import MuonAdamW
from nanofast.plan import plan_training
from nanofast.precision import precision_report, precision_table
from nanofast.presets import SETTING_STAGES, Settings, changed_settings, default_run_name, stage_settings
from nanofast.report import build_report, read_section, write_section
from nanofast.rl import policy_loss, rollout_batches
from nanofast.tasks import TaskMixture, load_task
from nanofast.tokenizer import Tokenizer, compression_report, compression_table
from nanofast.trainer import LoopSettings, LoopState, LossScaler, mfu_percent, resume_state, train, warm_start
from nanofast.wandb_log import WandbLog

STAGES = (*SETTING_STAGES, "report")  # the report: every stage's results, no settings of its own
NANOFAST_ONLY = ("midtrain", "rl")  # post-training stages nanochat's runs/speedrun.sh does not run
# Checkpoint folder of each training stage, and which earlier one a stage starts from.
CHECKPOINTS = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}


@dataclass
class Run:
    """One run: its settings, and where it writes. `base` holds what runs share (the corpus, the
    task data, the CORE bundle); `dir` = `<base>/runs/<name>` holds what is this run's (tokenizer,
    checkpoints, report sections, report.md), so two runs never mix."""
    settings: Settings
    base: Path
    device: str
    dist: Dist
    name: str | None = None           # None: default_run_name(settings)
    wandb: WandbLog | None = None     # rank 0 with --wandb: run_stages opens it

    @property
    def dir(self) -> Path:
        return self.base / "runs" / (self.name or default_run_name(self.settings))

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.settings.dtype) if self.settings.dtype else default_dtype(self.device)

    @property
    def data_dir(self) -> Path:
        return self.base / ("climbmix" if self.settings.data == "climbmix" else "default_corpus")

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.dir / "checkpoints" / stage

    def logger(self, stage: str) -> Callable[[dict], None] | None:
        """Where `stage`'s training loop sends each step's numbers: wandb, when it is on."""
        return None if self.wandb is None else (lambda metrics: self.wandb.log(stage, metrics))


def stages_of(stage: str, settings: Settings) -> list[str]:
    """The stages `train.py --stage <stage>` runs: `all` is every stage of the chosen post-training
    (nanochat's leaves out mid-training and RL); any other is itself."""
    if stage != "all":
        return [stage]
    return [s for s in STAGES if settings.post_training == "nanofast" or s not in NANOFAST_ONLY]


def loop_numbers(run: Run, state: LoopState, flops_per_token: float) -> dict:
    """What every training stage's report section says of its loop: losses and evaluations, the
    last of each, and the median step's throughput (step 1, which includes warm-up and compilation,
    left out) with its MFU."""
    def median(xs: list[float]) -> float:
        steady = xs[1:] or xs
        return statistics.median(steady) if steady else 0.0

    tps = median(state.tokens_per_second)
    return dict(losses=state.losses, evals=state.evals,
                final_loss=state.losses[-1][1] if state.losses else float("nan"),
                val_bpb=state.evals[-1]["val_bpb"] if state.evals else None,
                median_tokens_per_second=tps, median_target_tokens_per_second=median(state.target_tokens_per_second),
                mfu=mfu_percent(flops_per_token, tps, peak_flops(run.device), run.dist.world_size),
                train_seconds=state.train_seconds)


def stage_done(run: Run, stage: str) -> bool:
    return read_section(run.report_dir, stage) is not None


def _record(run: Run, stage: str, data: dict) -> None:
    """The stage's report section, with the settings it ran with (see `_check_done`); its numbers
    also go to wandb's run summary when it is on."""
    write_section(run.report_dir, stage, dict(data, settings=asdict(run.settings)))
    if run.wandb is not None:
        run.wandb.summary(stage, data)


def _check_done(run: Run, stage: str) -> None:
    """A finished stage that `--stage all` would skip must have run with the settings its result
    depends on: after `--depth 26` a depth-24 pretraining is not this run's, and skipping it would
    mix two runs in one report. Refuse, naming what differs."""
    recorded = (read_section(run.report_dir, stage) or {}).get("settings")
    changed = changed_settings(recorded, run.settings, stage) if recorded else {}
    if changed:
        what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise ValueError(f"the finished {stage} stage of run {run.dir.name} ran with {what}: pass --run-name "
                         f"to start another run, run `--stage {stage}` alone to redo it, or delete "
                         f"{run.report_dir / f'{stage}.json'}")


def run_stages(run: Run, stages: list[str]) -> dict[str, str]:
    """Run `stages` in order; for `all`-style lists skip stages whose output exists. Returns
    {stage: "ran" | "skipped (already done)"}."""
    ops.set_kernel_backend(run.settings.kernel_backend, run.device, run.settings.dispatch_as)
    done = {stage: stage != "report" and len(stages) > 1 and stage_done(run, stage) for stage in stages}
    for stage in stages:
        if done[stage]:
            _check_done(run, stage)
    if run.dist.world_size > 1:  # rank 0's view, decided once: a rank that skipped a stage the others
        shared = [done]          # run would leave them waiting for it at the stage's end
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    outcome = {}
    if run.settings.wandb and run.dist.is_master:
        run.wandb = WandbLog(run.settings.wandb, run.dir, run.dir.name,
                             config=dict(asdict(run.settings), run_name=run.dir.name))
    try:
        for stage in stages:
            if done[stage]:
                outcome[stage] = "skipped (already done)"
                continue
            print0(f"=== stage: {stage} ===")
            t0 = time.perf_counter()
            {"tokenizer": stage_tokenizer, "pretrain": stage_pretrain, "midtrain": stage_midtrain, "sft": stage_sft,
             "rl": stage_rl, "eval": stage_eval, "report": stage_report}[stage](run, t0)
            outcome[stage] = "ran"
    finally:
        if run.wandb is not None:
            run.wandb.finish()
            run.wandb = None
    return outcome


def _join(run: Run, stage: str) -> None:
    """Every rank waits here until all ranks have finished `stage`: a barrier on disk, not a
    collective. Ranks finish a stage at very different times (rank 0 alone trains the tokenizer,
    samples and evaluates; a rank may be slow to fetch its shards), which must not run into the
    collective timeout; this wait has its own, `wait_minutes`. Each rank writes a marker naming this
    launch (torchrun's run id), so markers a killed launch left behind do not count. A rank that
    fails ends the job through torchrun. Multi-node runs need a shared --base-dir. A rank whose
    launcher died (it was reparented) stops waiting with an error: nothing would end the wait but
    `wait_minutes` (train.py's ranks are also SIGKILLed with it: common.die_with_parent)."""
    if run.dist.world_size == 1:
        return
    parent = os.getppid()
    sync = run.dir / "sync"
    sync.mkdir(parents=True, exist_ok=True)
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
    marker = sync / f"{stage}.rank{run.dist.rank}"
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(launch)
    tmp.replace(marker)

    def missing() -> list[int]:
        markers = (sync / f"{stage}.rank{r}" for r in range(run.dist.world_size))
        return [r for r, m in enumerate(markers) if not (m.is_file() and m.read_text() == launch)]

    minutes = run.settings.wait_minutes
    deadline = time.monotonic() + 60 * minutes
    while late := missing():
        if gone := launcher_gone() or (os.getppid() != parent and f"its parent (pid {parent}) is gone"):
            raise RuntimeError(f"rank {run.dist.rank}: {gone}: stopped waiting for rank(s) {late} at the end "
                               f"of the {stage} stage")
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {run.dist.rank}: rank(s) {late} did not finish the {stage} stage within "
                               f"{minutes:g} minutes (--wait-minutes)")
        time.sleep(0.2)


# ---- tokenizer --------------------------------------------------------------------------------
def ensure_corpus(run: Run) -> None:
    """The pretraining shards, on every rank: ClimbMix downloaded once, the ranks sharing the shards
    (file locks, not collectives), or the embedded default corpus, written once under a lock."""
    s = run.settings
    if s.data == "climbmix":
        download_climbmix(run.data_dir, num_train_shards=s.corpus_shards, rank=run.dist.rank,
                          world_size=run.dist.world_size, progress=run.dist.is_master)
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


def tokenizer_cache(run: Run) -> Path:
    """Where runs share a trained tokenizer: one folder per value of the tokenizer's settings, so
    a depth sweep trains it once (nanochat shares one across model tags)."""
    s = run.settings
    key = json.dumps({n: getattr(s, n) for n in stage_settings("tokenizer")}, sort_keys=True)
    return run.base / "tokenizers" / f"v{s.vocab_size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def stage_tokenizer(run: Run, t0: float) -> None:
    """Train the BPE tokenizer into the run's folder, or copy the one an earlier run trained with
    the same settings (`tokenizer_cache`), with its measured compression."""
    ensure_corpus(run)
    if run.dist.is_master:
        cache = tokenizer_cache(run)
        if (cache / "section.json").is_file():  # written last: the cached tokenizer is whole
            shutil.copytree(cache, run.tokenizer_dir, dirs_exist_ok=True)
            data = json.loads((cache / "section.json").read_text())
            print0(f"tokenizer: the one trained with these settings, from {cache}")
        else:
            chars = [0]
            t_train = time.perf_counter()
            tokenizer = Tokenizer.train(training_texts(run.data_dir, run.settings.tokenizer_chars, chars),
                                        vocab_size=run.settings.vocab_size)
            train_seconds = time.perf_counter() - t_train
            tokenizer.save(run.tokenizer_dir)
            val_texts = list(itertools.islice(
                (t for _, ts in dataset.iter_documents(dataset.split_shards(run.data_dir, "val")) for t in ts), 200))
            report = compression_report(tokenizer, val_texts)
            data = dict(vocab_size=tokenizer.vocab_size, train_chars=chars[0], train_seconds=train_seconds,
                        compression=report, compression_table=compression_table(report))
            tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
            shutil.copytree(run.tokenizer_dir, tmp, dirs_exist_ok=True)
            (tmp / "section.json").write_text(json.dumps(data))
            try:
                tmp.rename(cache)
            except OSError:  # another run cached the same tokenizer meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        _record(run, "tokenizer", dict(data, seconds=time.perf_counter() - t0))
        print0(data["compression_table"])
    _join(run, "tokenizer")


# ---- pretraining ------------------------------------------------------------------------------
def base_lrs(s: Settings) -> dict[str, float]:
    """GPT.param_groups' base learning rates, from the settings: pretraining's (batch-scaled there),
    of which fine-tuning and RL take a fraction."""
    return dict(embedding_lr=s.embedding_lr, unembedding_lr=s.unembedding_lr, matrix_lr=s.matrix_lr,
                scalar_lr=s.scalar_lr)


def compiled(model: GPT, s: Settings) -> torch.nn.Module:
    """The module that runs training steps: `model` compiled for its one (batch, seq_len) shape, or
    `model` itself. Evaluation, sampling and checkpoints use `model` (the shapes vary there, and its
    state-dict keys stay free of torch.compile's `_orig_mod.` prefix). On CPU, torch.compile writes
    C++: without a C++ compiler the step runs eager, and a line says so."""
    if not s.compile:
        return model
    if model.cos.device.type == "cpu" and not cpp_compiler():
        print0("--compile: no C++ compiler found (torch.compile's CPU code is C++; set CXX or install g++): "
               "training eager")
        return model
    return torch.compile(model, dynamic=False)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use: $CXX, else g++, c++ or clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


SAMPLE_PROMPTS = ("import os\n", "def main(", "class ", "The capital of France is")


def load_tokenizer(run: Run) -> Tokenizer:
    return Tokenizer.load(run.tokenizer_dir)  # one-line FileNotFoundError naming the stage to run


def split_bpb(run: Run, model: GPT, tokenizer: Tokenizer, split: str, token_bytes: torch.Tensor | None = None) -> float:
    """Bits per byte of `model` on the first `eval_tokens` tokens of the corpus' `split` ("train"
    or "val"), each rank reading its share (summed in evaluate_bpb)."""
    s = run.settings
    steps = max(1, s.eval_tokens // (s.device_batch_size * s.seq_len * run.dist.world_size))
    if token_bytes is None:
        token_bytes = tokenizer.token_bytes().to(run.device)
    with PackedLoader(tokenizer, run.data_dir, s.device_batch_size, s.seq_len, split=split, rank=run.dist.rank,
                      world_size=run.dist.world_size, device=run.device, loop=False) as loader:
        return evaluate_bpb(model, ((x, y) for x, y, _ in itertools.islice(loader, steps)), token_bytes)


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
    model.set_linear_precision(parse_linear_precision(s.linear_precision), s.fp8_recipe)
    plan = plan_training(model, s, run.dist.world_size, base_weight_decay=s.weight_decay)
    optimizer = MuonAdamW(model.param_groups(**base_lrs(s), lr_scale=plan.lr_scale, weight_decay=plan.weight_decay))
    ckpt_dir = run.checkpoint_dir("base")
    resumed = resume_state(ckpt_dir, model, optimizer, run.dist.rank, run.dist.world_size)
    state, loader_state = resumed if resumed else (LoopState(), None)

    params, flops = model.num_params(), model.flops_per_token()
    print0(f"model {config} | {params['total']:,} params | {flops:.3e} FLOPs/token | {plan}")
    print0(f"attention: {vendor.attention_backend(device, run.dtype)}")
    loader = PackedLoader(tokenizer, run.data_dir, plan.device_batch_size, s.seq_len, split="train",
                          rank=run.dist.rank, world_size=run.dist.world_size, device=device, state=loader_state)

    tasks_for_core: list = []  # loaded at the first CORE evaluation, then kept

    def evaluate(step: int) -> dict:  # val bpb; CORE (nanochat's, 500 per task) every core_every steps and at the end
        result = {"val_bpb": split_bpb(run, model, tokenizer, "val", token_bytes)}
        if s.core_every > 0 and step > 0 and (step % s.core_every == 0 or step == plan.num_iterations):
            tasks_for_core[:] = tasks_for_core or core_tasks(run)
            core = core_eval.evaluate_core(model, tokenizer, tasks_for_core, max_per_task=s.core_examples,
                                           rank=run.dist.rank, world_size=run.dist.world_size)
            result["core"] = core["core"]
        return result

    settings = LoopSettings(num_iterations=plan.num_iterations, grad_accum=plan.grad_accum,
                            warmup_steps=s.warmup_steps, warmdown_ratio=s.warmdown_ratio, final_lr_frac=s.final_lr_frac,
                            eval_every=s.eval_every, save_every=s.save_every, save_minutes=s.save_minutes,
                            keep_checkpoints=s.keep_checkpoints, log_every=s.log_every,
                            tokens_per_step=plan.total_batch_size, flops_per_token=flops, peak_flops=peak_flops(device))
    step_model = compiled(model, s)
    scaler = LossScaler() if run.dtype == torch.float16 else None
    meta = dict(settings=asdict(s), plan=asdict(plan))
    with loader:
        state = train(model, optimizer, loader, settings, ckpt_dir, run.dist, meta, evaluate=evaluate,
                      state=state, step_model=step_model, scaler=scaler, log=run.logger("pretrain"))

    if run.dist.is_master:
        precision = None
        if s.linear_precision:  # what the chosen GEMM precisions cost, on a validation batch
            with PackedLoader(tokenizer, run.data_dir, s.device_batch_size, s.seq_len, split="val",
                              device=device, loop=False) as val:
                x, y, _ = next(iter(val))
            precision = precision_report(model, x, y)
            print0(precision_table(precision))
        model.eval()
        samples = [p + tokenizer.decode(list(model.generate(tokenizer.encode(p, prepend="<|bos|>"), s.sample_tokens)))
                   for p in SAMPLE_PROMPTS]
        for sample in samples:
            print0(f"sample: {sample!r}")
        _record(run, "pretrain", dict(
            model_config=config.to_dict(), params=params, flops_per_token=flops,
            num_iterations=plan.num_iterations, total_batch_size=plan.total_batch_size,
            world_size=run.dist.world_size, device=device, dtype=str(run.dtype).removeprefix("torch."),
            **loop_numbers(run, state, flops), tokens_per_second=state.tokens_per_second,
            samples=samples, checkpoint_dir=str(ckpt_dir),
            linear_precision=s.linear_precision, fp8_recipe=s.fp8_recipe, precision_report=precision,
            kernel_backend=s.kernel_backend or "by device", dispatch_as=s.dispatch_as, compile=s.compile,
            attention=vendor.attention_backend(device, run.dtype), seconds=time.perf_counter() - t0))
    _join(run, "pretrain")


# ---- mid-training and SFT: the same loop, on conversations ---------------------------------------
# Each task falls back to its offline generator when the real data is not cached (see nanofast.tasks).
# nanochat's SFT (runs/speedrun.sh): SmolTalk, 3 epochs of MMLU for multiple choice, 4 of GSM8K for
# maths and tool use, from the base model.
NANOCHAT_SFT_MIX = ("smoltalk", *("mmlu",) * 3, *("gsm8k",) * 4)
# nanofast's post-training: nanochat's older mid-training mixture (conversations, multiple choice,
# tool use, identity, SpellingBee) first, then SFT on nanochat's mixture plus what nanofast also
# evaluates or teaches (ARC, identity, SpellingBee, arithmetic).
MIDTRAIN_MIX = ("smoltalk", "mmlu", "gsm8k", "identity", "spellingbee", "spellingbee")
SFT_MIX = (*NANOCHAT_SFT_MIX, "arc_easy", "arc_challenge", "identity", "spellingbee", "arithmetic")


def task_dir(run: Run) -> Path:
    return run.base / "tasks"


def _load_task(run: Run, name: str, split: str):
    s = run.settings
    return load_task(name, split, data_dir=task_dir(run), download=s.download_tasks, seed=s.seed, size=s.task_size)


def core_tasks(run: Run) -> list[core_eval.CoreTask]:
    """CORE's tasks: DCLM's eval bundle when it is there (or --download-tasks fetches it), else the
    offline stand-ins."""
    bundle = core_eval.ensure_bundle(run.base, download=run.settings.download_tasks)
    return core_eval.load_core_tasks(bundle) if bundle else core_eval.offline_core_tasks(seed=run.settings.seed)


def load_stage_model(run: Run, stage: str, dtype: torch.dtype | None = None) -> GPT:
    """The latest checkpoint a stage wrote (one-line error naming the stage to run first)."""
    directory = run.checkpoint_dir(CHECKPOINTS[stage])
    if checkpoint.latest_step(directory) is None:
        raise FileNotFoundError(f"no {stage} checkpoint in {directory}: run `train.py --stage {stage}` first")
    return checkpoint.load_nanochat(directory, run.device, dtype or run.dtype).train()


def _finetune(run: Run, t0: float, stage: str, init_from: str, mix: tuple[str, ...], iterations: int) -> None:
    """Continue training the `init_from` model on a task mixture: the pretraining loop with the
    conversation loader and nanochat's SFT recipe: pretraining's batch (gradient accumulation where
    the ranks' rows fall short of it), `init_from`'s optimizer moments, no warmup, LRs at
    finetune_lr_scale held for the first half and decayed linearly to 0, Muon momentum
    0.85 -> 0.95 over 300 steps, no Muon weight decay (pretraining decayed it to 0)."""
    s, device = run.settings, run.device
    tokenizer = load_tokenizer(run)
    model = load_stage_model(run, init_from)  # GEMMs in the compute dtype: linear_precision is pretraining's
    loaded = {n: _load_task(run, n, "train") for n in dict.fromkeys(mix)}  # a repeated name: more epochs of it
    train_mix = TaskMixture([loaded[n] for n in mix], seed=s.seed)
    val_mix = TaskMixture([_load_task(run, n, "test") for n in sorted(loaded)], seed=s.seed)
    sources = {t.name: t.source for t in train_mix.tasks}
    plan = plan_training(model, s, run.dist.world_size)
    rows_per_step = plan.total_batch_size // s.seq_len
    if iterations <= 0:  # one epoch, counting ~2 conversations per row as packing typically gives
        iterations = max(1, len(train_mix) // (2 * rows_per_step))
    optimizer = MuonAdamW(model.param_groups(**base_lrs(s), weight_decay=0.0, lr_frac=s.finetune_lr_scale))
    ckpt_dir = run.checkpoint_dir(CHECKPOINTS[stage])
    resumed = resume_state(ckpt_dir, model, optimizer, run.dist.rank, run.dist.world_size)
    state, loader_state = resumed if resumed else (LoopState(), None)
    if not resumed:
        init_dir = run.checkpoint_dir(CHECKPOINTS[init_from])
        warm = warm_start(optimizer, init_dir, run.dist.rank, run.dist.world_size)
        print0(f"{stage}: optimizer moments from {init_dir} step {warm}" if warm is not None else
               f"{stage}: fresh optimizer state ({init_dir} holds none saved by {run.dist.world_size} rank(s))")
    token_bytes = tokenizer.token_bytes().to(device)
    print0(f"{stage}: {len(train_mix):,} conversations ({sources}), {iterations} steps of {rows_per_step} rows")

    def evaluate(step: int) -> dict:
        val = ConversationLoader(tokenizer, val_mix, s.device_batch_size, s.seq_len, rank=run.dist.rank,
                                 world_size=run.dist.world_size, device=device, seed=s.seed, loop=False)
        batches = ((x, y) for x, y, _ in itertools.islice(val, 8))
        return {"val_bpb": evaluate_bpb(model, batches, token_bytes)}

    loader = ConversationLoader(tokenizer, train_mix, plan.device_batch_size, s.seq_len, rank=run.dist.rank,
                                world_size=run.dist.world_size, device=device, seed=s.seed, state=loader_state)
    settings = LoopSettings(num_iterations=iterations, grad_accum=plan.grad_accum, warmup_steps=0, warmdown_ratio=0.5,
                            final_lr_frac=0.0, finetune=True,
                            eval_every=s.eval_every, save_every=s.save_every, save_minutes=s.save_minutes,
                            keep_checkpoints=s.keep_checkpoints, log_every=s.log_every,
                            tokens_per_step=plan.total_batch_size, flops_per_token=model.flops_per_token(),
                            peak_flops=peak_flops(device))
    scaler = LossScaler() if run.dtype == torch.float16 else None
    state = train(model, optimizer, loader, settings, ckpt_dir, run.dist, dict(settings=asdict(s), stage=stage),
                  evaluate=evaluate, state=state, step_model=compiled(model, s), scaler=scaler,
                  log=run.logger(stage))
    if run.dist.is_master:
        _record(run, stage, dict(
            iterations=iterations, total_batch_size=plan.total_batch_size, grad_accum=plan.grad_accum,
            conversations=len(train_mix), task_sources=sources, **loop_numbers(run, state, model.flops_per_token()),
            checkpoint_dir=str(ckpt_dir), seconds=time.perf_counter() - t0))
    _join(run, stage)


def stage_midtrain(run: Run, t0: float) -> None:
    _finetune(run, t0, "midtrain", "pretrain", MIDTRAIN_MIX, run.settings.midtrain_iterations)


def stage_sft(run: Run, t0: float) -> None:
    if run.settings.post_training == "nanochat":
        _finetune(run, t0, "sft", "pretrain", NANOCHAT_SFT_MIX, run.settings.sft_iterations)
    else:
        _finetune(run, t0, "sft", "midtrain", SFT_MIX, run.settings.sft_iterations)


# ---- RL -----------------------------------------------------------------------------------------
RL_TASK = "gsm8k"  # offline: GSM8K-format arithmetic problems


def stage_rl(run: Run, t0: float) -> None:
    """GRPO (see nanofast.rl) from the SFT model, through the training loop with RL's loader and
    loss; held-out accuracy before and after is recorded."""
    s, device, world, rank = run.settings, run.device, run.dist.world_size, run.dist.rank
    dtype = parse_dtype(s.rl_dtype) if s.rl_dtype else run.dtype
    tokenizer = load_tokenizer(run)
    model = load_stage_model(run, "sft", dtype)
    train_task, test_task = _load_task(run, RL_TASK, "train"), _load_task(run, RL_TASK, "test")
    optimizer = MuonAdamW(model.param_groups(**base_lrs(s), weight_decay=s.weight_decay, lr_frac=s.rl_lr_scale))
    ckpt_dir = run.checkpoint_dir(CHECKPOINTS["rl"])
    resumed = resume_state(ckpt_dir, model, optimizer, rank, world)
    state = resumed[0] if resumed else LoopState()
    # Held-out accuracy greedy (as evaluated) and sampled at the rollouts' temperature 1 (what GRPO
    # optimises directly: it sharpens the sampling distribution towards rewarded answers). The same
    # questions and sampling seeds before and after, so the change is measured paired.
    heldout = dict(max_examples=s.rl_eval_examples, max_new_tokens=s.rl_max_tokens, rank=rank, world_size=world)

    def measure() -> dict:  # every rank answers its share of the questions
        model.eval()
        return {"greedy": generative_outcomes(model, tokenizer, test_task, **heldout),
                "sampled": generative_outcomes(model, tokenizer, test_task, temperature=1.0, **heldout)}

    def accuracy(outcomes: list[bool]) -> dict:
        return {"accuracy": sum(outcomes) / max(len(outcomes), 1), "n": len(outcomes), "source": test_task.source}

    before = checkpoint.read_meta(ckpt_dir, state.step)["heldout_before"] if resumed else measure()
    model.train()
    loader = rollout_batches(model, tokenizer, train_task, start_step=state.step, questions=s.rl_questions,
                             samples=s.rl_samples, max_new_tokens=s.rl_max_tokens, seed=s.seed, rank=rank,
                             world_size=world, device=torch.device(device))
    # One update per batch of fresh samples, the LRs decayed linearly to 0 over the run.
    settings = LoopSettings(num_iterations=s.rl_steps, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0,
                            eval_every=0, save_every=s.save_every, save_minutes=s.save_minutes,
                            keep_checkpoints=s.keep_checkpoints, log_every=s.log_every)
    # fp16's narrow exponent range needs loss scaling; the scaler skips steps whose gradients overflow.
    scaler = LossScaler() if dtype == torch.float16 else None
    state = train(model, optimizer, loader, settings, ckpt_dir, run.dist,
                  dict(settings=asdict(s), stage="rl", heldout_before=before), state=state, scaler=scaler,
                  log=run.logger("rl"), loss_fn=policy_loss)
    history = state.stats
    after = measure()
    if run.dist.is_master:
        _record(run, "rl", dict(
            task=test_task.name, source=test_task.source, precision=str(dtype).removeprefix("torch."),
            steps=s.rl_steps, questions_per_step=s.rl_questions, samples=s.rl_samples, lr_scale=s.rl_lr_scale,
            history=history, heldout_before={m: accuracy(v) for m, v in before.items()},
            heldout_after={m: accuracy(v) for m, v in after.items()},
            heldout_change={m: paired_change(before[m], after[m]) for m in before},
            mean_logp_abs_diff=statistics.fmean(h["logp_abs_diff"] for h in history) if history else None,
            mean_kl=statistics.fmean(h["kl_engine_trainer"] for h in history) if history else None,
            seconds=time.perf_counter() - t0))
    _join(run, "rl")


# ---- evaluation -----------------------------------------------------------------------------------
CHAT_EVAL_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")


def stage_eval(run: Run, t0: float) -> None:
    """CORE for the base model; the chat tasks and ChatCORE for every later checkpoint present.
    Every rank scores its share of each task's examples; the counts are summed."""
    s, shard = run.settings, dict(rank=run.dist.rank, world_size=run.dist.world_size)
    tokenizer = load_tokenizer(run)
    limit = None if s.eval_examples < 0 else s.eval_examples
    results: dict[str, dict] = {}
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        if checkpoint.latest_step(run.checkpoint_dir(CHECKPOINTS[stage])) is None:
            continue
        model = load_stage_model(run, stage).eval()
        label = CHECKPOINTS[stage]
        if stage == "pretrain":
            results[label] = {"core": core_eval.evaluate_core(model, tokenizer, core_tasks(run), max_per_task=limit,
                                                              **shard),
                              "bpb": {split: split_bpb(run, model, tokenizer, split) for split in ("train", "val")}}
            print0(f"eval {label}: CORE {results[label]['core']['core']:.4f} ({results[label]['core']['source']}), "
                   f"bpb train {results[label]['bpb']['train']:.4f} val {results[label]['bpb']['val']:.4f}")
            continue
        per_task = {}
        for name in CHAT_EVAL_TASKS:
            task = _load_task(run, name, "test")
            per_task[name] = evaluate_task(model, tokenizer, task, max_examples=limit,
                                           max_new_tokens=s.eval_max_tokens, **shard)
            print0(f"eval {label} {name}: {per_task[name]['accuracy']:.4f} ({task.source}, n={per_task[name]['n']})")
        results[label] = {"tasks": per_task, "chatcore": chatcore(per_task)}
    if run.dist.is_master:
        _record(run, "eval", dict(results=results, seconds=time.perf_counter() - t0))
    _join(run, "eval")


# ---- report -----------------------------------------------------------------------------------
def report_path(run: Run) -> Path:
    return run.dir / "report.md"


def stage_report(run: Run, t0: float) -> None:
    if run.dist.is_master:
        build_report(run.report_dir, report_path(run), planned=stages_of("all", run.settings))  # the last
        # stage: nobody waits for it
