"""Run settings: four named presets, and a command-line override of every field (train.py makes
one flag per field, its help from the field's). Each field declares where it is defined what kind of
setting it is (`setting`); the lists the code needs are derived from that (`stage_settings`,
`operational_settings`, `positive_settings`, `model_tags`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from nanofast.common import DTYPES
from nanofast.kernels import BACKENDS
from nanofast.model import EMBEDDING_LR, SCALAR_LR, UNEMBEDDING_LR, WEIGHT_DECAY, parse_linear_precision
from nanofast.ops import KERNEL_BACKEND_HELP
from nanofast.optim import FINAL_LR_FRAC, MUON_DEFAULTS, WARMDOWN_RATIO, WARMUP_STEPS

# The stages that have settings of their own, in the order they run (the pipeline's, before its
# report): what a stage computes depends on its own settings and on every earlier stage's.
SETTING_STAGES = ("tokenizer", "pretrain", "midtrain", "sft", "rl", "eval")


def setting(default, help: str, choices: tuple | None = None, *, stage: str | None = None,
            operational: bool = False, positive: bool = False, tag: str | None = None):
    """A Settings field: its default, its --flag's help, its only values if it has them, and its kind.

    Exactly one of
      stage: the stage whose result depends on it (and so every later stage's): a finished stage
          recorded with another value is stale (`changed_settings`);
      operational=True: it changes how a run goes, not what it computes (logging, checkpoint
          cadence, timeouts, memory per step, the kernels' backend).
    positive: a size or count with no meaning at 0 or below (`make_settings` refuses those).
    tag: an architecture setting, and its letter in the run's folder name (`default_run_name`)."""
    if (stage is None) != operational or (stage is not None and stage not in SETTING_STAGES):
        raise TypeError(f"setting {help[:40]!r}: declare exactly one of operational=True and stage= one of "
                        f"{', '.join(SETTING_STAGES)}")
    return field(default=default, metadata={"help": help, "choices": choices, "stage": stage,
                                            "operational": operational, "positive": positive, "tag": tag})


@dataclass(frozen=True)
class Settings:
    # data and tokenizer
    data: str = setting("default", "pretraining corpus: the embedded one (no network) or ClimbMix's shards",
                        ("default", "climbmix"), stage="tokenizer")
    corpus_shards: int = setting(8, "default corpus: shards written; climbmix: training shards fetched",
                                 stage="tokenizer", positive=True)
    corpus_chars: int | None = setting(None, "cap on the default corpus size in characters (default: all of it)",
                                       stage="tokenizer", positive=True)
    tokenizer_chars: int = setting(2_000_000_000, "characters the tokenizer trains on", stage="tokenizer",
                                   positive=True)
    # model (the architecture: each names the run's folder with its tag; the vocabulary is the tokenizer's)
    depth: int = setting(24, "the model-size dial (d_model = 64 x depth, rounded to the head dim)", stage="pretrain",
                         positive=True, tag="d")
    aspect_ratio: int = setting(64, "d_model per layer", stage="pretrain", positive=True, tag="a")
    head_dim: int = setting(128, "attention head size", stage="pretrain", positive=True, tag="h")
    window_pattern: str = setting("SSSL", "sliding windows tiled over layers (S: a quarter context, L: full)",
                                  stage="pretrain", tag="w")
    seq_len: int = setting(2048, "context length", stage="pretrain", positive=True, tag="s")
    vocab_size: int = setting(32768, "tokenizer vocabulary size", stage="tokenizer", positive=True, tag="v")
    # pretraining
    device_batch_size: int = setting(16, "rows per rank per micro-step (fewer where the ranks overfill the batch)",
                                     operational=True, positive=True)
    total_batch_size: int = setting(-1, "tokens per optimizer step; -1: nanochat's rule from the horizon",
                                    stage="pretrain")
    num_iterations: int = setting(-1, "pretraining steps; -1: from --target-param-data-ratio", stage="pretrain")
    target_param_data_ratio: float = setting(12.0, "training tokens per scaling parameter", stage="pretrain",
                                             positive=True)
    # pretraining's optimizer: nanochat's base_train hyperparameters. The LRs are the base of every
    # training stage's (fine-tuning and RL take a fraction of them); pretraining scales them with its batch.
    embedding_lr: float = setting(EMBEDDING_LR, "AdamW LR of the token embedding (the value embeddings: half of it), "
                                       "x (d_model / 768)^-0.5", stage="pretrain")
    unembedding_lr: float = setting(UNEMBEDDING_LR, "AdamW LR of lm_head, x (d_model / 768)^-0.5", stage="pretrain")
    matrix_lr: float = setting(MUON_DEFAULTS["lr"], "Muon LR of the transformer's matrices", stage="pretrain")
    scalar_lr: float = setting(SCALAR_LR, "AdamW LR of the per-layer x0 scalars (the residual scalars: 0.01 of it)",
                               stage="pretrain")
    weight_decay: float = setting(WEIGHT_DECAY, "Muon's cautious weight decay at nanochat's reference batch and horizon "
                                        "(pretraining scales it to its own, cosine-decayed to 0; mid-training and "
                                        "SFT use none, RL this)", stage="pretrain")
    warmup_steps: int = setting(WARMUP_STEPS, "pretraining's linear LR warmup, in steps", stage="pretrain")
    warmdown_ratio: float = setting(WARMDOWN_RATIO, "fraction of pretraining's steps, at its end, over which the LRs decay "
                                          "linearly (and Muon's momentum 0.97 -> 0.90)", stage="pretrain")
    final_lr_frac: float = setting(FINAL_LR_FRAC, "pretraining's last LRs, as a fraction of the initial ones",
                                   stage="pretrain")
    eval_every: int = setting(250, "val bpb every this many steps (<= 0: only at the end)", operational=True)
    eval_tokens: int = setting(80 * 524288, "tokens of each val bpb evaluation", operational=True, positive=True)
    core_every: int = setting(-1, "CORE during pretraining every this many steps (a multiple of --eval-every; "
                                  "with --eval-every <= 0 at the end only) and at the end; <= 0: off",
                              operational=True)
    core_examples: int = setting(500, "examples per CORE task during pretraining", operational=True, positive=True)
    save_every: int = setting(-1, "steps between checkpoints (<= 0: by --save-minutes and at the end)",
                              operational=True)
    save_minutes: float = setting(30.0, "also checkpoint once this much wall clock passed since the last (<= 0: off)",
                                  operational=True)
    keep_checkpoints: int = setting(2, "newest complete checkpoints kept per stage (<= 0: all)", operational=True)
    log_every: int = setting(10, "log a training line every this many steps", operational=True)
    sample_tokens: int = setting(32, "tokens of each sample printed after pretraining", operational=True)
    dtype: str | None = setting(None, "compute dtype (default: bf16 on GPU, fp32 on CPU)", tuple(DTYPES),
                                stage="pretrain")
    linear_precision: str | None = setting(
        None, "GEMM precision of the linears in pretraining: fp8 | fp16 | bf16 | fp32 (attention and MLP), or "
              "per class, e.g. attn=fp8,mlp=fp8,lm_head=bf16; fp8 layers run in the compute dtype for "
              "evaluation and inference", stage="pretrain")
    fp8_recipe: str = setting("tensorwise", "fp8 dynamic scaling", ("tensorwise", "rowwise"), stage="pretrain")
    compile: bool = setting(True, "torch.compile the training step (pretraining, mid-training, SFT)",
                            operational=True)
    kernel_backend: str | None = setting(None, KERNEL_BACKEND_HELP, BACKENDS, operational=True)
    dispatch_as: str | None = setting(None, "on CPU, run each kernel-backed op on the backend a GPU of this class "
                                            "(e.g. gpu-H100) picks (nanofast.dispatch), the kernels through Triton's "
                                            "interpreter and the CUDA emulation: rehearses a GPU run's choices; "
                                            "--kernel-backend wins over it", operational=True)
    seed: int = setting(42, "seed of the model's init, the data order and the samples", stage="pretrain")
    wandb: str | None = setting(None, "Weights & Biases project: log every stage's steps, evaluations and report "
                                      "numbers there (rank 0; needs `pip install wandb`; WANDB_MODE=offline logs "
                                      "locally); default: off", operational=True)
    # several ranks: collectives (gradients, losses) time out after dist_timeout_minutes; a rank
    # waiting for another's own work (the tokenizer, samples, evaluations) waits on disk
    dist_timeout_minutes: float = setting(30.0, "several ranks: the collective timeout", operational=True,
                                          positive=True)
    wait_minutes: float = setting(360.0, "several ranks: how long a rank waits for the others at a stage's end",
                                  operational=True, positive=True)
    # mid-training and SFT (the same loop; conversations packed whole, loss on assistant tokens)
    download_tasks: bool = setting(False, "fetch the real task datasets (SmolTalk, MMLU, ARC, GSM8K, HumanEval, "
                                          "CORE); else what is cached, or generated offline data", stage="midtrain")
    task_size: int | None = setting(None, "cap on examples per task (default: each task's full split)",
                                    stage="midtrain", positive=True)
    midtrain_iterations: int = setting(-1, "mid-training steps; -1: one epoch of the mixture", stage="midtrain")
    sft_iterations: int = setting(-1, "SFT steps; -1: one epoch of the mixture", stage="sft")
    post_training: str = setting("nanofast", "what follows pretraining: 'nanochat' is runs/speedrun.sh's SFT from the "
                                             "base model on SmolTalk + 3x MMLU + 4x GSM8K; 'nanofast' adds mid-training "
                                             "before SFT, ARC, identity, SpellingBee and arithmetic to SFT's mixture, "
                                             "and RL after it", ("nanochat", "nanofast"), stage="sft")
    finetune_lr_scale: float = setting(0.5, "fine-tuning LRs relative to the base LRs (before pretraining's "
                                            "batch scaling)", stage="midtrain", positive=True)
    # RL (GRPO on GSM8K-style problems)
    rl_steps: int = setting(50, "GRPO steps", stage="rl", positive=True)
    rl_questions: int = setting(16, "questions per RL step (all ranks together)", stage="rl", positive=True)
    rl_samples: int = setting(16, "answers per question (the GRPO group)", stage="rl", positive=True)
    rl_max_tokens: int = setting(256, "longest sampled answer", stage="rl", positive=True)
    rl_lr_scale: float = setting(0.05, "RL learning rates relative to the base LRs", stage="rl", positive=True)
    rl_eval_examples: int = setting(500, "held-out questions answered before and after RL (greedy and sampled)",
                                    stage="rl", positive=True)
    rl_dtype: str | None = setting(None, "RL compute dtype (default: --dtype); fp16 trains with loss scaling and "
                                         "removes most of the sampler/trainer mismatch bf16 rounding causes",
                                   tuple(DTYPES), stage="rl")
    # evaluation
    eval_examples: int = setting(500, "examples per evaluation task (-1: all)", stage="eval")
    eval_max_tokens: int = setting(256, "longest generated answer in the chat evaluations", stage="eval",
                                   positive=True)


# Every setting's default (the run name's reference: a setting that differs from it names the run).
DEFAULTS = Settings()


PRESETS: dict[str, Settings] = {
    # The whole pipeline in a couple of minutes on 2 CPU cores: what the tests run.
    "smoke": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=1024, tokenizer_chars=2_000_000,
                      depth=2, head_dim=64, window_pattern="SL", seq_len=128, device_batch_size=4,
                      total_batch_size=512, num_iterations=30, eval_every=15, eval_tokens=4096,
                      log_every=10, sample_tokens=16, compile=False, task_size=200, midtrain_iterations=10,
                      sft_iterations=10, rl_steps=3, rl_questions=4, rl_samples=4, rl_max_tokens=24,
                      rl_eval_examples=12, eval_examples=12, eval_max_tokens=24),
    # The main job (README, docs/cpu-performance.md): a tiny model on the embedded corpus, every
    # stage, on 2 cores. Compiled: torch.compile's step beats eager at this size once its ~30 s of
    # compiling is paid back, early in pretraining (bench/vs_nanochat.py measures the step).
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
    # auto batch size (2^20 tokens) and horizon (5,568 steps), every evaluation example.
    # docs/speedrun.md lists each setting beside nanochat's. Post-training is nanochat's too: SFT
    # from the base model, no mid-training or RL.
    # Fine-tuning runs at pretraining's batch-scaled LRs (x sqrt(2^20 / 2^19)): nanochat's SFT asks
    # for x 0.8 but then loads pretraining's optimizer state, whose saved initial_lr replaces it.
    "speedrun": Settings(data="climbmix", corpus_shards=170, depth=24, seq_len=2048, device_batch_size=16,
                         target_param_data_ratio=8.0, linear_precision="attn=fp8,mlp=fp8,lm_head=fp8",
                         core_every=2000, post_training="nanochat", finetune_lr_scale=2 ** 0.5, download_tasks=True,
                         eval_examples=-1, eval_max_tokens=512),
}


# ---- the settings of each kind, from the fields' own declarations (`setting`) --------------------
def _names(key: str, value) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Settings) if f.metadata[key] == value)


def stage_settings(stage: str) -> tuple[str, ...]:
    """The settings `stage`'s own result depends on (not counting the earlier stages'), in field order."""
    return _names("stage", stage)


def operational_settings() -> tuple[str, ...]:
    """The settings that change how a run goes, not what it computes: no stage is stale for them."""
    return _names("operational", True)


def positive_settings() -> tuple[str, ...]:
    """Sizes and counts that have no meaning at 0 or below (the -1 = "automatic" ones are not here)."""
    return _names("positive", True)


def model_tags() -> tuple[tuple[str, str], ...]:
    """(name, tag) of each architecture setting, in field order: the parts of the default run name."""
    return tuple((f.name, f.metadata["tag"]) for f in fields(Settings) if f.metadata["tag"])


def make_settings(preset: str, **overrides) -> Settings:
    """The preset's settings with every non-None override applied; unknown names raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}")
    settings = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    for name in positive_settings():
        value = getattr(settings, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    parse_linear_precision(settings.linear_precision)  # a bad spec fails here, before any work
    for f in fields(Settings):
        choices, value = f.metadata["choices"], getattr(settings, f.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    if settings.core_every > 0 and settings.eval_every > 0 and settings.core_every % settings.eval_every:
        raise ValueError(f"core_every {settings.core_every} must be a multiple of eval_every {settings.eval_every} "
                         f"(CORE runs at evaluation steps; with eval_every <= 0 only at the end)")
    return settings


def default_run_name(s: Settings) -> str:
    """`d<depth>`, plus each other architecture setting that differs from Settings()'s default, e.g.
    the speedrun's "d24" and the smoke preset's "d2-h64-wSL-s128-v1024". The other settings a stage
    depends on do not name the directory: a changed one is refused there, by name (`changed_settings`)."""
    return "-".join(f"{tag}{getattr(s, name)}" for name, tag in model_tags()
                    if name == "depth" or getattr(s, name) != getattr(DEFAULTS, name))


def check_run_name(name: str) -> str:
    """A run name is one path component of letters, digits, '.', '_' or '-' (it names a folder)."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        raise ValueError(f"--run-name {name!r}: expected letters, digits, '.', '_' or '-', not starting with '.'")
    return name


def changed_settings(recorded: dict, current: Settings, stage: str) -> dict[str, tuple]:
    """{name: (recorded value, current value)} for the settings `stage`'s result depends on (its own
    and every earlier stage's) that differ between `recorded` (asdict of the settings it ran with)
    and `current`. Stages without settings of their own (report) depend on all. A setting the
    record does not name (one added since it was written) is not compared."""
    order = SETTING_STAGES
    upstream = order[:order.index(stage) + 1] if stage in order else order
    now = asdict(current)
    return {n: (recorded[n], now[n]) for s in upstream for n in stage_settings(s)
            if n in recorded and recorded[n] != now[n]}
