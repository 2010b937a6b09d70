"""Run settings: four named presets, and a command-line override of every field (train.py makes
one flag per field, its help from the field's)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from nanofast.kernels import BACKENDS
from nanofast.ops import KERNEL_BACKEND_HELP

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def setting(default, help: str, choices: tuple | None = None):
    """A Settings field: its default, its --flag's help and, if it has them, its only values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # data and tokenizer
    data: str = setting("default", "pretraining corpus: the embedded one (no network) or ClimbMix's shards",
                        ("default", "climbmix"))
    corpus_shards: int = setting(8, "default corpus: shards written; climbmix: training shards fetched")
    corpus_chars: int | None = setting(None, "cap on the default corpus size in characters (default: all of it)")
    vocab_size: int = setting(32768, "tokenizer vocabulary size")
    tokenizer_chars: int = setting(2_000_000_000, "characters the tokenizer trains on")
    # model
    depth: int = setting(24, "the model-size dial (d_model = 64 x depth, rounded to the head dim)")
    aspect_ratio: int = setting(64, "d_model per layer")
    head_dim: int = setting(128, "attention head size")
    window_pattern: str = setting("SSSL", "sliding windows tiled over layers (S: a quarter context, L: full)")
    seq_len: int = setting(2048, "context length")
    # pretraining
    device_batch_size: int = setting(16, "rows per rank per micro-step (fewer where the ranks overfill the batch)")
    total_batch_size: int = setting(-1, "tokens per optimizer step; -1: nanochat's rule from the horizon")
    num_iterations: int = setting(-1, "pretraining steps; -1: from --target-param-data-ratio")
    target_param_data_ratio: float = setting(12.0, "training tokens per scaling parameter")
    eval_every: int = setting(250, "val bpb every this many steps (<= 0: only at the end)")
    eval_tokens: int = setting(80 * 524288, "tokens of each val bpb evaluation")
    core_every: int = setting(-1, "CORE during pretraining every this many steps (a multiple of --eval-every; "
                                  "with --eval-every <= 0 at the end only) and at the end; <= 0: off")
    core_examples: int = setting(500, "examples per CORE task during pretraining")
    save_every: int = setting(-1, "steps between checkpoints (<= 0: by --save-minutes and at the end)")
    save_minutes: float = setting(30.0, "also checkpoint once this much wall clock passed since the last (<= 0: off)")
    keep_checkpoints: int = setting(2, "newest complete checkpoints kept per stage (<= 0: all)")
    log_every: int = setting(10, "log a training line every this many steps")
    sample_tokens: int = setting(32, "tokens of each sample printed after pretraining")
    dtype: str | None = setting(None, "compute dtype (default: bf16 on GPU, fp32 on CPU)", DTYPE_CHOICES)
    linear_precision: str | None = setting(
        None, "GEMM precision of the linears in pretraining: fp8 | fp16 | bf16 | fp32 (attention and MLP), or "
              "per class, e.g. attn=fp8,mlp=fp8,lm_head=bf16; fp8 layers run in the compute dtype for "
              "evaluation and inference")
    fp8_recipe: str = setting("tensorwise", "fp8 dynamic scaling", ("tensorwise", "rowwise"))
    compile: bool = setting(True, "torch.compile the training step (pretraining, mid-training, SFT)")
    kernel_backend: str | None = setting(None, KERNEL_BACKEND_HELP, BACKENDS)
    dispatch_as: str | None = setting(None, "on CPU, run each kernel-backed op on the backend a GPU of this class "
                                            "(e.g. gpu-H100) picks (nanofast.dispatch), the kernels through Triton's "
                                            "interpreter and the CUDA emulation: rehearses a GPU run's choices; "
                                            "--kernel-backend wins over it")
    seed: int = setting(42, "seed of the model's init, the data order and the samples")
    wandb: str | None = setting(None, "Weights & Biases project: log every stage's steps, evaluations and report "
                                      "numbers there (rank 0; needs `pip install wandb`; WANDB_MODE=offline logs "
                                      "locally); default: off")
    # several ranks: collectives (gradients, losses) time out after dist_timeout_minutes; a rank
    # waiting for another's own work (the tokenizer, samples, evaluations) waits on disk
    dist_timeout_minutes: float = setting(30.0, "several ranks: the collective timeout")
    wait_minutes: float = setting(360.0, "several ranks: how long a rank waits for the others at a stage's end")
    # mid-training and SFT (the same loop; conversations packed whole, loss on assistant tokens)
    download_tasks: bool = setting(False, "fetch the real task datasets (SmolTalk, MMLU, ARC, GSM8K, HumanEval, "
                                          "CORE); else what is cached, or generated offline data")
    task_size: int | None = setting(None, "cap on examples per task (default: each task's full split)")
    midtrain_iterations: int = setting(-1, "mid-training steps; -1: one epoch of the mixture")
    sft_iterations: int = setting(-1, "SFT steps; -1: one epoch of the mixture")
    post_training: str = setting("nanofast", "what follows pretraining: 'nanochat' is runs/speedrun.sh's SFT from the "
                                             "base model on SmolTalk + 3x MMLU + 4x GSM8K; 'nanofast' adds mid-training "
                                             "before SFT, ARC, identity, SpellingBee and arithmetic to SFT's mixture, "
                                             "and RL after it", ("nanochat", "nanofast"))
    finetune_lr_scale: float = setting(0.5, "fine-tuning LRs relative to the base LRs (before pretraining's "
                                            "batch scaling)")
    # RL (GRPO on GSM8K-style problems)
    rl_steps: int = setting(50, "GRPO steps")
    rl_questions: int = setting(16, "questions per RL step (all ranks together)")
    rl_samples: int = setting(16, "answers per question (the GRPO group)")
    rl_max_tokens: int = setting(256, "longest sampled answer")
    rl_lr_scale: float = setting(0.05, "RL learning rates relative to the base LRs")
    rl_eval_examples: int = setting(500, "held-out questions answered before and after RL (greedy and sampled)")
    rl_dtype: str | None = setting(None, "RL compute dtype (default: --dtype); fp16 trains with loss scaling and "
                                         "removes most of the sampler/trainer mismatch bf16 rounding causes",
                                   DTYPE_CHOICES)
    # evaluation
    eval_examples: int = setting(500, "examples per evaluation task (-1: all)")
    eval_max_tokens: int = setting(256, "longest generated answer in the chat evaluations")


PRESETS: dict[str, Settings] = {
    # The whole pipeline in a couple of minutes on 2 CPU cores: what the tests run.
    "smoke": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=1024, tokenizer_chars=2_000_000,
                      depth=2, head_dim=64, window_pattern="SL", seq_len=128, device_batch_size=4,
                      total_batch_size=512, num_iterations=30, eval_every=15, eval_tokens=4096,
                      log_every=10, sample_tokens=16, compile=False, task_size=200, midtrain_iterations=10,
                      sft_iterations=10, rl_steps=3, rl_questions=4, rl_samples=4, rl_max_tokens=24,
                      rl_eval_examples=12, eval_examples=12, eval_max_tokens=24),
    # The README's main job: a tiny model on the embedded corpus, every stage, in 18.5 minutes on 2 cores.
    # Compiled: measured at depth 4, T 512, batch 8, vocab 32768 on 2 cores, torch.compile's step
    # ran 1,650-1,800 tokens/s in fp32 against eager's 1,540 (2,700-2,930 against ~2,100 in bf16)
    # after ~30 s of compiling, paid back within the first 100 of pretraining's 300 steps.
    "cpu": Settings(corpus_shards=8, vocab_size=8192, tokenizer_chars=50_000_000, depth=4, head_dim=64,
                    window_pattern="SSSL", seq_len=512, device_batch_size=8, total_batch_size=4096,
                    num_iterations=300, eval_every=100, eval_tokens=64 * 1024, log_every=20,
                    task_size=2000, midtrain_iterations=100, sft_iterations=100, eval_examples=100, eval_max_tokens=64,
                    # RL: 30 steps at LR x 0.05 left held-out accuracy flat; from the same SFT model
                    # 100 steps at x 0.05 raised sampled accuracy 0.41 -> 0.64 and at x 0.15 to 0.77
                    # (greedy 0.77 -> 0.89; n = 300).
                    rl_steps=100, rl_questions=8, rl_samples=8, rl_max_tokens=64, rl_lr_scale=0.15,
                    rl_eval_examples=300),
    # The speedrun's code path at toy size: every switch the 8xH100 run flips (torch.compile, bf16,
    # fp8 linears, each op's backend as the dispatch picks it on an H100) with only the sizes
    # changed, plus what a machine without a GPU or network forces: the H100's choices applied to
    # CPU tensors (dispatch_as; Triton kernels through the interpreter) and the offline data. tests/test_rehearsal.py runs it on two ranks through every stage. The
    # corpus is larger than the tokenizer needs so that each split has row groups for both ranks.
    # One row per micro-step: 2 micro-steps per step, the gradient accumulation the speedrun's
    # pretraining and fine-tuning run (4 micro-steps of 16 rows on 8 ranks).
    "rehearsal": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=512, tokenizer_chars=400_000,
                          depth=1, head_dim=32, seq_len=64, device_batch_size=1, total_batch_size=256,
                          num_iterations=6, eval_every=3, eval_tokens=256, core_every=6, core_examples=4,
                          save_every=2, log_every=1,
                          sample_tokens=4, dtype="bf16", linear_precision="attn=fp8,mlp=fp8,lm_head=fp8",
                          dispatch_as="gpu-H100",
                          task_size=40, midtrain_iterations=3, sft_iterations=3, rl_steps=2, rl_questions=2,
                          rl_samples=2, rl_max_tokens=8, rl_eval_examples=4, eval_examples=4, eval_max_tokens=8),
    # nanochat's runs/speedrun.sh on 8xH100: depth 24, param:data ratio 8, fp8 pretraining (every
    # linear but the gates, lm_head included, as its module filter picks them), ClimbMix's 170 shards,
    # auto batch size (2^20 tokens) and horizon (5,568 steps), every evaluation example. The README's
    # "speedrun against nanochat" table lists each setting beside nanochat's. Post-training is
    # nanochat's too: SFT from the base model, no mid-training or RL.
    # Fine-tuning runs at pretraining's batch-scaled LRs (x sqrt(2^20 / 2^19)): nanochat's SFT asks
    # for x 0.8 but then loads pretraining's optimizer state, whose saved initial_lr replaces it.
    "speedrun": Settings(data="climbmix", corpus_shards=170, depth=24, seq_len=2048, device_batch_size=16,
                         target_param_data_ratio=8.0, linear_precision="attn=fp8,mlp=fp8,lm_head=fp8",
                         core_every=2000, post_training="nanochat", finetune_lr_scale=2 ** 0.5, download_tasks=True,
                         eval_examples=-1, eval_max_tokens=512),
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
    for f in fields(Settings):
        choices, value = f.metadata["choices"], getattr(settings, f.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    if settings.core_every > 0 and settings.eval_every > 0 and settings.core_every % settings.eval_every:
        raise ValueError(f"core_every {settings.core_every} must be a multiple of eval_every {settings.eval_every} "
                         f"(CORE runs at evaluation steps; with eval_every <= 0 only at the end)")
    return settings


# What each stage computes depends on these settings and on those of every stage before it, so a
# finished stage recorded with other values is stale. The rest (OPERATIONAL) change how a run goes,
# not what it computes: logging, checkpoint cadence, timeouts, memory per step, the kernels' backend.
STAGE_SETTINGS = {
    "tokenizer": ("data", "corpus_shards", "corpus_chars", "vocab_size", "tokenizer_chars"),
    "pretrain": ("depth", "aspect_ratio", "head_dim", "window_pattern", "seq_len", "total_batch_size",
                 "num_iterations", "target_param_data_ratio", "dtype", "linear_precision", "fp8_recipe", "seed"),
    "midtrain": ("download_tasks", "task_size", "midtrain_iterations", "finetune_lr_scale"),
    "sft": ("post_training", "sft_iterations"),
    "rl": ("rl_steps", "rl_questions", "rl_samples", "rl_max_tokens", "rl_lr_scale", "rl_eval_examples", "rl_dtype"),
    "eval": ("eval_examples", "eval_max_tokens"),
}
OPERATIONAL = ("device_batch_size", "eval_every", "eval_tokens", "core_every", "core_examples", "save_every",
               "save_minutes", "keep_checkpoints", "log_every", "sample_tokens", "compile", "kernel_backend",
               "dispatch_as",
               "dist_timeout_minutes", "wait_minutes", "wandb")


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
