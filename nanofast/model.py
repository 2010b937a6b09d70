"""A minimal GPT with nanochat's architecture, so nanochat checkpoints load and give the same logits.

Rotary (theta 100k, half-split), QK-norm with a 1.2 scale, parameter-free RMSNorm, ReLU^2 MLP, no
biases, untied head, vocab padded to 64, logit softcap 15, value embeddings with gates on
alternating layers, sliding-window pattern, GQA, x0/resid lambdas, smear and backout.
Every heavy op goes through `nanofast.ops`, where kernels plug in.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from nanofast import ops
from nanofast.optim import MUON_DEFAULTS
from nanofast.attention import packed_step, paged_step_attention, takes_packed_path
from nanofast.prefix_tree import PrefixTree

# nanochat's base_train optimizer hyperparameters: AdamW LRs of the embeddings, lm_head and
# scalars (the matrices' Muon LR is the optimizer's default) and Muon's weight decay.
EMBEDDING_LR, UNEMBEDDING_LR, SCALAR_LR, WEIGHT_DECAY = 0.3, 0.008, 0.5, 0.28

VOCAB_PAD = 64  # pad the vocab so the lm_head GEMM has tensor-core friendly N
SMEAR_CHANNELS = 24
VE_GATE_CHANNELS = 12
QK_SCALE = 1.2
SOFTCAP = 15.0


@dataclass
class GPTConfig:
    """The architecture, with nanochat's `model_config` field names (saved in checkpoint metadata)."""
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        checks = [
            (self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}"),
            (self.sequence_len >= 1, f"sequence_len must be >= 1, got {self.sequence_len}"),
            (self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}"),
            (self.n_head >= 1 and self.n_kv_head >= 1, f"n_head ({self.n_head}) and n_kv_head ({self.n_kv_head}) must be >= 1"),
            (self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}"),
            (self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head} (GQA groups must be whole)"),
            (self.n_embd // self.n_head % 2 == 0, f"head_dim {self.n_embd // self.n_head} must be even for rotary"),
            (self.n_embd >= SMEAR_CHANNELS, f"n_embd {self.n_embd} must be >= {SMEAR_CHANNELS} (the smear gate reads that many channels)"),
            (bool(self.window_pattern) and set(self.window_pattern.upper()) <= {"S", "L"},
             f"window_pattern {self.window_pattern!r} must be a non-empty string of S and L"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"impossible model shape: {message}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    def to_dict(self) -> dict:
        return asdict(self)


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64,
                     head_dim: int = 128, n_kv_head: int | None = None, window_pattern: str = "SSSL") -> GPTConfig:
    """nanochat's one dial: d_model = ceil(depth * aspect_ratio / head_dim) * head_dim, heads of head_dim.

    n_kv_head defaults to n_head (no GQA). Impossible combinations raise ValueError naming the problem.
    """
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"impossible model shape: depth ({depth}), aspect_ratio ({aspect_ratio}) and head_dim ({head_dim}) must be >= 1")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=n_embd, window_pattern=window_pattern)


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, always including the last."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config: GPTConfig) -> list[int]:
    """Left attention window per layer: the pattern tiled over layers, the last layer always long.

    S = T/4 rounded up to a multiple of 128 (flash-attn's tile), L = T.
    """
    long = config.sequence_len
    short = -(-long // 4 // 128) * 128
    pattern = config.window_pattern.upper()
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


LINEAR_PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
LINEAR_CLASSES = ("attn", "mlp", "lm_head")


class WeightCache:
    """A copy derived from some weights (cast to a dtype, stacked), rebuilt when one of them
    changes: another tensor, an in-place update (an optimizer step, load_state_dict: both bump the
    version counter) or new storage (model.to() swaps a parameter's data without a new object or a
    version bump), or another dtype asked for. The key holds the weight tensors themselves,
    compared by identity, so a freed weight's address can never be mistaken for a new one."""

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, weights: tuple[torch.Tensor, ...], dtype: torch.dtype,
            build: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (dtype, *((w._version, w.data_ptr(), w.device) for w in weights))
        entry = self._entry
        if entry is None or entry[1] != key or any(a is not b for a, b in zip(entry[0], weights)):
            with torch.no_grad():
                entry = self._entry = (weights, key, build())
        return entry[2]


class Linear(nn.Linear):
    """Bias-free linear over an fp32 master weight (out, in), computed in the activation's dtype
    unless `precision` says otherwise (see ops.linear). fp8 applies in training only: in eval mode
    (evaluation, the inference engine) an fp8 layer runs in the activation dtype, as nanochat swaps
    its fp8 layers back to bf16 for inference.

    In eval mode without autograd (evaluation, the engine's steps) the weight cast to the
    activation's dtype is kept (`WeightCache`) instead of redone every call: every decode step
    would otherwise re-read each fp32 master and write its 16-bit copy. The copy costs half the
    fp32 weight's memory in bf16; going back to training mode drops it, so training never carries
    it (RL rebuilds it once per rollout phase)."""

    # How many times any Linear dropped its cached casts (train()): a captured CUDA graph reads the
    # cast copies it was captured with, so nanofast.decode_graph re-captures when this moves.
    casts_dropped = 0

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.precision: str | None = None
        self.recipe = "tensorwise"
        self._cast = WeightCache()

    @property
    def active_precision(self) -> str | None:
        return None if (self.precision == "fp8" and not self.training) else self.precision

    def train(self, mode: bool = True) -> Linear:
        if mode:
            self._cast = WeightCache()
            Linear.casts_dropped += 1
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        precision, w = self.active_precision, self.weight
        if (precision is None and not self.training and w.dtype != x.dtype and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):  # a compiled graph casts inside itself
            w = self._cast.get((w,), x.dtype, lambda: self.weight.detach().to(x.dtype))
        return ops.linear(x, w, precision, self.recipe)


def parse_linear_precision(text: str | None) -> dict[str, str]:
    """"fp8" (attention and MLP linears in fp8; lm_head stays in the compute dtype, where logit
    precision matters most), "fp16"/"bf16"/"fp32" (same, that dtype), or per class:
    "attn=fp8,mlp=fp8,lm_head=bf16". None or "" -> {} (every GEMM in the compute dtype)."""
    if not text:
        return {}
    if "=" not in text:
        if text not in LINEAR_PRECISIONS:
            raise ValueError(f"linear precision must be one of {LINEAR_PRECISIONS} or 'class=precision,...', got {text!r}")
        return {"attn": text, "mlp": text}
    spec = {}
    for part in text.split(","):
        cls, _, prec = part.partition("=")
        if cls.strip() not in LINEAR_CLASSES or prec.strip() not in LINEAR_PRECISIONS:
            raise ValueError(f"bad linear precision item {part!r}: expected class=precision with class in "
                             f"{LINEAR_CLASSES} and precision in {LINEAR_PRECISIONS}")
        spec[cls.strip()] = prec.strip()
    return spec


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head) if has_value_embed(layer, config.n_layer) else None
        self._qkv_cache = WeightCache()  # packed_qkv_weight

    def packed_qkv_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """c_q, c_k, c_v's weights stacked, ((Hq + 2 Hkv) D, n_embd) in `dtype`, for the engine's one
        qkv GEMM. Cached; rebuilt when a weight changes or the dtype asked for changes
        (`WeightCache`). Costs one more copy of the attention input weights in memory."""
        ws = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        return self._qkv_cache.get(ws, dtype, lambda: torch.cat([w.detach() for w in ws]).to(dtype))

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                window: int, kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        tree = isinstance(kv, PrefixTree)
        if kv is not None and not tree and takes_packed_path(kv, x):
            return packed_step(self, x, ve, window, kv, qk_scale=QK_SCALE, gate_channels=VE_GATE_CHANNELS)
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual, gated per KV head from the first channels; range (0, 3).
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = ops.qk_norm_rope(q, k, cos, sin, scale=QK_SCALE)
        if kv is None:
            y = ops.attention(q, k, v, window)
        elif tree:
            y = kv.attention(q, k, v, window)
        else:
            y = paged_step_attention(kv, self.layer, q, k, v, window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv=None):
        # x = x + attn(norm(x)); x + mlp(norm(x)), with the second residual add fused into the norm
        # that follows it (one kernel pass on a kernel backend; the plain add + F.rms_norm on torch).
        # Exact: h = attn_out + x is the same IEEE add either way. The adds outside the block are
        # not fused: resid_lambdas * x + x0_lambdas * x0 (GPT.forward) is a scaled combination,
        # not an add a norm kernel takes, and the backout subtraction's result feeds the head's
        # norm only after the engine's row selection.
        y, x = ops.norm(self.attn(ops.norm(x), ve, cos, sin, window, kv), residual=x)
        return x + self.mlp(y)


class GPT(nn.Module):
    """The GPT. State-dict keys match nanochat's, so its checkpoints load unchanged.

    `compute_dtype` is the activation dtype (bf16 on GPU, fp32 on CPU, fp16 selectable); parameters
    stay fp32 masters, except that embedding tables are stored in the compute dtype when it is bf16
    (they are only gathered, and the optimizer tolerates it), as nanochat does.
    """

    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.windows = window_sizes(config)
        V, C = config.padded_vocab_size, config.n_embd
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if has_value_embed(i, config.n_layer)})
        # 10x the training length so generation past it still has angles; not saved in checkpoints.
        cos, sin = ops.rotary_tables(config.sequence_len * 10, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def cos_sin_cache(self) -> torch.Tensor:
        """The rotary tables side by side, (max_position, head_dim) = [cos | sin] per position, in the
        compute dtype (the dtype the model's own forward casts cos/sin to): the cos_sin_cache of
        kernels.qk_norm_rope_inplace. Built once, rebuilt if the tables are replaced or moved."""
        cached = getattr(self, "_cos_sin", None)  # (cos, sin, dtype, table): tables compared by identity
        if cached is None or cached[0] is not self.cos or cached[1] is not self.sin or cached[2] != self.compute_dtype:
            table = torch.cat([self.cos, self.sin], dim=-1).to(self.compute_dtype).contiguous()
            cached = self._cos_sin = (self.cos, self.sin, self.compute_dtype, table)
        return cached[3]

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's initialisation: uniform blocks (bound sqrt(3/d)), zero output projections."""
        C, L = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3.0 / C)  # uniform bound with the std of N(0, 1/C): no outliers
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for i in range(L):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / max(L - 1, 1)
            self.x0_lambdas[i] = 0.20 - 0.15 * i / max(L - 1, 1)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        self.cos, self.sin = ops.rotary_tables(self.config.sequence_len * 10, self.config.head_dim, device=self.cos.device)
        self.cast_embeddings()

    def cast_embeddings(self) -> None:
        """Store embedding tables in bf16 when computing in bf16 (fp16 keeps fp32: GradScaler needs it)."""
        if self.compute_dtype == torch.bfloat16:
            self.transformer.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_reduction: str = "mean", kv=None) -> torch.Tensor:
        """idx: (B, T) int64 token ids. Returns the loss (targets (B, T), -1 = ignore) or
        fp32 softcapped logits (B, T, vocab_size).

        kv: a `nanofast.kv_cache.PagedBatch` for the inference engine: idx is then (1, N), the new
        tokens of several sequences flattened, each at its own position, attending to its pages of
        the KV cache; returns the logits (S, vocab_size) of kv.logits_rows only (of every row if None).
        Or a `nanofast.prefix_tree.PrefixTree`: idx (1, N) is sequences packed as prefix trees (each
        token at its position, after its parent, attending to its ancestors), differentiable; the
        head then takes kv.logits_rows only, with targets (M,) aligned to them.
        """
        B, T = idx.shape
        dtype = self.compute_dtype
        if kv is None:
            if T > self.cos.size(0):
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)} positions)")
            cos, sin = self.cos[:T].to(dtype), self.sin[:T].to(dtype)
        else:
            cos, sin = self.cos[kv.positions].to(dtype), self.sin[kv.positions].to(dtype)
        x = ops.norm(self.transformer.wte(idx).to(dtype))
        # Smear: a gated copy of the previous token's embedding, cheap bigram information.
        if kv is not None:
            # Each token's previous token comes with the batch (the engine's last token of the
            # previous step or chunk, the tree's parent): its normed embedding is one row gather.
            prev = ops.norm(self.transformer.wte(kv.prev_tokens[None]).to(dtype))
            gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + gate * prev * kv.has_prev[None, :, None].to(dtype)
        elif T > 1:
            gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        x_mid = None
        backout_layer = self.config.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv)
            if i == backout_layer:
                x_mid = x
        # Backout: remove the cached mid-depth residual (low-level features) before the head.
        x = x - self.backout_lambda.to(dtype) * x_mid
        if kv is not None:  # only the rows the engine samples from / the tree's trained tokens
            x = x[0] if kv.logits_rows is None else x[0, kv.logits_rows]
        x = ops.norm(x)
        head, V = self.lm_head, self.config.vocab_size
        if targets is None:
            return ops.softcap_logits(head(x)[..., :V], SOFTCAP)
        return ops.linear_softcap_cross_entropy(x, head.weight, targets, V, SOFTCAP, loss_reduction,
                                                head.active_precision, head.recipe)

    def linears(self) -> dict[str, list[Linear]]:
        """The GEMM layers by class. The value-embedding and smear gates (12 and 24 inputs) are
        left out: too small for any precision trade-off, and not fp8-aligned."""
        blocks = self.transformer.h
        return {"attn": [m for b in blocks for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj)],
                "mlp": [m for b in blocks for m in (b.mlp.c_fc, b.mlp.c_proj)], "lm_head": [self.lm_head]}

    def set_linear_precision(self, spec: dict[str, str], recipe: str = "tensorwise") -> None:
        """Per layer class ("attn", "mlp", "lm_head") GEMM precision; classes not named compute in
        the activation dtype. See parse_linear_precision."""
        unknown = set(spec) - set(LINEAR_CLASSES)
        if unknown or any(p not in LINEAR_PRECISIONS for p in spec.values()):
            raise ValueError(f"linear precision spec must map {LINEAR_CLASSES} to {LINEAR_PRECISIONS}, got {spec}")
        for cls, layers in self.linears().items():
            for layer in layers:
                layer.precision, layer.recipe = spec.get(cls), recipe

    # ---- accounting -------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts per group, as nanochat reports them (scaling laws use matrices + lm_head)."""
        count = lambda params: sum(p.numel() for p in params)
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": count(self.transformer.h.parameters()),
            "scalars": count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                              self.smear_lambda, self.backout_lambda]),
        }
        counts["total"] = sum(counts.values())
        return counts

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight, plus 12*H*D*window for attention per layer."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))
        T, H, D = self.config.sequence_len, self.config.n_head, self.config.head_dim
        attn = sum(12 * H * D * min(w, T) for w in self.windows)
        return 6 * matmul + attn

    # ---- optimizer groups ---------------------------------------------------------------------
    def param_groups(self, unembedding_lr: float = UNEMBEDDING_LR, embedding_lr: float = EMBEDDING_LR,
                     matrix_lr: float = MUON_DEFAULTS["lr"], scalar_lr: float = SCALAR_LR,
                     weight_decay: float = WEIGHT_DECAY, lr_scale: float = 1.0, lr_frac: float = 1.0) -> list[dict]:
        """nanochat's MuonAdamW groups (its base_train LRs by default; the run settings,
        nanofast.presets, take these defaults as theirs). AdamW LRs scale as (d_model/768)^-0.5;
        `lr_scale` is the batch-size correction, applied to every LR but the smear/backout group's
        (nanochat fixes that one at 0.2); `lr_frac` multiplies every LR (fine-tuning's fraction of
        pretraining's)."""
        dscale = (self.config.n_embd / 768) ** -0.5
        adam = dict(kind="adamw", eps=1e-10)
        matrices = list(self.transformer.h.parameters())
        groups = [
            dict(adam, params=[self.lm_head.weight], lr=unembedding_lr * dscale * lr_scale, betas=(0.8, 0.96), weight_decay=0.01),
            dict(adam, params=[self.transformer.wte.weight], lr=embedding_lr * dscale * lr_scale, betas=(0.8, 0.995), weight_decay=0.001),
            dict(adam, params=list(self.value_embeds.parameters()), lr=0.5 * embedding_lr * dscale * lr_scale, betas=(0.8, 0.995), weight_decay=0.01),
            dict(adam, params=[self.resid_lambdas], lr=0.01 * scalar_lr * lr_scale, betas=(0.8, 0.95), weight_decay=0.05),
            dict(adam, params=[self.x0_lambdas], lr=scalar_lr * lr_scale, betas=(0.96, 0.95), weight_decay=0.0),
            dict(adam, params=[self.smear_gate.weight, self.smear_lambda, self.backout_lambda], lr=0.2, betas=(0.8, 0.95), weight_decay=0.0),
        ]
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                               lr=matrix_lr * lr_scale, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["lr"] *= lr_frac
            g["initial_lr"] = g["lr"]
        return groups

    # ---- sampling (naive full recompute; the paged engine lives in its own module) -------------
    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 42):
        """Yield up to `max_tokens` new token ids after the prompt `tokens`, recomputing the whole
        sequence each step (the reference generation every faster engine is checked against)."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the BOS token)")
        device = self.cos.device
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.config.sequence_len:])[:, -1, :]
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=rng)
            ids = torch.cat([ids, nxt], dim=1)
            yield int(nxt.item())
