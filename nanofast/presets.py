"""Run settings: three named presets, and command-line overrides of any field."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace


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
    save_every: int = -1
    log_every: int = 10
    sample_tokens: int = 32
    dtype: str | None = None          # None = bf16 on GPU, fp32 on CPU
    compile: bool = True
    seed: int = 42


PRESETS: dict[str, Settings] = {
    # The whole pipeline in a couple of minutes on 2 CPU cores: what the tests run.
    "smoke": Settings(corpus_shards=4, corpus_chars=3_000_000, vocab_size=1024, tokenizer_chars=2_000_000,
                      depth=2, head_dim=64, window_pattern="SL", seq_len=128, device_batch_size=4,
                      total_batch_size=512, num_iterations=30, eval_every=15, eval_tokens=4096,
                      log_every=10, sample_tokens=16, compile=False),
    # The README's main job: a tiny model on the embedded corpus in about 10-15 minutes on 2 cores.
    "cpu": Settings(corpus_shards=8, vocab_size=8192, tokenizer_chars=50_000_000, depth=4, head_dim=64,
                    window_pattern="SSSL", seq_len=512, device_batch_size=8, total_batch_size=4096,
                    num_iterations=300, eval_every=100, eval_tokens=64 * 1024, log_every=20, compile=False),
    # nanochat's depth-24 speedrun on 8xH100 (ClimbMix, auto batch size and horizon).
    "speedrun": Settings(data="climbmix", corpus_shards=370, depth=24, seq_len=2048, device_batch_size=16),
}


def make_settings(preset: str, **overrides) -> Settings:
    """The preset's settings with every non-None override applied; unknown names raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}")
    settings = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    if settings.data not in ("default", "climbmix"):
        raise ValueError(f"unknown data {settings.data!r}: choose 'default' (embedded corpus) or 'climbmix'")
    return settings
