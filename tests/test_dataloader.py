"""BOS-aligned best-fit packing, rank sharding and exact resume: nanofast/dataloader.py."""
import gc
import json
import random
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanofast.dataloader import PackedLoader
from nanofast.dataset import write_default_corpus

BOS = 0


class ByteTokenizer:
    """Byte-level stand-in for the real tokenizer: id = byte + 1, BOS = 0."""
    bos_token_id = BOS

    def encode(self, texts, prepend=None, num_threads=1):
        head = [] if prepend is None else [prepend]
        return [head + [b + 1 for b in text.encode("utf-8")] for text in texts]


def decode(ids) -> str:
    return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")


def write_corpus(data_dir, layout, seed=0, long_every=7, max_len=60):
    """Shards of row groups of unique documents 'd<n>:<words>'; layout[f][g] = rows in row group g
    of file f. Every `long_every`-th document is longer than the rows used below, so that it can
    only ever be cropped and lingers in the buffer across row groups and epochs."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    docs, n = [], 0
    for f, row_groups in enumerate(layout):
        with pq.ParquetWriter(data_dir / f"shard_{f:05d}.parquet", pa.schema([("text", pa.string())])) as w:
            for rows in row_groups:
                texts = []
                for _ in range(rows):
                    size = rng.randint(150, 300) if n % long_every == long_every - 1 else rng.randint(2, max_len)
                    texts.append(f"d{n}:" + "".join(rng.choice("abcdefgh ") for _ in range(size)))
                    n += 1
                w.write_table(pa.table({"text": texts}))
                docs += texts
    return docs


def segments(row):
    """Split a packed row (list of ids) at BOS positions into documents."""
    starts = [i for i, t in enumerate(row) if t == BOS]
    assert starts and starts[0] == 0
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def full_rows(x, y):
    return torch.cat([x, y[:, -1:]], dim=1).tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    # train: file 0 has 3 row groups, file 1 has 2 (global 0-4); file 2 is the val shard
    docs = write_corpus(tmp_path, [[12, 10, 12], [11, 12], [12, 9]])
    return tmp_path, docs


def test_rows_start_with_bos_and_targets_shift(corpus):
    data_dir, _ = corpus
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=4, seq_len=32, buffer_docs=16) as loader:
        for x, y, state in take(loader, 20):
            assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
            assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
            assert (x[:, 0] == BOS).all()
            assert torch.equal(y[:, :-1], x[:, 1:])
            json.dumps(state)  # JSON-able


def test_rows_hold_whole_documents_then_one_crop(corpus):
    data_dir, docs = corpus
    known = set(docs)
    whole = []
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=96, buffer_docs=16, loop=False) as loader:
        for x, y, _ in loader:
            for row in full_rows(x, y):
                *complete, last = segments(row)
                assert all(decode(p[1:]) in known for p in complete)  # whole documents...
                text = decode(last[1:])
                if text in known:
                    complete.append(last)  # it happened to fit exactly
                else:
                    assert any(doc.startswith(text) for doc in docs)  # ...then a document's prefix
                whole += [decode(p[1:]) for p in complete]
    assert len(whole) == len(set(whole)) > 20  # no document is packed twice in one pass


def reference_rows(row_groups, buffer_docs, capacity):
    """Plain list-scan best fit, written for clarity: the loader must produce the same rows."""
    stream, buffer, rows = iter(row_groups), [], []
    while True:
        row = []
        while len(row) < capacity:
            while len(buffer) < buffer_docs and (chunk := next(stream, None)) is not None:
                buffer += chunk
            if not buffer:
                return rows  # out of documents: the partial row is dropped
            space = capacity - len(row)
            fitting = [i for i, doc in enumerate(buffer) if len(doc) <= space]
            if fitting:  # the largest that fits, the oldest among equals
                pick = max(fitting, key=lambda i: (len(buffer[i]), -i))
            else:  # the shortest, the oldest among equals, cropped
                pick = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
            row += buffer.pop(pick)[:space]
        rows.append(row)


@pytest.mark.parametrize("buffer_docs,seq_len", [(1, 40), (24, 63), (100, 200)])
def test_packing_matches_reference_best_fit(corpus, buffer_docs, seq_len):
    data_dir, docs = corpus
    tok = ByteTokenizer()
    sizes = [12, 10, 12, 11, 12]  # rows per train row group, as written by the fixture
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    row_groups = [tok.encode(docs[a:b], prepend=BOS) for a, b in zip(bounds, bounds[1:])]
    expected = reference_rows(row_groups, buffer_docs, seq_len + 1)
    with PackedLoader(tok, data_dir, batch_size=1, seq_len=seq_len, buffer_docs=buffer_docs, loop=False) as loader:
        rows = [full_rows(x, y)[0] for x, y, _ in loader]
    assert len(rows) == len(expected) > 3
    assert rows == expected


def test_best_fit_order_on_a_hand_checked_example(tmp_path):
    # token lengths (text + BOS): 4, 7, 3, 12, 2, 5, 3 ; one row is T + 1 = 10 tokens
    texts = ["aaa", "bbbbbb", "cc", "d" * 11, "e", "ffff", "gg"]
    for name, rows in [("shard_00000.parquet", texts), ("shard_00001.parquet", ["val"])]:
        pq.write_table(pa.table({"text": rows}), tmp_path / name)
    with PackedLoader(ByteTokenizer(), tmp_path, batch_size=1, seq_len=9, buffer_docs=100, loop=False) as loader:
        rows = [[decode(p[1:]) for p in segments(full_rows(x, y)[0])] for x, y, _ in loader]
    assert rows == [
        ["bbbbbb", "cc"],  # largest that fits (7), then 3: the older of the two 3-token docs
        ["ffff", "aaa", ""],  # 5 + 4 leaves 1: nothing fits, so the shortest ("e") is cropped to its BOS
        ["gg", "d" * 6],  # 3 leaves 7: only the 12-token doc is left, cropped to 7 tokens
    ]  # and then the documents have run out: loop=False stops (no partial batch)


def test_ranks_read_disjoint_row_groups(corpus):
    data_dir, docs = corpus
    sizes = [12, 10, 12, 11, 12]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    seen = []
    for rank in range(2):
        mine = {d for g in range(rank, 5, 2) for d in docs[bounds[g]:bounds[g + 1]]}
        whole = set()
        with PackedLoader(ByteTokenizer(), data_dir, batch_size=1, seq_len=96, rank=rank, world_size=2,
                          buffer_docs=8) as loader:
            for x, y, state in loader:
                if state["epoch"] > 3:  # later epochs must keep to the rank's share too
                    break
                assert state["rank"] == rank
                for part in segments(full_rows(x, y)[0]):
                    text = decode(part[1:])
                    whole |= {text} & set(docs)
                    assert any(doc.startswith(text) for doc in mine)  # crops too come from own row groups
        assert whole and whole <= mine
        seen.append(whole)
    assert seen[0].isdisjoint(seen[1])


def test_exact_resume_across_shard_and_epoch_boundaries(corpus):
    data_dir, _ = corpus
    args = dict(batch_size=2, seq_len=64, buffer_docs=16)
    n, ahead = 60, 5
    with PackedLoader(ByteTokenizer(), data_dir, **args) as loader:
        run = take(loader, n + ahead)
    states = [s for _, _, s in run]
    # The run must exercise what makes resuming hard, or the comparison below proves little.
    assert states[n]["epoch"] >= 3
    assert any(a["next_row_group"] <= 3 < b["next_row_group"] for a, b in zip(states, states[1:]))  # file 0 -> 1
    assert any(e < s["epoch"] for s in states for e, _, _ in s["buffer"])  # a doc outlived its epoch
    assert max(len(json.dumps(s)) for s in states) < 1000  # references, not tokens
    for k in range(n):
        state = json.loads(json.dumps(states[k]))  # as if saved in a checkpoint
        with PackedLoader(ByteTokenizer(), data_dir, **args, state=state) as resumed:
            for j in range(k + 1, k + 1 + ahead):
                x, y, s = next(resumed)
                assert torch.equal(x, run[j][0]) and torch.equal(y, run[j][1]), (k, j)
                assert s == states[j]


def test_resume_with_two_ranks_and_a_new_batch_size(corpus):
    data_dir, _ = corpus
    args = dict(seq_len=32, rank=1, world_size=2, buffer_docs=8)
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, **args) as loader:
        run = take(loader, 30)
    rows = torch.cat([x for x, _, _ in run])  # (60, 32): the row stream
    for k in [3, 11, 20]:
        with PackedLoader(ByteTokenizer(), data_dir, batch_size=3, state=run[k][2], **args) as resumed:
            x, _, _ = next(resumed)  # the row stream does not depend on the batch size
            assert torch.equal(x, rows[2 * (k + 1):2 * (k + 1) + 3])


def test_state_is_the_consumers_position_not_the_prefetchers(corpus):
    data_dir, _ = corpus
    runs = []
    for prefetch in [1, 8]:
        with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=64, buffer_docs=16,
                          prefetch=prefetch) as loader:
            next(loader)
            threading.Event().wait(0.2)  # let the reader run ahead as far as the queue allows
            runs.append([s for _, _, s in take(loader, 10)])
    assert runs[0] == runs[1]


def test_val_split_is_finite_without_loop(corpus):
    data_dir, docs = corpus
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=32, split="val", loop=False) as loader:
        batches = list(loader)
        with pytest.raises(StopIteration):
            next(loader)
    tokens = sum(len(d.encode()) + 1 for d in docs[-21:])  # the val shard's 12 + 9 documents
    assert 0 < len(batches) * 2 * 33 <= tokens
    assert all(s["split"] == "val" and s["epoch"] == 1 for _, _, s in batches)
    assert not loader._thread.is_alive()
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=32, split="val") as looping:
        assert take(looping, 3 * len(batches) + 3)[-1][2]["epoch"] > 1  # loop=True repeats


def test_default_corpus_end_to_end(tmp_path):
    write_default_corpus(tmp_path, max_chars=300_000)
    with PackedLoader(ByteTokenizer(), tmp_path, batch_size=2, seq_len=256, world_size=2, rank=1) as loader:
        for x, y, _ in take(loader, 5):
            assert (x[:, 0] == BOS).all() and torch.equal(y[:, :-1], x[:, 1:])
            assert all(decode(part[1:]).isprintable() or "\n" in decode(part[1:])
                       for row in full_rows(x, y) for part in segments(row))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_batches(corpus):
    data_dir, _ = corpus
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=32, device="cuda") as loader:
        x, y, _ = next(loader)
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=2, seq_len=32) as loader:
        cx, cy, _ = next(loader)
    assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def test_close_stops_the_reader_thread(corpus):
    data_dir, _ = corpus
    loader = PackedLoader(ByteTokenizer(), data_dir, batch_size=1, seq_len=16, prefetch=1)
    next(loader)
    assert loader._thread.daemon and loader._thread.is_alive()
    loader.close()  # the reader is blocked on a full queue: close must still end it
    assert not loader._thread.is_alive()
    loader.close()  # idempotent
    with PackedLoader(ByteTokenizer(), data_dir, batch_size=1, seq_len=16) as ctx:
        next(ctx)
    assert not ctx._thread.is_alive()
    forgotten = PackedLoader(ByteTokenizer(), data_dir, batch_size=1, seq_len=16, prefetch=1)
    next(forgotten)
    thread = forgotten._thread
    del forgotten  # never closed: the thread must not keep the loader (and itself) alive
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_argument_and_state_errors(corpus, tmp_path):
    data_dir, _ = corpus
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1"):
        PackedLoader(tok, data_dir, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1"):
        PackedLoader(tok, data_dir, batch_size=2, seq_len=0)
    for rank, world_size in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
            PackedLoader(tok, data_dir, batch_size=2, seq_len=8, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="rank 5 of 6 would get no data"):
        PackedLoader(tok, data_dir, batch_size=2, seq_len=8, rank=5, world_size=6)
    with pytest.raises(ValueError, match="unknown split"):
        PackedLoader(tok, data_dir, batch_size=2, seq_len=8, split="test")
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        PackedLoader(tok, tmp_path / "empty", batch_size=2, seq_len=8)

    with PackedLoader(tok, data_dir, batch_size=2, seq_len=8) as loader:
        _, _, state = next(loader)
    mismatches = [(dict(split="val"), "split='train'"), (dict(world_size=2), "world_size=1"),
                  (dict(seq_len=16), "seq_len=8"), (dict(buffer_docs=10), "buffer_docs=1000")]
    for kwargs, message in mismatches:
        with pytest.raises(ValueError, match=f"loader state has {message}"):
            PackedLoader(tok, data_dir, **{"batch_size": 2, "seq_len": 8, **kwargs}, state=state)
    with pytest.raises(ValueError, match="loader state has row_groups=4 .* data the state was saved with"):
        PackedLoader(tok, data_dir, batch_size=2, seq_len=8, state={**state, "row_groups": 4})
    for bad in [{"tokens": [1, 2]}, {**state, "buffer": [[1, "x"]]}]:
        with pytest.raises(ValueError, match="PackedLoader state"):
            PackedLoader(tok, data_dir, batch_size=2, seq_len=8, state=bad)

    class NoBos(ByteTokenizer):
        def encode(self, texts, prepend=None, num_threads=1):
            return super().encode(texts, None, num_threads)

    with PackedLoader(NoBos(), data_dir, batch_size=2, seq_len=8) as loader:
        with pytest.raises(ValueError, match="each starting with the BOS id"):
            next(loader)


# ---- conversations (mid-training / SFT) -----------------------------------------------------------

from nanofast.dataloader import ConversationLoader  # noqa: E402


@pytest.fixture(scope="module")
def chat_tokenizer():
    import inspect

    from nanofast.tokenizer import Tokenizer

    return Tokenizer.train([inspect.getsource(m) for m in (json, random, threading)], vocab_size=400)


def _conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": f"q{i} " + " ".join(rng.choices(words, k=rng.randint(1, 12)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))})
        out.append({"messages": turns})
    return out


def test_conversation_rows_hold_whole_conversations_and_train_only_assistant_tokens(chat_tokenizer):
    convs = _conversations(40)
    rendered = dict(tuple(map(tuple, chat_tokenizer.render_conversation(c, max_tokens=97))) for c in convs)
    loader = ConversationLoader(chat_tokenizer, convs, batch_size=1, seq_len=96, loop=False, buffer_size=8)
    seen = []
    bos = chat_tokenizer.bos_token_id
    for x, y, _ in loader:
        assert x.shape == y.shape == (1, 96)
        for row, row_y in zip(x.tolist(), y.tolist()):
            assert row[0] == bos
            # Split at BOS tokens: each piece is a whole conversation or padding; the last piece may
            # end one token early (the row's final token is only visible as a target).
            starts = [i for i, t in enumerate(row) if t == bos]
            pieces = [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]
            mask = []
            for j, piece in enumerate(pieces):
                if piece == [bos]:  # padding (no conversation is a lone BOS)
                    mask += [0]
                    continue
                match = [k for k in rendered if (k == tuple(piece)) or
                         (j == len(pieces) - 1 and len(k) == len(piece) + 1 and k[:-1] == tuple(piece))]
                assert match, "a split or foreign conversation"
                seen.append(match[0])
                mask += list(rendered[match[0]])
            mask += [0] * (97 - len(mask))  # the row's final token was padding
            # trained targets are exactly the conversation masks' 1s (shifted by one)
            assert [t >= 0 for t in row_y] == [bool(m) for m in mask[1:97]]
    assert sorted(seen) == sorted(rendered)  # one epoch: every conversation exactly once (none dropped)


def test_conversation_loader_exact_resume_and_disjoint_ranks(chat_tokenizer):
    convs = _conversations(30, seed=1)
    a = ConversationLoader(chat_tokenizer, convs, batch_size=2, seq_len=64, seed=3)
    batches = [next(a) for _ in range(25)]  # crosses epochs
    for k in (0, 7, 13, 20):
        b = ConversationLoader(chat_tokenizer, convs, batch_size=2, seq_len=64, seed=3,
                               state=json.loads(json.dumps(batches[k][2])))
        for want in batches[k + 1:k + 5]:
            got = next(b)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    firsts = []
    for rank in range(3):
        loader = ConversationLoader(chat_tokenizer, convs, batch_size=1, seq_len=200, rank=rank, world_size=3,
                                    loop=False)
        firsts.append({tuple(x[0].tolist()) for x, _, _ in loader})
    assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2])


def test_long_conversations_are_cut_and_errors(chat_tokenizer):
    long = [{"messages": [{"role": "user", "content": "alpha " * 200}, {"role": "assistant", "content": "beta"}]}]
    x, y, _ = next(ConversationLoader(chat_tokenizer, long, batch_size=1, seq_len=16))
    assert x.shape == (1, 16) and (y == -1).all()  # the assistant's answer was cut off: nothing to train
    with pytest.raises(ValueError, match="batch_size"):
        ConversationLoader(chat_tokenizer, long, batch_size=0, seq_len=16)
    with pytest.raises(ValueError, match="cannot feed 2 ranks"):
        ConversationLoader(chat_tokenizer, long, batch_size=1, seq_len=16, rank=1, world_size=2)
    with pytest.raises(ValueError, match="state must be"):
        ConversationLoader(chat_tokenizer, long, batch_size=1, seq_len=16, state={"epoch": 0})
