"""The engine's decode-only step on static buffers: one captured CUDA graph per batch bucket on a
GPU, the same static step (eager, or under torch.compile) on CPU.

Most of an engine's steps are pure decode: every running sequence adds one token. On such a step
the general path (`Engine.step` -> `_build_batch` -> model -> `_sample`) rebuilds its index
tensors from Python lists, plans the paged attention per layer from host lengths, and launches a
few hundred small kernels whose launch latency, at small batch, costs more than their work. Here
the step is one fixed function of two persistent buffers:

- `inputs`, (max_rows, 11 + max_pages) fp64 on the model's device: per row the token, its position,
  the previous token, its cache slot, the length after the step, the sampling settings
  (temperature, top-k, top-p, the seed's two 32-bit halves, the draw index) and the block table.
  fp64 holds every one of them exactly (all below 2^53), so a step is ONE host-to-device copy (from
  a pinned staging buffer on CUDA).
- the output, (rows, 2) fp64: the token and its log-probability under the model's distribution,
  read back in one device-to-host copy.

In the bucketed modes (graph, compile, eager) a step of S sequences runs in the smallest batch
bucket >= S (powers of two up to `max_num_seqs`, and `max_num_seqs` itself) and the smallest
block-table width bucket (powers of two pages) that holds its longest sequence; the padding rows
decode token 0 at position 0 into a scratch page of the cache that no sequence owns, so they change
nothing a real row reads. The split plan of the
paged decode kernels is fixed per bucket (`paged_plan.plan_paged_decode` for every row at the
bucket's full width, per layer window) instead of read from the lengths, and sampling runs on the
device for every row at once (`nanofast.sampling`: temperature, top-k, top-p, per-row seeds).

Modes (`Engine(decode_step=...)`):
- "graph": on CUDA, each (bucket, width, sampling) shape is run once eagerly (it allocates what the
  step keeps: the kernels' uniform plan tensors, the weights cast once), then captured as a CUDA
  graph and replayed from then on. A change of any parameter (an optimizer step, a load, train())
  drops the graphs: they hold the weights' addresses and the copies cast from them.
- "compile": the same step under torch.compile (fullgraph, static shapes), one compilation per
  shape, shared by every engine of the same model and pool size; on CPU this is the captured
  step's stand-in (there are no CUDA graphs there), opt-in: a compilation costs more than a
  short-lived engine (RL's, the evaluations') saves.
- "eager": the same static step without capture, in the same buckets: the captured step's
  rehearsal on CPU (its padding rows and padded block tables execute here).
- "exact": the static step without capture at each step's own batch and width: no padding rows,
  no padded block-table columns. Shapes are static only for a capture; uncaptured, padding is
  work the step does for nothing (a batch of 33 in bucket 64 computes 31 more rows, a 10-page
  sequence in width 16 gathers and attends over 6 pages more on the torch path). The CPU default.
The sampled tokens do not depend on the mode: each is the same computation on the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nanofast import ops
from nanofast.kernels.paged_plan import plan_paged_decode
from nanofast.kernels.launch import sm_count
from nanofast.kv_cache import KVCache, PagedBatch
from nanofast.model import Linear
from nanofast.sampling import ranking, sample, split_seed

MODES = ("graph", "compile", "eager", "exact")

# Columns of the inputs buffer, before the block table.
TOKEN, POSITION, PREV, SLOT, LENGTH, TEMPERATURE, TOP_K, TOP_P, SEED_LO, SEED_HI, DRAW = range(11)
FIXED_COLUMNS = 11


def batch_buckets(max_rows: int) -> list[int]:
    """Batch sizes a step is padded to: powers of two below max_rows, then max_rows itself."""
    sizes = [1 << i for i in range(max(1, max_rows).bit_length()) if 1 << i < max_rows]
    return sizes + [max_rows]


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n (n must not exceed the largest)."""
    return next(b for b in buckets if b >= n)


@dataclass(frozen=True)
class Row:
    """What the static step needs of one decoding sequence."""
    token: int          # the sequence's last token, decoded this step
    position: int       # its position (the sequence length before the step)
    prev: int           # the token before it (smear)
    slot: int           # its cache slot, page * page_size + offset
    pages: list[int]    # the sequence's pages (those holding positions 0 .. position)
    temperature: float
    top_k: int          # 0: no limit (nor a limit >= the vocabulary)
    top_p: float
    seed: int
    draw: int


class DecodeGraphs:
    """The static decode step of one engine (see the module docstring).

    Args:
        model: the engine's GPT (eval mode).
        cache: the engine's KVCache; its page `scratch_page` belongs to no sequence.
        max_rows: most sequences a step runs (the engine's max_num_seqs).
        max_pages: most pages one sequence holds (ceil(max context / page_size)).
        mode: one of MODES; "graph" needs a CUDA model.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, scratch_page: int, max_rows: int, max_pages: int,
                 mode: str):
        if mode not in MODES:
            raise ValueError(f"decode_step mode must be one of {MODES}, got {mode!r}")
        self.device = model.cos.device
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"decode_step 'graph' captures CUDA graphs: it needs a CUDA model, got one on "
                             f"{self.device} (use 'exact', 'eager' or 'compile' there)")
        self.model, self.cache, self.mode = model, cache, mode
        self.page_size, self.scratch_page = cache.page_size, scratch_page
        # the SMs the kernels' split plan fills (None: CPU, one split per sequence)
        self.sm = sm_count(self.device) if self.device.type == "cuda" else None
        self.buckets = batch_buckets(max_rows)
        self.widths = batch_buckets(max_pages)
        cols = FIXED_COLUMNS + max_pages
        self.inputs = torch.zeros((max_rows, cols), dtype=torch.float64, device=self.device)
        pin = self.device.type == "cuda"
        self.staging = torch.zeros((max_rows, cols), dtype=torch.float64, pin_memory=pin)
        self.steps: dict[tuple, Callable[[], torch.Tensor]] = {}
        self.captures = 0  # graphs captured or shapes compiled so far
        self.last_key: tuple | None = None  # (bucket, width, sampling, candidates, greedy rows) of the last step: steps[last_key]
        # replays its device work alone (the step benchmark's model time)
        self._weights: tuple | None = None
        self._pool = None

    # ---- one step ----------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> list[tuple[int, float]]:
        """Decode one token for each row; (token, log-probability) per row, in order."""
        S, longest = len(rows), max(len(r.pages) for r in rows)
        B, W = (S, longest) if self.mode == "exact" else (bucket_of(S, self.buckets), bucket_of(longest, self.widths))
        hot = [r for r in rows if r.temperature > 0]
        filtered, candidates = ranking([r.top_k for r in hot], [r.top_p for r in hot])  # as Engine._sample ranks
        sampling = "greedy" if not hot else "filtered" if filtered else "sample"
        self._stage(rows, B, W)
        # Uncaptured, a step whose rows all sample skips the greedy argmax; a captured step keeps one
        # graph / compilation per shape with the argmax in it rather than one more per shape.
        greedy_rows = len(hot) < S or self.mode in ("graph", "compile")
        self.last_key = (B, W, sampling, candidates, greedy_rows)
        out = self._step(self.last_key)()
        return [(int(t), lp) for t, lp in out[:S].tolist()]

    def _stage(self, rows: list[Row], B: int, W: int) -> None:
        """Write the rows (and padding rows) into the inputs buffer: one host-to-device copy."""
        P, scratch = self.page_size, self.scratch_page
        table = []
        for r in rows:
            lo, hi = split_seed(r.seed)
            table.append([r.token, r.position, r.prev, r.slot, r.position + 1, r.temperature, r.top_k, r.top_p,
                          lo, hi, r.draw, *r.pages, *[scratch] * (W - len(r.pages))])
        # padding rows: token 0 at position 0, written to and read from the scratch page only, greedy
        pad = [0, 0, 0, scratch * P, 1, 0.0, 0, 1.0, 0, 0, 0, *[scratch] * W]
        table += [pad] * (B - len(rows))
        cols = FIXED_COLUMNS + W
        host = torch.tensor(table, dtype=torch.float64)
        if self.device.type == "cuda":
            self.staging[:B, :cols].copy_(host)
            self.inputs[:B, :cols].copy_(self.staging[:B, :cols], non_blocking=True)
        else:
            self.inputs[:B, :cols].copy_(host)

    # ---- the static function and its captures --------------------------------------------------
    def _step(self, key: tuple) -> Callable[[], torch.Tensor]:
        if self.mode == "graph":
            # A graph replays the addresses it captured: the parameters' and the copies cast from them
            # (model.Linear's cache, dropped by train(), rebuilt when a weight changes).
            weights = (*((p._version, p.data_ptr()) for p in self.model.parameters()), self.model.training,
                       Linear.casts_dropped)
            if weights != self._weights:
                self.steps.clear()
                self._weights = weights
        fn = self.steps.get(key)
        if fn is None:
            fn = self.steps[key] = self._build(key)
        return fn

    def _build(self, key: tuple) -> Callable[[], torch.Tensor]:
        B, W, sampling, candidates, greedy_rows = key
        inputs = self.inputs[:B, :FIXED_COLUMNS + W]
        args = (self.model, self.cache.k, self.cache.v, inputs, self.model.cos_sin_cache(), self._splits(B, W),
                sampling, candidates, greedy_rows)
        if self.mode in ("eager", "exact"):
            return lambda: decode_forward(*args)
        self.captures += 1
        if self.mode == "compile":
            return lambda: _compiled(*args)
        return self._capture(lambda: decode_forward(*args))

    def _capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Run `step` once on a side stream (what it allocates for good: plan tensors, cast weights),
        then capture it into a CUDA graph sharing one memory pool with the other buckets' graphs.
        The warm-up writes the same K/V into the same slots as the replay that follows it."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def _splits(self, B: int, W: int) -> dict[int, int] | None:
        """Per layer window, the split count every row gets in this bucket: the kernels' own plan for B
        rows at the bucket's full width (their longest possible sequences), so a replay never plans
        from lengths it would have to read on the host. None on the torch path (no plan)."""
        if ops.decide_backend("paged_attention", self.device) == "torch":
            return None
        hkv = self.cache.k.shape[3]
        return {w: int(plan_paged_decode([W * self.page_size] * B, hkv, window=w, sm_count=self.sm)[0])
                for w in set(self.model.windows)}


def decode_forward(model: torch.nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor, inputs: torch.Tensor,
                   cos_sin: torch.Tensor, splits: dict[int, int] | None, sampling: str,
                   candidates: int | None, greedy_rows: bool = True) -> torch.Tensor:
    """The static step itself, on tensors only (nothing read back on the host).

    model: the GPT; k_cache, v_cache: the engine's (layers, pages, page_size, Hkv, D) pools; inputs:
    (B, 11 + W) fp64 rows as `DecodeGraphs` stages them; cos_sin: model.cos_sin_cache(); splits:
    the bucket's split count per layer window (None on the torch path); sampling: "greedy",
    "sample" or "filtered" (top-k / top-p, over the `candidates` most likely tokens, None: all);
    greedy_rows: whether some real row is greedy among sampled ones (padding rows' tokens are unused).
    Returns (B, 2) fp64 [token, log-probability]. Module level, with every tensor an argument, so
    that one compilation per shape serves every engine of the same model and pool size."""
    ints = inputs.to(torch.int64)
    positions = ints[:, POSITION]
    batch = PagedBatch(
        cache=KVCache.of(k_cache, v_cache), positions=positions, prev_tokens=ints[:, PREV], has_prev=positions > 0,
        slot_mapping=ints[:, SLOT], block_table=ints[:, FIXED_COLUMNS:].to(torch.int32),
        seq_lens=ints[:, LENGTH].to(torch.int32), logits_rows=None, num_decode=inputs.size(0), chunks=[],
        context_lens=None, cos_sin_cache=cos_sin, decode_splits=splits)
    logits = model(ints[None, :, TOKEN], kv=batch)
    if sampling == "greedy":
        token = logits.argmax(dim=-1)
    else:
        token = sample(logits, inputs[:, TEMPERATURE].float(), ints[:, TOP_K], inputs[:, TOP_P].float(),
                       ints[:, SEED_LO:SEED_HI + 1], ints[:, DRAW], filtered=sampling == "filtered",
                       candidates=candidates, greedy_rows=greedy_rows)
    logprob = torch.log_softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]
    return torch.stack([token.double(), logprob.double()], dim=1)


_compiled_forward = torch.compile(decode_forward, fullgraph=True, dynamic=False)


def _compiled(*args) -> torch.Tensor:
    # Every shape (bucket, width, sampling) of every engine is one compilation of this one function:
    # more than Dynamo's default of 8 per function, which would otherwise fall back to eager.
    with torch._dynamo.config.patch(recompile_limit=1024):
        return _compiled_forward(*args)
