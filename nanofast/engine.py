"""The inference engine: many conversations at once from one paged KV cache.

Continuous batching: requests join and leave at every step. Each step the scheduler gives every
running sequence its next tokens under a token budget (`max_batch_tokens`): one token for a
sequence that is decoding, a chunk of its prompt for one that is prefilling, so a long prompt is
spread over several steps instead of stalling everybody's decoding. All of a step's tokens run
through the model in ONE forward: decode rows through the paged decode kernel as one batch,
all chunks in one batched prefill call against their pages (`nanofast.kv_cache.PagedBatch`,
`nanofast.attention`). Where QK-norm+rotary runs on a kernel backend, each layer computes q, k, v
with one GEMM into a packed buffer normalised and rotated in place (`nanofast.attention.packed_step`).
A decode-only step (every running sequence adds one token) runs instead as a static step on
persistent buffers in batch buckets (`nanofast.decode_graph`): one input copy, a fixed attention
plan, sampling on the device, captured as a CUDA graph per shape on a GPU (`decode_step=`).

Memory: pages come from a fixed pool (`BlockManager`). Prompts that share a prefix share its pages
(prefix cache); copies of a prompt admitted together wait a step for the first copy's pages. When
the pool runs out, the most recently admitted sequence is preempted: its pages are released and it
is recomputed later from its tokens (often straight from the prefix cache), so no request ever
fails for lack of memory once it fits the pool alone.

Sampling (presence/frequency penalties, temperature, top-k, top-p, a seed per request) runs on the
model's device for all rows at once (`nanofast.sampling`: each request's random stream is a function
of its seed and draw index alone, so its tokens do not depend on the batch or on preemption); the
engine reads the sampled ids, their log-probabilities and any requested top
alternatives back once per step for all sequences, not once per token per sequence.
The calculator tool is nanochat's: <|python_start|>expr<|python_end|> is evaluated by
`nanofast.tools.calculate` and its result forced in as <|output_start|>result<|output_end|>.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanofast.decode_graph import MODES as DECODE_MODES, DecodeGraphs, Row
from nanofast.kv_cache import BlockManager, KVCache, PagedBatch
from nanofast.model import GPT
from nanofast.sampling import ranking, sample, split_seed, top_k_limit
from nanofast.tools import calculate

if TYPE_CHECKING:  # the engine only calls a tokenizer it is given: serving token ids needs no tokenizer libraries
    from nanofast.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. temperature 0 is greedy; top_k None and top_p 1.0 keep
    every token; seed None draws one. Generation stops after emitting a token of
    `stop_token_ids` (finish_reason "stop") or `max_tokens` tokens ("length").

    presence_penalty / frequency_penalty (OpenAI's, each in [-2, 2]): before temperature, greedy
    included, a token's logit is lowered by presence_penalty once it occurs in the answer so far
    and by frequency_penalty times the number of times it occurs there (calculator output
    counts: it is part of the answer). top_logprobs: how many most likely tokens each TokenEvent
    lists with their log-probabilities (0-20)."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a float in [0, 100], got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a float in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64) (a torch.Generator's range), "
                             f"got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a float in [-2, 2], got {v!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an int in [0, 20], got {self.top_logprobs!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of several drawn for one request seeded `seed` (OpenAI's n):
    sample 0 uses `seed` itself, so n=1 reproduces a plain seeded request; the others step by the
    64-bit golden ratio, so no two samples of one seed share a generator stream. None stays None."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2 ** 64


@dataclass
class TokenEvent:
    """One new token of a request. The last event of a request has finished=True and a
    finish_reason ("stop" or "length"); forced=True marks calculator output (not sampled).
    logprob: log p(token) under the model's own distribution as the engine computed it (before
    penalties and temperature; None for forced tokens): RL compares it with the trainer's to
    measure their mismatch. top_logprobs: the params.top_logprobs most likely (token, logprob)
    of that same distribution, most likely first (empty for forced tokens)."""
    request_id: int
    token: int
    finished: bool = False
    finish_reason: str | None = None
    forced: bool = False
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class _Sequence:
    id: int
    tokens: list[int]
    params: SamplingParams
    seed: int               # the request's seed (drawn when it had none): with `draws`, its random stream
    prompt_len: int
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0   # tokens whose K/V are in the cache
    registered: int = 0     # leading pages entered into the prefix cache
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # (V,) occurrences of each token in the answer, when penalised
    draws: int = 0          # tokens sampled so far (forced calculator tokens are not drawn)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Engine:
    """Serve many requests from `model` with a paged KV cache; see the module docstring.

    Args:
        model: a GPT (its device and compute dtype are used; put it in eval mode yourself).
        tokenizer: needed for the calculator tool (tools=True); None disables the tool.
        page_size: token slots per page.
        num_pages: pool size; default enough for max_num_seqs sequences of the model's training
            length (sequences may grow longer, to the rotary table's 10x, as pages allow).
        max_num_seqs: most sequences running at once.
        max_batch_tokens: token budget of one step (decode tokens + prefill chunks).
        decode_step: how a decode-only step runs (every running sequence adds one token, none needs
            penalties or top_logprobs): "graph" (a CUDA graph per batch bucket, replayed), "compile"
            (the same static step under torch.compile), "eager" (the same static step uncaptured, in
            the same buckets), "exact" (uncaptured, at each step's own batch and width: no padding),
            "off" (the general path, as mixed prefill + decode steps always run), or "auto": "graph"
            on CUDA, "exact" on CPU (see `nanofast.decode_graph`). stats["static_steps"] counts the
            steps it ran.
    Not thread-safe: one thread calls add_request / abort / step.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, *, page_size: int = 16,
                 num_pages: int | None = None, max_num_seqs: int = 64, max_batch_tokens: int = 2048,
                 tools: bool = True, decode_step: str = "auto"):
        for name, v in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                        ("max_batch_tokens", max_batch_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        cfg = model.config
        if num_pages is None:
            num_pages = max_num_seqs * math.ceil(cfg.sequence_len / page_size)
        self.model, self.tokenizer = model, tokenizer
        self.device = model.cos.device
        if decode_step not in ("auto", "off", *DECODE_MODES):
            raise ValueError(f"decode_step must be one of {('auto', 'off', *DECODE_MODES)}, got {decode_step!r}")
        if decode_step == "auto":
            decode_step = "graph" if self.device.type == "cuda" else "exact"
        self.blocks = BlockManager(num_pages, page_size)
        # The static decode step's padding rows write to and read from one more page that the block
        # manager never hands out.
        static = decode_step != "off"
        self.cache = KVCache(cfg.n_layer, num_pages + 1 if static else num_pages, page_size, cfg.n_kv_head,
                             cfg.head_dim, model.compute_dtype, self.device)
        self.page_size, self.max_num_seqs, self.max_batch_tokens = page_size, max_num_seqs, max_batch_tokens
        # A sequence must fit the pool alone (so preemption always makes progress) and the rotary table.
        self.max_context = min(model.cos.size(0), num_pages * page_size)
        self.graphs = DecodeGraphs(model, self.cache, num_pages, max_num_seqs, math.ceil(self.max_context / page_size),
                                   decode_step) if static else None
        self.tools = None
        if tools and tokenizer is not None:
            self.tools = {name: tokenizer.encode_special(f"<|{name}|>")
                          for name in ("python_start", "python_end", "output_start", "output_end")}
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._next_id = 0
        self._seed_rng = random.Random(0)
        self.stats = {"steps": 0, "preemptions": 0, "tokens": 0, "static_steps": 0}

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. prompt: token ids (non-empty; start with BOS)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                             f"context of {self.max_context} tokens")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        seq = _Sequence(self._next_id, list(prompt), params, seed, len(prompt))
        if params.penalised:
            seq.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
        self._next_id += 1
        self.waiting.append(seq)
        return seq.id

    def abort(self, request_id: int) -> None:
        """Drop a request (e.g. its client went away) and free its pages; unknown ids are ignored."""
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.id == request_id:
                    self._release(seq)
                    queue.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    # ---- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Schedule, run the model once over every scheduled token, sample; the new tokens."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        if self._static(scheduled):
            seqs = [seq for seq, _ in scheduled]
            sampled = self.graphs.run([self._row(seq) for seq in seqs])
            for seq in seqs:
                seq.draws += int(seq.params.temperature > 0)
            self._computed(scheduled, len(seqs))
            self.stats["static_steps"] += 1
            events: list[TokenEvent] = []
            for seq, (token, logprob) in zip(seqs, sampled):
                self._append(seq, token, events, logprob=logprob)
            return events
        batch, idx = self._build_batch(scheduled)
        logits = self.model(idx, kv=batch)
        ready = self._computed(scheduled, idx.size(1))
        if not ready:
            return []
        rows = [row for row, _ in ready]
        # every row ready (a decoding batch): the logits are already in order, no gather needed
        sampled = self._sample(logits if len(rows) == logits.size(0) else logits[rows], [seq for _, seq in ready])
        events = []
        for (_, seq), (token, logprob, top) in zip(ready, sampled):
            self._append(seq, token, events, logprob=logprob, top=top)
        return events

    def _computed(self, scheduled: list[tuple[_Sequence, int]], tokens: int) -> list[tuple[int, _Sequence]]:
        """After the model ran a step of `tokens` tokens: advance each sequence, enter its newly full
        pages into the prefix cache; (row, sequence) of those whose every token is now computed."""
        self.stats["steps"] += 1
        self.stats["tokens"] += tokens
        ready = []
        for row, (seq, n) in enumerate(scheduled):
            seq.num_computed += n
            full = seq.num_computed // self.page_size
            if full > seq.registered:
                self.blocks.register(seq.pages, seq.tokens, seq.registered, full)
                seq.registered = full
            if seq.num_computed == len(seq.tokens):
                ready.append((row, seq))
        return ready

    def _static(self, scheduled: list[tuple[_Sequence, int]]) -> bool:
        """Whether this step runs the static decode step: every sequence computes its last token (so
        each then samples), none needing what only the general sampler does (penalties, top_logprobs)."""
        return self.graphs is not None and all(
            n == 1 and seq.num_computed + 1 == len(seq.tokens) and seq.counts is None and not seq.params.top_logprobs
            for seq, n in scheduled)

    def _row(self, seq: _Sequence) -> Row:
        j, P, p = seq.num_computed, self.page_size, seq.params
        return Row(token=seq.tokens[j], position=j, prev=seq.tokens[j - 1] if j > 0 else 0,
                   slot=seq.pages[j // P] * P + j % P, pages=seq.pages, temperature=p.temperature,
                   top_k=top_k_limit(p.top_k, self.model.config.vocab_size), top_p=p.top_p, seed=seq.seed,
                   draw=seq.draws)

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Run prompts to completion together; the emitted tokens of each (a final stop token included)."""
        ids = [self.add_request(p, params) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for ev in self.step():
                if ev.request_id in out:
                    out[ev.request_id].append(ev.token)
        return [out[i] for i in ids]

    # ---- scheduling ------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """(sequence, new tokens) for this step: decode rows (1 token) first, then chunks."""
        budget = self.max_batch_tokens
        scheduled: list[tuple[_Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if self._reserve(seq, seq.num_computed + n):
                scheduled.append((seq, n))
                budget -= n
                i += 1
            else:  # out of pages: recompute-preempt the newest sequence (possibly this one)
                self._preempt(self.running[-1])
        # A prompt's pages enter the prefix cache once computed, so copies of one prompt admitted in
        # the same step would each compute it (OpenAI's n, RL's group of samples per question). A
        # waiting sequence whose first full page another one admitted this step is computing waits
        # one step instead, then takes those pages from the cache; other prompts are admitted past it.
        computing: set[tuple[int, ...]] = set()
        deferred: list[_Sequence] = []
        P = self.page_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.pages:
                # Reuse cached full pages of the prefix, but leave at least the last token to
                # compute: its logits give the first new token.
                shareable = (len(seq.tokens) - 1) // P
                seq.pages = self.blocks.match_prefix(seq.tokens, shareable)
                seq.num_computed, seq.registered = len(seq.pages) * P, len(seq.pages)
                if shareable and not seq.pages:
                    first = tuple(seq.tokens[:P])
                    if first in computing:
                        deferred.append(self.waiting.popleft())
                        continue
                    computing.add(first)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # first in line next step, in their order
        return sorted(scheduled, key=lambda s: s[1] > 1)  # stable: decode rows first

    def _reserve(self, seq: _Sequence, num_tokens: int) -> bool:
        """Give seq pages for num_tokens tokens; all or nothing."""
        need = math.ceil(num_tokens / self.page_size) - len(seq.pages)
        taken = []
        for _ in range(need):
            page = self.blocks.allocate()
            if page is None:
                for p in taken:
                    self.blocks.release(p)
                return False
            taken.append(page)
        seq.pages.extend(taken)
        return True

    def _release(self, seq: _Sequence) -> None:
        for page in seq.pages:
            self.blocks.release(page)
        seq.pages, seq.num_computed, seq.registered = [], 0, 0

    def _preempt(self, seq: _Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _build_batch(self, scheduled: list[tuple[_Sequence, int]]) -> tuple[PagedBatch, torch.Tensor]:
        P = self.page_size
        idx, positions, prev, slots, logits_rows, ctx_lens, chunks = [], [], [], [], [], [], []
        num_decode = 0
        for row, (seq, n) in enumerate(scheduled):
            start = len(idx)
            for j in range(seq.num_computed, seq.num_computed + n):
                idx.append(seq.tokens[j])
                positions.append(j)
                prev.append(seq.tokens[j - 1] if j > 0 else 0)
                slots.append(seq.pages[j // P] * P + j % P)
            logits_rows.append(len(idx) - 1)
            ctx_lens.append(seq.num_computed + n)
            if n == 1:
                num_decode += 1
            else:
                chunks.append((row, start, n))
        width = max(len(seq.pages) for seq, _ in scheduled)
        # Rows are padded with page 0: entries past a sequence's used pages are never read.
        table = [seq.pages + [0] * (width - len(seq.pages)) for seq, _ in scheduled]
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        batch = PagedBatch(
            cache=self.cache, positions=pos, prev_tokens=torch.tensor(prev, dtype=torch.long, device=dev),
            has_prev=pos > 0, slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_table=torch.tensor(table, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            num_decode=num_decode, chunks=chunks, context_lens=ctx_lens, cos_sin_cache=self.model.cos_sin_cache())
        return batch, torch.tensor([idx], dtype=torch.long, device=dev)

    # ---- sampling and tokens ---------------------------------------------------------------
    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[_Sequence]) -> list[tuple[int, float, tuple]]:
        """logits (S, V) fp32 -> per sequence (token, its log-probability, its top_logprobs
        alternatives), log-probabilities of the model's own distribution. Every row is sampled at
        once on the device (nanofast.sampling: penalties, temperature, top-k, top-p, each row's
        own seeded stream), with one host-to-device copy of the rows' settings and a single
        device-to-host read of the results."""
        S, V = logits.shape
        dev = logits.device
        penalised = [i for i, seq in enumerate(seqs) if seq.counts is not None]
        rows = logits
        if penalised:
            counts = torch.stack([seqs[i].counts for i in penalised])
            weights = torch.tensor([[seqs[i].params.frequency_penalty, seqs[i].params.presence_penalty]
                                    for i in penalised], dtype=torch.float32, device=dev)
            rows = logits.clone()
            rows[penalised] -= weights[:, :1] * counts + weights[:, 1:] * (counts > 0).float()
        hot = [i for i, seq in enumerate(seqs) if seq.params.temperature > 0]
        if len(hot) < S:
            out = rows.argmax(dim=-1)  # greedy rows (temperature 0) need nothing else
        if hot:
            drawn = [seqs[i] for i in hot]
            limits = [top_k_limit(seq.params.top_k, V) for seq in drawn]
            # fp64 holds every setting exactly (seed halves < 2^32): one copy for all of them
            settings = torch.tensor([[seq.params.temperature, k, seq.params.top_p, *split_seed(seq.seed), seq.draws]
                                     for seq, k in zip(drawn, limits)], dtype=torch.float64).to(dev)
            filtered, candidates = ranking(limits, [seq.params.top_p for seq in drawn])
            picked = sample(rows if len(hot) == S else rows[hot], settings[:, 0].float(), settings[:, 1].long(),
                            settings[:, 2].float(), settings[:, 3:5].long(), settings[:, 5].long(),
                            filtered=filtered, candidates=candidates, greedy_rows=False)
            if len(hot) == S:
                out = picked
            else:
                out[hot] = picked
            for seq in drawn:
                seq.draws += 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        columns = [out.double()[:, None], logprobs.gather(1, out[:, None]).double()]
        k = max(seq.params.top_logprobs for seq in seqs)
        if k:
            top = torch.topk(logprobs, min(k, logprobs.size(1)), dim=-1)
            columns += [top.indices.double(), top.values.double()]
        # float64 holds every token id exactly, so ids and log-probs travel in one transfer
        rows = torch.cat(columns, dim=1).tolist()
        width = (len(rows[0]) - 2) // 2  # top alternatives read back per row
        return [(int(r[0]), r[1], tuple((int(r[2 + j]), r[2 + width + j])
                                        for j in range(min(seq.params.top_logprobs, width))))
                for seq, r in zip(seqs, rows)]

    def _append(self, seq: _Sequence, token: int, events: list[TokenEvent], forced: bool = False,
                logprob: float | None = None, top: tuple = ()) -> None:
        """Add a token to seq, emit its event; finish the sequence or run the calculator as due."""
        seq.tokens.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        p = seq.params
        reason = "stop" if (not forced and token in p.stop_token_ids) else (
            "length" if seq.num_generated >= p.max_tokens else None)
        events.append(TokenEvent(seq.id, token, reason is not None, reason, forced, logprob, top))
        if reason is not None:
            self._release(seq)
            self.running.remove(seq)
            return
        if self.tools is None or forced:
            return
        if token == self.tools["python_start"]:
            seq.in_python, seq.python_tokens = True, []
        elif token == self.tools["python_end"] and seq.in_python:
            seq.in_python = False
            result = calculate(self.tokenizer.decode(seq.python_tokens))
            if result is not None:
                out = [self.tools["output_start"], *self.tokenizer.encode(result), self.tools["output_end"]]
                for t in out:
                    self._append(seq, t, events, forced=True)
                    if events[-1].finished:
                        break
        elif seq.in_python:
            seq.python_tokens.append(token)
