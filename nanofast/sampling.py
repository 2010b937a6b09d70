"""Batched token sampling with a counter-based random stream per row (the engine's sampler).

Every row of a step is sampled at once on the logits' device: penalties, temperature, top-k,
top-p and the draw itself are tensor ops over the (S, V) logits, with no per-row Python loop and
no torch.Generator. A row's randomness is a pure function of (its seed, its draw index): one
uniform u = hash(seed, draw) per row, then inverse-CDF sampling (the first token whose cumulative
probability exceeds u). So
- a request's tokens do not depend on what else is in the batch, on the batch's order, or on
  preemption (a recomputed sequence draws the same numbers again);
- two requests with the same seed and prompt give the same text; different seeds (the engine's
  `sample_seed` for OpenAI's n, RL's per-sample seeds) give independent streams;
- nothing holds generator state, so the step has no host-side RNG work and can be captured.

The hash is Wellons' "lowbias32" 32-bit integer mixer, applied to the seed's two 32-bit halves and
the draw index; its arithmetic is done in int64 tensors on values below 2^32, with each 32-bit
product split in 16-bit halves so nothing overflows int64 (signed overflow has no defined result in
the C++ torch runs). The uniform has 24 random bits, fp32's significand: a token whose probability
is below 2^-24 of its row's mass is never drawn, as with any fp32 sampler.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): two products below 2^48 instead of one that
    could pass 2^63."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32: a bijective 32-bit mixer (each input bit flips each output bit with probability
    close to 1/2). x: int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: Tensor, draws: Tensor) -> Tensor:
    """One uniform in (0, 1) per row, fp32: a function of (seed mod 2^64, draw) only.

    seeds: (S, 2) int64, each seed's [low, high] 32 bits (`seed_halves`: int64 cannot hold seeds
    in [2^63, 2^64), which SamplingParams allows); draws: (S,) int64 >= 0, the row's draw index.
    """
    lo, hi = seeds[:, 0], seeds[:, 1]
    key = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    bits = _mix32(key ^ _mix32((draws & _M32) ^ 0x85EBCA6B))
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def split_seed(seed: int) -> tuple[int, int]:
    """(low 32 bits, high 32 bits) of a seed taken mod 2^64 (negative seeds included, as
    torch.Generator takes them)."""
    seed %= 2 ** 64
    return seed & _M32, seed >> 32


def seed_halves(seeds: list[int], device: torch.device | str) -> Tensor:
    """(S, 2) int64 [low, high] 32 bits of each seed (`split_seed`), for `uniforms` and `sample`."""
    return torch.tensor([split_seed(s) for s in seeds], dtype=torch.int64, device=device).reshape(len(seeds), 2)


def top_k_limit(top_k: int | None, vocab_size: int) -> int:
    """A request's top_k as `sample` takes it: 0 for no limit, which a limit >= the vocabulary is too."""
    return top_k if top_k and top_k < vocab_size else 0


def ranking(top_ks: list[int], top_ps: list[float]) -> tuple[bool, int | None]:
    """`sample`'s (filtered, candidates) for rows drawn with these limits (top_ks as `top_k_limit`
    gives them): rank only when some row has a limit, and then over the largest top_k when every row
    has one (a partial top-k instead of a full sort of the vocabulary)."""
    filtered = any(top_ks) or any(p < 1.0 for p in top_ps)
    return filtered, (max(top_ks) if filtered and all(top_ks) else None)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, draws: Tensor,
           filtered: bool = True, candidates: int | None = None, greedy_rows: bool = True) -> Tensor:
    """Sample one token per row.

    logits: (S, V) float, penalties already applied. temperature: (S,) fp32, 0 = greedy (argmax of
    the logits). top_k: (S,) int64, 0 = no limit: keep the k most likely tokens. top_p: (S,) fp32
    in (0, 1]: keep the smallest set of most likely tokens (after top-k) whose mass reaches top_p
    (a token is dropped once the mass before it reaches top_p; the first always stays). seeds:
    (S, 2) int64 (`seed_halves`); draws: (S,) int64. filtered=False skips the ranking when no row
    has a top-k or top-p limit. candidates: how many of each row's most likely tokens can survive
    the limits (the largest top_k when every row has one: a partial top-k instead of a full sort
    of V), None for V. greedy_rows=False: no row's token is used where temperature is 0 (none is
    greedy, or those rows are padding), so their argmax is skipped. Returns (S,) int64 token ids.
    """
    S, V = logits.shape
    greedy = temperature == 0
    x = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    probs = torch.softmax(x, dim=-1)
    if filtered:
        # Both limits are rank conditions on each row's sorted distribution: one ranking serves both.
        vals, order = torch.topk(x, min(candidates or V, V), dim=-1)
        rank = torch.arange(vals.size(1), device=x.device)[None, :]
        keep = rank < torch.where(top_k > 0, top_k, V)[:, None]
        ranked = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= (ranked.cumsum(-1) - ranked) < top_p[:, None]
        # The draw itself stays in vocabulary order (the kept set scattered back), so a row's token
        # does not depend on whether its batch neighbours made this branch run.
        probs = probs * torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep)
    cdf = probs.cumsum(-1)
    u = uniforms(seeds, draws) * cdf[:, -1]
    token = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    # fp32 rounding can put u at the very top of the cdf: take the last token that has mass then
    last = torch.where(probs > 0, torch.arange(V, dtype=torch.int32, device=x.device), -1).amax(dim=-1)
    token = torch.minimum(token, last)
    return torch.where(greedy, logits.argmax(dim=-1), token) if greedy_rows else token
