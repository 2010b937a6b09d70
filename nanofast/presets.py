"""Run settings: four named presets, and command-line overrides of any field."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Settings:
    # data and tokenizer
    data: str = "default"             # "default": the embedded corpus; "climbmix": downloaded shards
    corpus_shards: int = 8            # default corpus: shards written; climbmix: training shards fetched
    corpus_chars: int | None = None   # cap on the default corpus size (None = all of it)
    vocab_size: int = 32768
    tokenizer_chars: int = 2_000_000_000
    # model
    depth: int = 24
    aspect_ratio: int = 64
    head_dim: int = 128
    window_pattern: str = "SSSL"
    seq_len: int = 2048
    # pretraining
    device_batch_size: int = 16
    total_batch_size: int = -1        # tokens per optimizer step; -1 = nanochat's rule from the horizon
    num_iterations: int = -1          # -1 = from target_param_data_ratio
    target_param_data_ratio: float = 12.0
    eval_every: int = 250
    eval_tokens: int = 80 * 524288
    core_every: int = -1              # CORE in pretraining every this many steps (a multiple of eval_every)
    core_examples: int = 500          # and at the end, on this many examples per task; <= 0: off
    save_every: int = -1              # steps between checkpoints (<= 0: by save_minutes and at the end)
    save_minutes: float = 30.0        # checkpoint once this much wall clock passed since the last (<= 0: off)
    keep_checkpoints: int = 2         # newest complete checkpoints kept per stage (<= 0: all)
    log_every: int = 10
    sample_tokens: int = 32
    dtype: str | None = None          # None = bf16 on GPU, fp32 on CPU
    linear_precision: str | None = None  # pretraining's GEMM precision per layer class: "fp8", "attn=fp8,mlp=fp16", ...
    fp8_recipe: str = "tensorwise"    # or "rowwise" (dynamic scaling)
    compile: bool = True              # torch.compile the training step (pretraining, mid-training, SFT)
    kernel_backend: str | None = None  # None: by device (Triton on CUDA, torch on CPU); torch | triton | cuda
    seed: int = 42
    # several ranks: collectives (gradients, losses) time out after dist_timeout_minutes; a rank
    # waiting for rank 0's own work (the tokenizer, samples, evaluations) polls for its result
    # on disk for up to wait_minutes
    dist_timeout_minutes: float = 30.0
    wait_minutes: float = 360.0
    # mid-training and SFT (the same loop; conversations packed whole, loss on assistant tokens)
    download_tasks: bool = False      # fetch the real task datasets; else use what is cached, or generate
    task_size: int | None = None      # cap on examples per task (None: each task's full split)
    midtrain_iterations: int = -1     # -1: one epoch of the mixture
    sft_iterations: int = -1
    finetune_lr_scale: float = 0.5    # LRs relative to the base LRs (before pretraining's batch scaling)
    # RL (GRPO on GSM8K-style problems)
    rl_steps: int = 50
    rl_questions: int = 16            # questions per step (all ranks together)
    rl_samples: int = 16              # answers per question
    rl_max_tokens: int = 256
    rl_lr_scale: float = 0.05
    rl_eval_examples: int = 500       # held-out questions measured before and after RL
    precision: str | None = None      # RL compute dtype: fp16 (loss scaling), bf16, fp32; None = dtype
    # evaluation
    eval_examples: int = 500          # per task (-1: all)
    eval_max_tokens: int = 256


PRESETS: dict[str, Settings] = {
    # The whole pipeline in a couple of minutes on 2 CPU cores: what the tests run.
    "smoke": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=1024, tokenizer_chars=2_000_000,
                      depth=2, head_dim=64, window_pattern="SL", seq_len=128, device_batch_size=4,
                      total_batch_size=512, num_iterations=30, eval_every=15, eval_tokens=4096,
                      log_every=10, sample_tokens=16, compile=False, task_size=200, midtrain_iterations=10,
                      sft_iterations=10, rl_steps=3, rl_questions=4, rl_samples=4, rl_max_tokens=24,
                      rl_eval_examples=12, eval_examples=12, eval_max_tokens=24),
    # The README's main job: a tiny model on the embedded corpus, every stage, in 18-27 minutes on 2 cores.
    "cpu": Settings(corpus_shards=8, vocab_size=8192, tokenizer_chars=50_000_000, depth=4, head_dim=64,
                    window_pattern="SSSL", seq_len=512, device_batch_size=8, total_batch_size=4096,
                    num_iterations=300, eval_every=100, eval_tokens=64 * 1024, log_every=20, compile=False,
                    task_size=2000, midtrain_iterations=100, sft_iterations=100, eval_examples=100, eval_max_tokens=64,
                    # RL: 30 steps at LR x 0.05 left held-out accuracy flat; from the same SFT model
                    # 100 steps at x 0.05 raised sampled accuracy 0.41 -> 0.64 and at x 0.15 to 0.77
                    # (greedy 0.77 -> 0.89; n = 300).
                    rl_steps=100, rl_questions=8, rl_samples=8, rl_max_tokens=64, rl_lr_scale=0.15,
                    rl_eval_examples=300),
    # The speedrun's code path at toy size: every switch the 8xH100 run flips (torch.compile, bf16,
    # fp8 linears, the Triton kernels) with only the sizes changed, plus what a machine without a GPU
    # or network forces: the kernel backend named explicitly (Triton's interpreter on CPU tensors)
    # and the offline data. tests/test_rehearsal.py runs it on two ranks through every stage. The
    # corpus is larger than the tokenizer needs so that each split has row groups for both ranks.
    "rehearsal": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=512, tokenizer_chars=400_000,
                          depth=1, head_dim=32, seq_len=64, device_batch_size=2, total_batch_size=256,
                          num_iterations=6, eval_every=3, eval_tokens=256, core_every=6, core_examples=4,
                          save_every=2, log_every=1,
                          sample_tokens=4, dtype="bf16", linear_precision="attn=fp8,mlp=fp8,lm_head=fp8",
                          kernel_backend="triton",
                          task_size=40, midtrain_iterations=3, sft_iterations=3, rl_steps=2, rl_questions=2,
                          rl_samples=2, rl_max_tokens=8, rl_eval_examples=4, eval_examples=4, eval_max_tokens=8),
    # nanochat's runs/speedrun.sh on 8xH100: depth 24, param:data ratio 8, fp8 pretraining (every
    # linear but the gates, lm_head included, as its module filter picks them), ClimbMix's 170 shards,
    # auto batch size (2^20 tokens) and horizon (5,568 steps), every evaluation example. The README's
    # "speedrun against nanochat" table lists each setting beside nanochat's.
    # Fine-tuning runs at pretraining's batch-scaled LRs (x sqrt(2^20 / 2^19)): nanochat's SFT asks
    # for x 0.8 but then loads pretraining's optimizer state, whose saved initial_lr replaces it.
    "speedrun": Settings(data="climbmix", corpus_shards=170, depth=24, seq_len=2048, device_batch_size=16,
                         target_param_data_ratio=8.0, linear_precision="attn=fp8,mlp=fp8,lm_head=fp8",
                         core_every=2000, finetune_lr_scale=2 ** 0.5, download_tasks=True, eval_examples=-1,
                         eval_max_tokens=512),
}


# Sizes and counts that have no meaning at 0 or below (the -1 = "automatic" ones are not here).
POSITIVE = ("corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars", "depth", "aspect_ratio", "head_dim",
            "seq_len", "device_batch_size", "target_param_data_ratio", "eval_tokens", "core_examples",
            "dist_timeout_minutes", "wait_minutes", "task_size", "rl_steps", "rl_questions", "rl_samples",
            "rl_max_tokens", "rl_lr_scale", "rl_eval_examples", "finetune_lr_scale", "eval_max_tokens")


def make_settings(preset: str, **overrides) -> Settings:
    """The preset's settings with every non-None override applied; unknown names raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}")
    settings = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    for name in POSITIVE:
        value = getattr(settings, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    from nanofast.model import parse_linear_precision

    parse_linear_precision(settings.linear_precision)  # a bad spec fails here, before any work
    if settings.fp8_recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"unknown fp8 recipe {settings.fp8_recipe!r}: choose tensorwise or rowwise")
    if settings.precision not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {settings.precision!r}: choose fp32, bf16 or fp16")
    from nanofast.kernels import BACKENDS

    if settings.kernel_backend not in (None, *BACKENDS):
        raise ValueError(f"unknown kernel backend {settings.kernel_backend!r}: choose one of {', '.join(BACKENDS)}")
    if settings.core_every > 0 and (settings.eval_every <= 0 or settings.core_every % settings.eval_every):
        raise ValueError(f"core_every {settings.core_every} must be a multiple of eval_every {settings.eval_every} "
                         f"(CORE runs at evaluation steps)")
    if settings.data not in ("default", "climbmix"):
        raise ValueError(f"unknown data {settings.data!r}: choose 'default' (embedded corpus) or 'climbmix'")
    return settings


# What each stage computes depends on these settings and on those of every stage before it, so a
# finished stage recorded with other values is stale. The rest (OPERATIONAL) change how a run goes,
# not what it computes: logging, checkpoint cadence, timeouts, memory per step, the kernels' backend.
STAGE_SETTINGS = {
    "tokenizer": ("data", "corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars"),
    "pretrain": ("depth", "aspect_ratio", "head_dim", "window_pattern", "seq_len", "total_batch_size",
                 "num_iterations", "target_param_data_ratio", "dtype", "linear_precision", "fp8_recipe", "seed"),
    "midtrain": ("download_tasks", "task_size", "midtrain_iterations", "finetune_lr_scale"),
    "sft": ("sft_iterations",),
    "rl": ("rl_steps", "rl_questions", "rl_samples", "rl_max_tokens", "rl_lr_scale", "rl_eval_examples", "precision"),
    "eval": ("eval_examples", "eval_max_tokens"),
}
OPERATIONAL = ("device_batch_size", "eval_every", "eval_tokens", "core_every", "core_examples", "save_every",
               "save_minutes", "keep_checkpoints", "log_every", "sample_tokens", "compile", "kernel_backend",
               "dist_timeout_minutes", "wait_minutes")


# The architecture: a run directory per combination (nanochat's --model-tag, default d<depth>).
MODEL_SETTINGS = (("depth", "d"), ("aspect_ratio", "a"), ("head_dim", "h"), ("window_pattern", "w"),
                  ("seq_len", "s"), ("vocab_size", "v"))


def default_run_name(s: Settings) -> str:
    """`d<depth>`, plus each other architecture setting that differs from Settings()'s default, e.g.
    the speedrun's "d24" and the smoke preset's "d2-h64-wSL-s128-v1024". The other settings a stage
    depends on do not name the directory: a changed one is refused there, by name (`changed_settings`)."""
    default = Settings()
    return "-".join(f"{tag}{getattr(s, name)}" for name, tag in MODEL_SETTINGS
                    if name == "depth" or getattr(s, name) != getattr(default, name))


def check_run_name(name: str) -> str:
    """A run name is one path component of letters, digits, '.', '_' or '-' (it names a folder)."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise ValueError(f"--run-name {name!r}: expected letters, digits, '.', '_' or '-', not starting with '.'")
    return name


def changed_settings(recorded: dict, current: Settings, stage: str) -> dict[str, tuple]:
    """{name: (recorded value, current value)} for the settings `stage`'s result depends on (its own
    and every earlier stage's) that differ between `recorded` (asdict of the settings it ran with)
    and `current`. Stages without settings of their own (report) depend on all."""
    order = list(STAGE_SETTINGS)
    upstream = order[:order.index(stage) + 1] if stage in order else order
    now = asdict(current)
    return {n: (recorded[n], now[n]) for s in upstream for n in STAGE_SETTINGS[s]
            if n in recorded and recorded[n] != now[n]}
