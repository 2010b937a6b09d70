"""Encode throughput: nanofast's batched encode versus encoding documents one by one.

Run with `python -m pytest bench/test_bench_tokenizer.py --benchmark-only`. Both variants encode
the same documents with the same tokenizer in the same run; `extra_info` records bytes/s and
chars/s so the two rows can be compared directly.
"""
import pytest

from bench.workloads import split_documents, tokenizer_sources
from nanofast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup() -> tuple[Tokenizer, list[str]]:
    """A small tokenizer trained once, and ~1 MB of documents to encode."""
    sources = tokenizer_sources()
    tok = Tokenizer.train(sources, vocab_size=4096)
    docs = split_documents("\n".join(sources))
    return tok, docs


def record(benchmark, docs: list[str]) -> None:
    seconds = benchmark.stats.stats.mean
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    benchmark.extra_info.update(docs=len(docs), bytes=n_bytes, bytes_per_s=n_bytes / seconds,
                                chars_per_s=sum(map(len, docs)) / seconds)


@pytest.mark.benchmark(group="tokenizer-encode")
def test_encode_batched(benchmark, setup):
    tok, docs = setup
    rows = benchmark.pedantic(tok.encode, args=(docs,), kwargs={"prepend": "<|bos|>"},
                              rounds=5, warmup_rounds=1)
    assert len(rows) == len(docs) and all(r[0] == tok.bos_token_id for r in rows)
    record(benchmark, docs)


@pytest.mark.benchmark(group="tokenizer-encode")
def test_encode_one_by_one_baseline(benchmark, setup):
    tok, docs = setup

    def loop() -> list[list[int]]:  # what a caller writes without a batch API
        return [[tok.bos_token_id] + tok.encode(d) for d in docs]

    rows = benchmark.pedantic(loop, rounds=5, warmup_rounds=1)
    assert rows == tok.encode(docs, prepend="<|bos|>")  # same tokens as the batched path
    record(benchmark, docs)
