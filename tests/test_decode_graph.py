"""The engine's static decode step (nanofast.decode_graph): the same tokens as the general path
for every batch bucket, with preemption in the middle, greedy and sampled, on the torch path and
on the kernels the GPU runs (Triton's interpreter); compiled on CPU; captured on CUDA."""
from __future__ import annotations

import pytest
import torch

from nanofast import decode_graph, ops
from nanofast.decode_graph import batch_buckets, bucket_of
from nanofast.engine import Engine, SamplingParams, sample_seed
from nanofast.model import GPT, config_for_depth

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _model(seed: int = 0, device: str = "cpu", dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    cfg = config_for_depth(2, vocab_size=300, sequence_len=48, head_dim=16, n_kv_head=1)
    model = GPT(cfg, compute_dtype=dtype)
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections: perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.windows = [5, 48]  # a short window on layer 0: the decode's window masking matters
    return model.to(device).eval()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(k),), generator=g).tolist() for k in torch.randint(1, 14, (n,), generator=g)]


def _run(model, prompts, params, decode_step, **kw) -> tuple[list, Engine]:
    engine = Engine(model, page_size=4, decode_step=decode_step, **kw)
    return engine.generate(prompts, params), engine


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]
    assert [bucket_of(n, batch_buckets(6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("mode", ["eager", "exact"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_greedy_equals_the_general_path_in_every_bucket_with_preemption(n, mode):
    """Every bucket of max_num_seqs 7 (1, 2, 4, 7; padding rows in 3 and 5), in a pool so small that
    sequences are preempted and recomputed mid-decode: the same tokens as the general path. "exact"
    (the CPU default) runs each step at its own batch and width: it never pads, so it never writes
    the scratch page, and its steps run at batch sizes that are no bucket."""
    model = _model()
    prompts = _prompts(n)
    kw = dict(num_pages=max(9, 3 * n), max_num_seqs=7, max_batch_tokens=16)
    want, off = _run(model, prompts, GREEDY, "off", **kw)
    got, engine = _run(model, prompts, GREEDY, mode, **kw)
    assert got == want
    assert engine.stats["static_steps"] > 0 and off.stats["static_steps"] == 0
    if n >= 5:
        assert engine.stats["preemptions"] > 0
    assert engine.blocks.in_use == 0
    graphs = engine.graphs
    scratch = graphs.cache.k[:, graphs.scratch_page]
    batches, widths = {k[0] for k in graphs.steps}, {k[1] for k in graphs.steps}
    if mode == "exact":
        assert not scratch.any()
        assert (n in (3, 5)) <= bool(batches - set(graphs.buckets)) and bool(widths - set(graphs.widths))
    else:
        assert batches <= set(graphs.buckets) and widths <= set(graphs.widths)
        assert (n in (3, 5)) <= bool(scratch.any())  # padding rows ran


def test_sampled_tokens_equal_the_general_path_for_the_same_seeds():
    """temperature, top-k, top-p and per-request seeds (OpenAI's n through sample_seed): each
    request's tokens are those of the general path, whatever the batch around it."""
    model = _model(1)
    prompts = _prompts(5, seed=3)
    settings = [dict(temperature=1.0), dict(temperature=0.8, top_k=7), dict(temperature=1.3, top_p=0.6),
                dict(temperature=0.9, top_k=20, top_p=0.8), dict(temperature=0.0)]
    for decode_step in ("off", "eager", "exact"):
        engine = Engine(model, page_size=4, max_num_seqs=8, decode_step=decode_step)
        ids = [engine.add_request(p, SamplingParams(max_tokens=10, seed=sample_seed(5, i), **s))
               for i, (p, s) in enumerate(zip(prompts, settings))]
        out = {i: [] for i in ids}
        while engine.has_unfinished():
            for ev in engine.step():
                out[ev.request_id].append((ev.token, ev.logprob))
        if decode_step == "off":
            want = out
            continue
        # the same tokens; their log-probabilities up to the rounding of another batch's GEMM blocking
        assert {i: [t for t, _ in o] for i, o in out.items()} == {i: [t for t, _ in o] for i, o in want.items()}
        assert max(abs(a[1] - b[1]) for i in out for a, b in zip(out[i], want[i])) < 1e-4
        assert engine.stats["static_steps"] > 0
    # the same seed alone in its batch: the same tokens again
    alone = Engine(model, page_size=4, decode_step="eager").generate(
        [prompts[1]], SamplingParams(max_tokens=10, seed=sample_seed(5, 1), **settings[1]))[0]
    assert alone == [t for t, _ in want[1]]


def test_padding_rows_write_only_the_scratch_page():
    """A step of 3 sequences runs in bucket 4: its padding row writes the scratch page (the page
    past the block manager's pool) and nothing else; each real row writes its one slot."""
    model = _model()
    engine = Engine(model, page_size=4, num_pages=12, max_num_seqs=4, decode_step="eager")
    for p in _prompts(3):
        engine.add_request(p, GREEDY)
    while engine.stats["static_steps"] == 0:
        before = engine.cache.k.clone()
        engine.step()
    assert len(engine.running) == 3
    slots = [seq.pages[(seq.num_computed - 1) // 4] * 4 + (seq.num_computed - 1) % 4 for seq in engine.running]
    changed = (engine.cache.k != before).flatten(3).any(-1).any(0)  # (pages, page_size) slots written
    scratch = engine.cache.k.shape[1] - 1
    assert scratch == engine.blocks.num_pages and changed[scratch, 0] and changed[scratch].sum() == 1
    written = {int(i) for i in changed[:scratch].flatten().nonzero()}
    assert written == set(slots)


def test_decode_step_option_errors():
    model = _model()
    with pytest.raises(ValueError, match="decode_step must be one of"):
        Engine(model, decode_step="cuda-graph")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="decode_step 'graph' captures CUDA graphs: it needs a CUDA model"):
            Engine(model, decode_step="graph")


def test_the_kernels_static_step_equals_the_general_path():
    """The GPU's kernels (Triton through its interpreter): paged KV write and decode with the
    bucket's fixed split plan, the in-place QK-norm+rotary reading positions from the step's
    input table, with preemption."""
    model = _model(2)
    prompts = _prompts(3, seed=5)
    kw = dict(num_pages=9, max_num_seqs=4, max_batch_tokens=16)
    ops.set_kernel_backend("triton")
    try:
        want, _ = _run(model, prompts, GREEDY, "off", **kw)
        got, engine = _run(model, prompts, GREEDY, "eager", **kw)
    finally:
        ops.set_kernel_backend(None)
    assert got == want and engine.stats["static_steps"] > 0


def test_the_kernels_static_step_with_a_gpus_split_plan():
    """The split plan a GPU's static step gets (its SM count): 2 splits per row at the bucket's
    width, on Triton through the interpreter. Rows shorter than the bucket leave splits empty (the
    padding row's all but one); the tokens still equal the general path's."""
    model = _model(6)
    model.windows = [5, 200]  # the long layer sees every key of these ~80-token sequences
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (70, 66, 75)]
    params = SamplingParams(max_tokens=3, temperature=0.0)
    ops.set_kernel_backend("triton")
    try:
        kw = dict(page_size=16, num_pages=24, max_num_seqs=4)
        want = Engine(model, decode_step="off", **kw).generate(prompts, params)
        engine = Engine(model, decode_step="eager", **kw)
        engine.graphs.sm = 132  # an H100's SMs
        got = engine.generate(prompts, params)
        plan = engine.graphs._splits(4, 8)  # the bucket these steps ran in: 3 rows, 5-page sequences
    finally:
        ops.set_kernel_backend(None)
    assert got == want and engine.stats["static_steps"] > 0
    assert {k[:2] for k in engine.graphs.steps} == {(4, 8)}
    assert plan == {5: 1, 200: 2}  # the short window sees one 64-key tile, the long one two


def test_compiled_static_step_equals_the_general_path():
    """The CPU's stand-in for capture: the same static step under torch.compile (fullgraph: nothing
    in it reads a tensor back on the host), greedy and sampled, in the padded bucket of 3 rows.
    One page per sequence keeps it to few shapes (each compiles once; 10-20 s on 2 cores)."""
    model = _model(3)
    prompts = [p[:5] for p in _prompts(3, seed=7)]
    kw = dict(max_num_seqs=4)
    for params in (SamplingParams(max_tokens=4, temperature=0.0),
                   SamplingParams(max_tokens=4, temperature=1.0, top_k=9, seed=11)):
        want, _ = _run(model, prompts, params, "off", **kw)
        engine = Engine(model, page_size=16, decode_step="compile", **kw)
        assert engine.generate(prompts, params) == want
        assert engine.stats["static_steps"] > 0 and engine.graphs.captures == len(engine.graphs.steps) > 0
        assert all(greedy_rows for *_, greedy_rows in engine.graphs.steps)  # captured: one shape, argmax in it


def test_an_uncaptured_step_whose_rows_all_sample_skips_the_greedy_argmax():
    model = _model(2)
    prompts = _prompts(3, seed=5)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=4)
    want, _ = _run(model, prompts, params, "off")
    got, engine = _run(model, prompts, params, "exact")
    assert got == want and engine.stats["static_steps"] > 0
    assert not any(greedy_rows for *_, greedy_rows in engine.graphs.steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (CPU siblings: the eager and "
                    "compiled static steps above run the same DecodeGraphs._forward)")
def test_captured_graphs_equal_the_general_path_and_follow_weight_updates():
    model = _model(4, device="cuda", dtype=torch.bfloat16)
    prompts = _prompts(6, seed=9)
    kw = dict(num_pages=40, max_num_seqs=8, max_batch_tokens=16)
    want, _ = _run(model, prompts, GREEDY, "off", **kw)
    engine = Engine(model, page_size=4, decode_step="graph", **kw)
    assert engine.generate(prompts, GREEDY) == want and engine.graphs.captures > 0
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # an optimizer step's in-place update: the graphs must not replay old weights
    want2, _ = _run(model, prompts, GREEDY, "off", **kw)
    assert engine.generate(prompts, GREEDY) == want2 != want


def test_the_engine_picks_its_mode_by_device():
    engine = Engine(_model(), decode_step="auto")
    assert engine.graphs.mode == ("graph" if engine.device.type == "cuda" else "exact")
    assert Engine(_model(), decode_step="off").graphs is None
    assert decode_graph.MODES == ("graph", "compile", "eager", "exact")
