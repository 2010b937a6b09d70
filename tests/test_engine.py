"""The paged inference engine against plain full-recompute generation (CPU, fp32).

The contract: for greedy sampling, every request's tokens equal, token for token, what
`GPT.generate` produces for that prompt alone, whatever else the engine runs at the same time:
different prompt lengths, shared prefixes (prefix cache), prompts chunked under the token budget,
preemption forced by a pool too small for everybody, sliding windows, GQA. Then the block
manager's bookkeeping, sampling controls, stop/length/abort, the calculator tool, and errors.
"""
from __future__ import annotations

import pytest
import torch

from nanofast import attention, kernels, kv_cache, ops
from nanofast.engine import Engine, SamplingParams, sample_seed
from nanofast.kv_cache import BlockManager
from nanofast.model import GPT, config_for_depth
from nanofast.tools import calculate

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def _model(n_kv_head: int | None = None, windows: list[int] | None = None, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = config_for_depth(2, vocab_size=300, sequence_len=48, head_dim=16, n_kv_head=n_kv_head)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections: perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if windows is not None:
        model.windows = windows
    return model.eval()


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 300, (9,), generator=g).tolist()
    out = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 3, 4, 5, 17, 30)]
    out += [shared + torch.randint(0, 300, (n,), generator=g).tolist() for n in (0, 2, 8)]
    out.append(list(shared))  # an exact duplicate: fully cached but for its last token
    return out


def _reference(model: GPT, prompts, max_tokens: int) -> list[list[int]]:
    return [list(model.generate(p, max_tokens)) for p in prompts]


@pytest.mark.parametrize("n_kv_head,windows", [(None, None), (2, [5, 48]), (1, [0, 7])],
                         ids=["mha", "gqa-window5", "mqa-window0"])
def test_greedy_equals_full_recompute_under_pressure(n_kv_head, windows):
    model = _model(n_kv_head, windows)
    prompts = _prompts()
    # 10 pages of 4 slots for 10 requests of up to 40 tokens: preemption is unavoidable; a budget
    # of 7 tokens chunks every longer prompt.
    engine = Engine(model, page_size=4, num_pages=10, max_num_seqs=6, max_batch_tokens=7)
    got = engine.generate(prompts, GREEDY)
    assert got == _reference(model, prompts, GREEDY.max_tokens)
    assert engine.stats["preemptions"] > 0 and engine.blocks.hits > 0
    assert engine.blocks.available == engine.blocks.num_pages and not engine.has_unfinished()


@pytest.mark.parametrize("budget", [4096, 10])
def test_copies_of_a_prompt_compute_it_once(budget):
    """n requests of one prompt arriving together (OpenAI's n, RL's group): the first computes the
    prompt, the copies wait one step and take its full pages from the prefix cache, computing only
    the rest; another prompt is admitted past them. The tokens are each prompt's own. With a budget
    of 10 tokens the first copy's prompt takes two steps: the copies then share what is cached."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    page, n = 4, 5
    prompt = torch.randint(0, 300, (14,), generator=g).tolist()  # 3 full pages and 2 tokens
    other = torch.randint(0, 300, (9,), generator=g).tolist()
    prompts = [prompt] * n + [other]
    engine = Engine(model, page_size=page, max_num_seqs=8, max_batch_tokens=budget)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    out = {i: [] for i in ids}
    whole = budget >= len(prompt) + len(other)  # step 1 computes both prompts whole
    first = engine.step()
    # the other prompt goes past the copies, which wait
    assert [ev.request_id for ev in first] == ([ids[0], ids[-1]] if whole else [])
    for ev in first:
        out[ev.request_id].append(ev)
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev)
    assert [[ev.token for ev in out[i]] for i in ids] == _reference(model, prompts, GREEDY.max_tokens)
    shareable = (len(prompt) - 1) // page
    if whole:  # the first copy's prompt is cached after step 1: every copy shares all of it
        assert engine.blocks.hits == (n - 1) * shareable
    else:
        assert engine.blocks.hits >= (n - 2) * shareable
    assert engine.stats["preemptions"] == 0


def test_roomy_pool_single_step_prefill_matches_too():
    model = _model()
    prompts = _prompts(seed=2)
    engine = Engine(model, page_size=16, max_num_seqs=64, max_batch_tokens=4096)
    assert engine.generate(prompts, GREEDY) == _reference(model, prompts, GREEDY.max_tokens)
    assert engine.stats["preemptions"] == 0


@pytest.mark.parametrize("page_size", [1, 3])
def test_requests_joining_mid_flight(page_size):
    """Continuous batching: requests added while others decode get the same tokens."""
    model = _model(2)
    prompts = _prompts(seed=3)[:6]
    engine = Engine(model, page_size=page_size, num_pages=200, max_batch_tokens=16)
    out: dict[int, list[int]] = {}
    ids = []
    for p in prompts:
        ids.append(engine.add_request(p, GREEDY))
        for ev in engine.step():  # one step between arrivals
            out.setdefault(ev.request_id, []).append(ev.token)
    while engine.has_unfinished():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token)
    assert [out[i] for i in ids] == _reference(model, prompts, GREEDY.max_tokens)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_in_the_engine(backend):
    """The engine through the kernels the GPU runs, on CPU: Triton's interpreter or the CUDA
    sources' emulation build (paged KV write and decode, RMSNorm, QK-norm+rotary)."""
    model = _model(2, [6, 48])
    prompts = _prompts(seed=4)[:4]
    want = _reference(model, prompts, 6)
    ops.set_kernel_backend(backend)
    try:
        got = Engine(model, page_size=4, num_pages=40, max_batch_tokens=12).generate(
            prompts, SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        ops.set_kernel_backend(None)
    assert got == want


def _counting(monkeypatch, obj, name):
    """Replace obj.name with a wrapper that records each call's args; returns the list of calls."""
    calls, real = [], getattr(obj, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_in_place_qk_norm_rope_kernel_runs_on_the_kernel_path(monkeypatch, backend):
    """With QK-norm+rotary on a kernel backend the engine's attention runs ONE packed qkv buffer
    through kernels.qk_norm_rope_inplace per layer and step (not the separate q/k op); on the torch
    path it never does."""
    model = _model(2, [6, 48])
    prompts = _prompts(seed=7)[:3]
    want = _reference(model, prompts, 4)
    inplace = _counting(monkeypatch, ops.kernels, "qk_norm_rope_inplace")
    separate = _counting(monkeypatch, ops.kernels, "qk_norm_rope")
    ops.set_kernel_backend(backend)
    try:
        engine = Engine(model, page_size=4, num_pages=40, max_batch_tokens=12)
        got = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        ops.set_kernel_backend(None)
    assert got == want
    if backend == "torch":
        assert inplace == [] and separate == []
        return
    cfg = model.config
    assert len(inplace) == engine.stats["steps"] * cfg.n_layer and separate == []
    (qkv, positions, cache, hq, hkv), kwargs = inplace[0]
    D = cfg.head_dim
    assert qkv.shape[1] == (cfg.n_head + 2 * cfg.n_kv_head) * D and (hq, hkv) == (cfg.n_head, cfg.n_kv_head)
    assert positions.shape == (qkv.shape[0],) and cache.shape == (model.cos.size(0), D)
    assert kwargs["backend"] == backend and kwargs["scale"] == 1.2


def test_packed_qkv_weight_is_cached_and_follows_weight_updates():
    model = _model()
    attn = model.transformer.h[0].attn
    w = attn.packed_qkv_weight(torch.float32)
    assert w is attn.packed_qkv_weight(torch.float32)  # cached
    torch.testing.assert_close(w, torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]), rtol=0, atol=0)
    with torch.no_grad():
        attn.c_k.weight.add_(1.0)  # an in-place update (optimizer step, load_state_dict)
    w2 = attn.packed_qkv_weight(torch.float32)
    assert w2 is not w and torch.equal(w2[attn.c_q.weight.size(0):][:attn.c_k.weight.size(0)], attn.c_k.weight)
    assert attn.packed_qkv_weight(torch.bfloat16).dtype == torch.bfloat16
    attn.c_q.weight = torch.nn.Parameter(torch.zeros_like(attn.c_q.weight))  # a new tensor, version 0
    attn.packed_qkv_weight(torch.float32)
    attn.c_v.weight.data = torch.ones_like(attn.c_v.weight)  # as Module.to does: same object, same version
    assert torch.equal(attn.packed_qkv_weight(torch.float32)[-attn.c_v.weight.size(0):], attn.c_v.weight)
    assert torch.equal(attn.packed_qkv_weight(torch.float32)[:attn.c_q.weight.size(0)], attn.c_q.weight)


def test_inference_casts_each_weight_once_and_follows_weight_updates():
    """In eval mode without autograd a Linear keeps its weight cast to the activation dtype
    (rebuilt when the weight changes, dropped in training mode); with autograd it casts per call,
    so the gradient reaches the fp32 master."""
    from nanofast.model import Linear

    lin = Linear(24, 8).eval()
    x = torch.randn(5, 24).to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        cached = lin._cast.get((lin.weight,), torch.bfloat16, lambda: None)
        assert cached.dtype == torch.bfloat16 and lin(x).equal(y)
        assert lin._cast.get((lin.weight,), torch.bfloat16, lambda: None) is cached  # not rebuilt
        assert y.equal(torch.nn.functional.linear(x, lin.weight.to(torch.bfloat16)))
        lin.weight.mul_(2.0)  # an optimizer step between rollouts
        assert lin(x).equal(torch.nn.functional.linear(x, lin.weight.to(torch.bfloat16)))
    lin(x).float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert lin.train()._cast._entry is None  # training carries no copy
    with torch.no_grad():
        lin(x)
        assert lin._cast._entry is None  # training mode never caches (its weights move every step)
        fresh = Linear(24, 8).eval()  # activations in the weights' dtype: nothing to cast, nothing kept
        fresh(torch.randn(3, 24))
        assert fresh._cast._entry is None


@pytest.mark.parametrize("decode_step", ["off", "eager", "exact"])
def test_decode_plans_without_reading_lengths_back(monkeypatch, decode_step):
    """The decode kernel never plans from lengths read back from the device (a sync per layer and
    step on a GPU): the general path hands it the engine's host lengths (the lengths the kernel
    reads), the static decode step a fixed split count per bucket and window."""
    model = _model(2, [5, 48])
    calls = _counting(monkeypatch, kernels, "paged_decode_attention")
    ops.set_kernel_backend("triton")
    try:
        engine = Engine(model, page_size=4, num_pages=40, max_batch_tokens=12, decode_step=decode_step)
        engine.generate(_prompts(seed=2)[:3], SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        ops.set_kernel_backend(None)
    assert calls
    static = [kwargs for _, kwargs in calls if kwargs.get("num_splits") is not None]
    for args, kwargs in calls:
        if kwargs.get("num_splits") is None:
            assert kwargs["host_seq_lens"] == args[4].tolist()
        else:
            assert kwargs.get("host_seq_lens") is None and kwargs.get("plan") is None
    assert bool(static) == (decode_step != "off") == (engine.stats["static_steps"] > 0)


def test_a_step_with_several_chunks_makes_one_prefill_call_per_layer(monkeypatch):
    model = _model(2, [5, 48])
    # 5, 17, 30 and 9 tokens: several chunks per step (no two share a first page: a copy would wait)
    prompts = _prompts(seed=8)[3:7]
    batched = _counting(monkeypatch, attention, "paged_prefill_attention_batched")
    per_chunk = _counting(monkeypatch, attention, "paged_prefill_attention")
    engine = Engine(model, page_size=4, num_pages=60, max_batch_tokens=64)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()  # every prompt in one step: four chunks
    assert len(batched) == model.config.n_layer and per_chunk == []
    assert [len(args[4]) for args, _ in batched] == [len(prompts)] * model.config.n_layer
    while engine.has_unfinished():
        engine.step()
    assert per_chunk == []


def test_hash_collisions_cannot_return_wrong_text(monkeypatch):
    """With every page hashing alike, the token/parent verification must keep outputs exact."""
    monkeypatch.setattr(kv_cache, "page_key", lambda parent, tokens: b"same")
    model = _model()
    prompts = _prompts(seed=5)
    engine = Engine(model, page_size=4, num_pages=12, max_batch_tokens=9)
    assert engine.generate(prompts, GREEDY) == _reference(model, prompts, GREEDY.max_tokens)


# ---- block manager ------------------------------------------------------------------------------

def test_block_manager_refcounts_prefix_cache_and_lru_eviction():
    bm = BlockManager(num_pages=4, page_size=2)
    a = [bm.allocate() for _ in range(3)]
    assert a == [0, 1, 2] and bm.available == 1
    tokens = [5, 6, 7, 8, 9, 10]
    bm.register(a, tokens, 0, 3)
    b = bm.match_prefix([5, 6, 7, 8, 1, 1], max_pages=3)
    assert b == [0, 1] and bm.ref[0] == 2  # shared, verified page by page
    assert bm.match_prefix([5, 6, 0, 0], max_pages=2) == [0] and bm.ref[0] == 3
    for p in a + b + [0]:
        bm.release(p)
    assert bm.in_use == 0 and list(bm.evictable) == [2, 1, 0]  # least recently released first
    assert bm.allocate() == 3  # a free page before any eviction
    assert bm.allocate() == 2 and bm.match_prefix(tokens, 3) == [0, 1]  # page 2's entry is gone
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release(3) or bm.release(3)


def test_abort_and_finish_free_every_page():
    model = _model()
    engine = Engine(model, page_size=4, num_pages=30)
    long = engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=20, temperature=0.0))
    short = engine.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0.0))
    events = engine.step() + engine.step()
    assert [e.finish_reason for e in events if e.request_id == short] == [None, "length"]
    assert engine.blocks.in_use > 0
    engine.abort(long)
    assert not engine.has_unfinished() and engine.blocks.in_use == 0 and engine.step() == []


def test_stop_tokens_end_a_request_with_reason_stop():
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    free_run = list(model.generate(prompt, 8))
    stop = free_run[3]
    engine = Engine(model)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,)))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    first = free_run.index(stop)
    assert [e.token for e in events] == free_run[:first + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].request_id == rid


# ---- sampling ----------------------------------------------------------------------------------

def test_sampling_seeds_topk_topp():
    model = _model()
    prompts = _prompts(seed=6)[:4]
    hot = SamplingParams(max_tokens=8, temperature=1.5, seed=123)
    a = Engine(model).generate(prompts, hot)
    b = Engine(model, max_batch_tokens=5).generate(prompts[::-1], hot)[::-1]  # other batch, order, chunks
    assert a == b  # a request's tokens depend on its seed only
    c = Engine(model).generate(prompts, SamplingParams(max_tokens=8, temperature=1.5, seed=124))
    assert a != c
    greedy = Engine(model).generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    for narrow in (SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=1),
                   SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=2)):
        assert Engine(model).generate(prompts, narrow) == greedy


def _penalised_reference(model: GPT, prompt: list[int], steps: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding by full recompute, OpenAI's penalties applied to the answer's counts."""
    ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(steps):
            row = model(torch.tensor([ids]))[0, -1].float()
            token = int((row - frequency * counts - presence * (counts > 0).float()).argmax())
            ids.append(token)
            counts[token] += 1
    return ids[len(prompt):]


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 2.0), (0.7, 0.4), (-2.0, -1.0)])
def test_penalties_equal_the_reference_and_change_the_answer(presence, frequency):
    model = _model(2, [5, 48])
    prompts = _prompts(seed=8)[:5]
    params = SamplingParams(max_tokens=14, temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
    got = Engine(model, page_size=4, max_batch_tokens=7).generate(prompts, params)
    assert got == [_penalised_reference(model, p, 14, presence, frequency) for p in prompts]
    assert got != _reference(model, prompts, 14)  # the penalties mattered somewhere
    if presence > 0 and frequency >= 0:  # repeats are discouraged: fewer than without
        repeats = lambda outs: sum(len(o) - len(set(o)) for o in outs)  # noqa: E731
        assert repeats(got) < repeats(_reference(model, prompts, 14))


def test_penalties_come_before_sampling_filters():
    """Sampling with top_k=1 keeps only the best penalised token: the greedy penalised reference."""
    model = _model()
    prompts = _prompts(seed=9)[:3]
    params = SamplingParams(max_tokens=12, temperature=1.3, top_k=1, seed=5, presence_penalty=0.9,
                            frequency_penalty=0.6)
    assert Engine(model).generate(prompts, params) == [_penalised_reference(model, p, 12, 0.9, 0.6) for p in prompts]


def test_top_logprobs_are_the_models_most_likely_tokens():
    model = _model(2, [5, 48])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine = Engine(model, page_size=4, max_batch_tokens=5)
    engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=2, top_logprobs=5,
                                              frequency_penalty=1.0))
    engine.add_request(prompt[:3], SamplingParams(max_tokens=6, temperature=0.0))  # asks for none, in the same steps
    events = []
    while engine.has_unfinished():
        events += engine.step()
    mine = [e for e in events if e.request_id == 0]
    assert all(e.top_logprobs == () for e in events if e.request_id == 1)
    ids = torch.tensor([prompt + [e.token for e in mine]])
    with torch.no_grad():
        full = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)[len(prompt) - 1:]
    for e, row in zip(mine, full):
        assert len(e.top_logprobs) == 5
        want = torch.topk(row, 5)
        assert [t for t, _ in e.top_logprobs] == want.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in e.top_logprobs]), want.values, rtol=0, atol=1e-4)
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)  # the model's own, before the penalty


def test_sample_seeds_differ_and_the_first_is_the_seed():
    assert sample_seed(None, 3) is None and sample_seed(7, 0) == 7
    seeds = [sample_seed(s, i) for s in (0, 1, -5, 2 ** 64 - 1) for i in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= sample_seed(s, i) < 2 ** 64 for s in (-5, 2 ** 64 - 1) for i in (1, 2))  # a Generator's range
    model = _model()
    outs = [Engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=1.0, seed=sample_seed(9, i)))[0]
            for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3


def test_top_k_and_top_p_restrict_the_support():
    """Every sampled token lies in the top-k set / the top-p nucleus of its distribution."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    engine = Engine(_model())
    for params, allowed in [
        (SamplingParams(temperature=2.0, top_k=3), lambda row: set(torch.topk(row, 3).indices.tolist())),
        (SamplingParams(temperature=1.0, top_p=0.5), lambda row: _nucleus(row, 0.5)),
    ]:
        seqs = []
        for i in range(3):
            rid = engine.add_request([1], params)
            seqs.append(next(s for s in engine.waiting if s.id == rid))
        for _ in range(50):
            for row, (tok, logprob, top) in zip(logits, engine._sample(logits, seqs)):
                assert top == ()
                assert tok in allowed(row)
                assert logprob == pytest.approx(torch.log_softmax(row, -1)[tok].item(), abs=1e-5)
        engine.waiting.clear()


def _nucleus(row: torch.Tensor, p: float) -> set[int]:
    probs, order = torch.sort(torch.softmax(row, -1), descending=True)
    keep = (probs.cumsum(0) - probs) < p
    return set(order[keep].tolist())


# ---- the calculator tool -------------------------------------------------------------------------

@pytest.mark.parametrize("expr,want", [("1+2", "3"), ("12/4", "3"), ("7/2", "3.5"), ("1,234 * 2", "2468"),
                                       ("(3 - 5) * -2", "4"), ("10 // 3 + 10 % 3", "4"),
                                       ("'strawberry'.count('r')", "3"), ('"a,b,a".count("a")', "2")])
def test_calculator_allowed(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr", ["2**10", "__import__('os')", "x + 1", "open('f')", "'a' * 3", "1/0", "",
                                  "[1, 2]", "'abc'.upper()", "len('abc')", "().__class__", "1" * 300,
                                  "'ab'.count('a', 1)", "(" * 200 + "1" + ")" * 200])
def test_calculator_refuses(expr):
    assert calculate(expr) is None


def test_calculator_output_is_forced_into_the_sequence(monkeypatch):
    """A scripted sampler emits <|python_start|>2+3<|python_end|>: the engine forces
    <|output_start|>5<|output_end|> in (forced=True), runs those tokens through the model, and
    continues sampling after them."""
    import argparse
    import inspect

    from nanofast.tokenizer import Tokenizer

    tok = Tokenizer.train([inspect.getsource(m) for m in (argparse, inspect)], vocab_size=300)
    model = _model()
    sp = {n: tok.encode_special(f"<|{n}|>") for n in ("python_start", "python_end", "output_start", "output_end")}
    script = [sp["python_start"], *tok.encode("2+3"), sp["python_end"], 7, 8]
    engine = Engine(model, tok, decode_step="off")  # every token through the scripted general sampler
    computed = []
    real_sample = engine._sample

    def scripted(logits, seqs):
        real_sample(logits, seqs)
        computed.append(seqs[0].num_computed)
        return [(script[len(computed) - 1], 0.0, ())]

    monkeypatch.setattr(engine, "_sample", scripted)
    rid = engine.add_request([tok.bos_token_id, 5], SamplingParams(max_tokens=len(script) + 3))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    forced = [sp["output_start"], *tok.encode("5"), sp["output_end"]]
    n = len(script) - 2
    assert [e.token for e in events] == script[:n] + forced + script[n:]
    assert [e.forced for e in events] == [False] * n + [True] * len(forced) + [False, False]
    assert events[-1].finish_reason == "length" and events[-1].request_id == rid
    # the forced tokens went through the model (as one chunk) before the next token was sampled
    assert computed[n] == 2 + n + len(forced)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,msg", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                                        (dict(presence_penalty=2.5), "presence_penalty"),
                                        (dict(frequency_penalty=True), "frequency_penalty"),
                                        (dict(top_logprobs=21), "top_logprobs"), (dict(top_logprobs=-1), "top_logprobs"),
                                        (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                                        (dict(top_p=1.5), "top_p"), (dict(seed="x"), "seed")])
def test_sampling_params_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_engine_errors():
    model = _model()
    with pytest.raises(ValueError, match="page_size"):
        Engine(model, page_size=0)
    engine = Engine(model, page_size=4, num_pages=5)
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        engine.add_request([1, 300], GREEDY)
    with pytest.raises(ValueError, match="exceeds the engine's context of 20 tokens"):
        engine.add_request([1] * 15, GREEDY)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request([1], {"max_tokens": 3})


def test_event_logprobs_equal_the_full_forward():
    """What RL compares: the engine's log p(token) vs a full forward over the finished sequence."""
    model = _model(2, [5, 48])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine = Engine(model, page_size=4, max_batch_tokens=5)
    engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    ids = torch.tensor([prompt + [e.token for e in events]])
    with torch.no_grad():
        full = torch.log_softmax(model(ids[:, :-1])[0], -1)
    want = full[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None])[:, 0]
    got = torch.tensor([e.logprob for e in events])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
