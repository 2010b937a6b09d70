"""The engine's batched sampler (nanofast/sampling.py): the draws follow the distribution, top-k /
top-p / temperature / greedy mean what SamplingParams says, and a row's token is a function of its
logits, settings, seed and draw index alone (not of the batch around it, nor of preemption).

Every statistical check below is deterministic: the seeds are fixed and the stream is integer
arithmetic, so a bound either holds on every machine or on none; the bounds are 6 standard errors
wide so fp32 rounding differences between CPUs cannot move a frequency across them."""
from __future__ import annotations

import math

import pytest
import torch

from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT, GPTConfig
from nanofast.sampling import sample, seed_halves, split_seed, uniforms


def _draw(logits: torch.Tensor, seeds: list[int], draws: list[int], temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0) -> torch.Tensor:
    S = len(seeds)
    if logits.dim() == 1:
        logits = logits.expand(S, -1)
    return sample(logits, torch.full((S,), temperature), torch.full((S,), top_k, dtype=torch.int64),
                  torch.full((S,), top_p), seed_halves(seeds, "cpu"), torch.tensor(draws, dtype=torch.int64),
                  filtered=bool(top_k) or top_p < 1.0)


def _within(freq: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    err = 6 * (probs * (1 - probs) / n).sqrt() + 1.0 / n
    assert ((freq - probs).abs() <= err).all(), (freq, probs)


LOGITS = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -3.0, 1.5])
N = 20000


def test_uniforms_are_uniform_and_depend_on_seed_and_draw():
    u = uniforms(seed_halves(list(range(N)), "cpu"), torch.zeros(N, dtype=torch.int64))
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    hist = torch.histc(u, bins=10, min=0, max=1) / N
    _within(hist, torch.full((10,), 0.1), N)
    v = uniforms(seed_halves([7] * N, "cpu"), torch.arange(N))  # one seed's stream along its draws
    _within(torch.histc(v, bins=10, min=0, max=1) / N, torch.full((10,), 0.1), N)
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 6 / math.sqrt(N)
    pairs = torch.stack([v[:-1], v[1:]])  # consecutive draws of one stream are uncorrelated
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 6 / math.sqrt(N)


def test_draws_follow_the_softmax_across_seeds_and_along_one_stream():
    probs = torch.softmax(LOGITS, -1)
    across = _draw(LOGITS, list(range(N)), [0] * N)
    _within(torch.bincount(across, minlength=7) / N, probs, N)
    along = _draw(LOGITS, [12345] * N, list(range(N)))
    _within(torch.bincount(along, minlength=7) / N, probs, N)
    hot = _draw(LOGITS, list(range(N)), [3] * N, temperature=2.0)  # temperature scales the logits
    _within(torch.bincount(hot, minlength=7) / N, torch.softmax(LOGITS / 2.0, -1), N)


def test_top_k_top_p_and_greedy():
    order = torch.argsort(LOGITS, descending=True)
    probs = torch.softmax(LOGITS, -1)
    k3 = _draw(LOGITS, list(range(N)), [0] * N, top_k=3)
    kept = probs[order[:3]] / probs[order[:3]].sum()
    freq = torch.bincount(k3, minlength=7) / N
    assert set(k3.tolist()) == set(order[:3].tolist())
    _within(freq[order[:3]], kept, N)
    # nucleus 0.6: the two most likely tokens (mass before the third >= 0.6 drops it)
    sorted_p = probs[order]
    n_keep = int(((sorted_p.cumsum(0) - sorted_p) < 0.6).sum())
    p06 = _draw(LOGITS, list(range(N)), [0] * N, top_p=0.6)
    assert set(p06.tolist()) == set(order[:n_keep].tolist())
    both = _draw(LOGITS, list(range(N)), [0] * N, top_k=1, top_p=0.9)
    assert set(both.tolist()) == {int(order[0])}
    greedy = _draw(torch.randn(5, 11, generator=torch.Generator().manual_seed(0)), [1, 2, 3, 4, 5], [0] * 5,
                   temperature=0.0)
    assert torch.equal(greedy, torch.randn(5, 11, generator=torch.Generator().manual_seed(0)).argmax(-1))


def test_a_uniform_at_the_top_of_the_cdf_takes_the_last_token_with_mass(monkeypatch):
    """fp32 rounding can put u * total at the cdf's very top, past every token: the draw then takes
    the row's last token (in vocabulary order) that has probability, never a filtered or
    underflowed one."""
    import nanofast.sampling as sampling

    monkeypatch.setattr(sampling, "uniforms", lambda seeds, draws: torch.ones(seeds.size(0)))
    assert _draw(LOGITS, [0], [0], top_k=2).tolist() == [6]  # kept: 0 (2.0) and 6 (1.5)
    # at temperature 0.01 every token but index 1 underflows to probability 0
    assert _draw(torch.tensor([0.0, 5.0, -100.0, -100.0]), [0], [0], temperature=0.01).tolist() == [1]


def test_greedy_rows_false_skips_the_argmax_and_changes_nothing_else():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 3
    t = torch.tensor([1.0, 0.0, 0.7, 1.0])
    args = (torch.zeros(4, dtype=torch.int64), torch.ones(4), seed_halves([3, 4, 5, 6], "cpu"), torch.arange(4))
    both, hot_only = sample(logits, t, *args, filtered=False), sample(logits, t, *args, filtered=False, greedy_rows=False)
    assert both[1] == logits[1].argmax()
    keep = torch.tensor([True, False, True, True])
    assert torch.equal(both[keep], hot_only[keep])
    # the temperature-0 row was drawn as at temperature 1: its token is unused when no row is greedy
    assert hot_only[1] == sample(logits, torch.ones(4), *args, filtered=False)[1]


def test_a_rows_token_does_not_depend_on_the_batch_around_it():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 50, generator=g) * 2
    seeds, draws = [11, -1, 2 ** 64 - 1, 2 ** 63, 5, 5, 0, 7, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8]
    s = len(seeds)
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.0, 1.0, 1.0, 2.0, 1.0, 0.5])
    top_k = torch.tensor([0, 5, 0, 0, 3, 0, 0, 49, 1])
    top_p = torch.tensor([1.0, 1.0, 0.8, 1.0, 1.0, 0.5, 1.0, 0.95, 1.0])
    batch = sample(logits, temperature, top_k, top_p, seed_halves(seeds, "cpu"), torch.tensor(draws))
    perm = torch.randperm(s, generator=g)
    shuffled = sample(logits[perm], temperature[perm], top_k[perm], top_p[perm],
                      seed_halves([seeds[i] for i in perm], "cpu"), torch.tensor(draws)[perm])
    assert torch.equal(shuffled, batch[perm])
    for i in range(s):
        alone = sample(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                       seed_halves([seeds[i]], "cpu"), torch.tensor(draws[i:i + 1]))
        assert alone.item() == batch[i].item(), i
    assert split_seed(-1) == split_seed(2 ** 64 - 1) == (2 ** 32 - 1, 2 ** 32 - 1)
    # the engine ranks only the largest top_k's candidates when every row has a top_k: same tokens
    limited = top_k.clamp(min=1)
    args = (logits, temperature, limited, top_p, seed_halves(seeds, "cpu"), torch.tensor(draws))
    assert torch.equal(sample(*args, candidates=int(limited.max())), sample(*args))


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model.eval()


def test_sampled_tokens_survive_preemption_and_any_batching():
    """The same seeded requests through a roomy engine and through one whose pool forces
    preemption (recomputed sequences draw the same numbers again) and chunked prefills."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (9, 17, 5, 12, 21, 3)]
    params = [SamplingParams(max_tokens=14, temperature=1.2, top_k=20, top_p=0.9, seed=100 + i) for i in range(6)]

    def run(engine):
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        out = {i: [] for i in ids}
        while engine.has_unfinished():
            for ev in engine.step():
                out[ev.request_id].append(ev.token)
        return [out[i] for i in ids]

    roomy = run(Engine(model, tools=False))
    tight = Engine(model, page_size=4, num_pages=12, max_num_seqs=6, max_batch_tokens=7, tools=False)
    assert run(tight) == roomy and tight.stats["preemptions"] > 0
    assert len({tuple(t) for t in roomy}) == 6


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(temperature=-1.0)])
def test_sampling_params_refuse_what_the_sampler_cannot_mean(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
