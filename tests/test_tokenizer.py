"""Tests for nanofast.tokenizer: training, encoding, persistence, chat rendering, compression."""
import importlib
import inspect
import json
import threading
import time

import pytest
import tiktoken
import torch

from nanofast.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer,
                                compression_report, compression_table)

VOCAB = 1024
STDLIB_MODULES = ["textwrap", "argparse", "inspect", "dataclasses", "json.decoder", "difflib", "string",
                  "functools", "pathlib"]
AWKWARD = [
    "",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\n\nnewlines\r\n   \n",
    "12345 and 2024-01-31 and 3.14159",
    "naïve café Straße Ελληνικά 日本語のテキスト",
    "emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "<|bos|> looks special but is plain text <|assistant_end|>",
    "\x00\x01 control bytes \u200b zero width",
    " " * 17 + "x",
]


def corpus() -> list[str]:
    """Deterministic training text: a few stdlib sources plus some non-ASCII prose."""
    texts = [open(inspect.getsourcefile(importlib.import_module(m)), encoding="utf-8").read()
             for m in STDLIB_MODULES]
    texts += ["Größe, Übung, café, naïve, 東京, 😀 " * 20, "12 34 56 78 90 1234 5678 " * 50]
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=VOCAB)


def ranks(t: Tokenizer) -> dict[bytes, int]:
    return t.enc._mergeable_ranks


# ------------------------------------------------------------------------------------------------
# training and vocabulary


def test_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert len(ranks(tok)) == VOCAB - len(SPECIAL_TOKENS)
    assert all(ranks(tok)[bytes([b])] == b for b in range(256))
    for i, name in enumerate(SPECIAL_TOKENS):  # specials are single ids, in order, at the end
        assert tok.encode_special(name) == VOCAB - len(SPECIAL_TOKENS) + i
        assert tok.id_to_token(tok.encode_special(name)) == name
    assert tok.bos_token_id == VOCAB - len(SPECIAL_TOKENS) == tok.encode_special("<|bos|>")
    assert tok.enc._pat_str == SPLIT_PATTERN


def test_numbers_split_into_pairs(tok):
    assert r"\p{N}{1,2}" in SPLIT_PATTERN
    digit_tokens = [t for t in ranks(tok) if t.isdigit()]
    assert b"12" in digit_tokens  # the corpus has plenty of digit pairs...
    assert max(map(len, digit_tokens)) == 2  # ...but no token may span three digits
    pieces = [tok.id_to_token(i) for i in tok.encode("12345")]
    assert pieces == ["12", "34", "5"]


def test_doc_cap_limits_what_training_sees():
    doc = "hello world " * 100 + "zq" * 5000
    capped = Tokenizer.train(corpus() + [doc], vocab_size=300, doc_cap=1000)
    full = Tokenizer.train(corpus() + [doc], vocab_size=300)
    assert not any(b"zq" in t for t in ranks(capped))
    assert b"zqzq" in ranks(full)


@pytest.mark.parametrize("vocab_size", [265, 0, 1000.0, True])
def test_train_rejects_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 266"):
        Tokenizer.train(["some text"], vocab_size=vocab_size)


@pytest.mark.parametrize("texts", [[], iter([]), ["", ""]])
def test_train_rejects_empty_text(texts):
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(texts, vocab_size=300)


def test_train_rejects_too_little_text_and_bad_input():
    with pytest.raises(ValueError, match="training text too small"):
        Tokenizer.train(["ab ab"], vocab_size=1024)
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("a string", vocab_size=300)
    with pytest.raises(TypeError, match="training document 1 is bytes"):
        Tokenizer.train(["ok", b"bytes"], vocab_size=300)
    with pytest.raises(ValueError, match="doc_cap must be a positive int"):
        Tokenizer.train(["ok"], vocab_size=300, doc_cap=0)


# ------------------------------------------------------------------------------------------------
# encoding and decoding


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.bos_token_id for i in ids)  # never a special id
    assert tok.decode(ids) == text


def test_encode_does_not_interpret_specials(tok):
    ids = tok.encode("<|bos|>")
    assert tok.bos_token_id not in ids and len(ids) > 1


def test_compresses_training_like_text(tok):
    text = inspect.getsource(json.decoder)
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_batch_equals_single(tok):
    batch = tok.encode(AWKWARD, num_threads=2)
    assert batch == [tok.encode(t) for t in AWKWARD]
    assert tok.encode([]) == []


def test_prepend_append(tok):
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    body = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hi there", prepend=bos, append=end) == [bos] + body + [end]
    assert tok.encode(["hi there", ""], prepend="<|bos|>", append="<|assistant_end|>") == \
        [[bos] + body + [end], [bos, end]]


def test_encode_errors(tok):
    with pytest.raises(ValueError, match="unknown special token '<\\|eos\\|>'; valid names: <\\|bos\\|>"):
        tok.encode_special("<|eos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="prepend must be a special-token name or an id"):
        tok.encode("x", prepend=VOCAB)
    with pytest.raises(TypeError, match="encode expects a str or a list of str, got bytes"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="got list"):
        tok.encode(["ok", 3])
    with pytest.raises(ValueError, match="decode got an id outside"):
        tok.decode([VOCAB + 5])
    with pytest.raises(ValueError, match="decode got an id outside"):
        tok.decode([-1])


def test_id_to_token(tok):
    assert tok.id_to_token(ord("a")) == "a"
    assert tok.id_to_token(0xE2) == "\ufffd"  # a lone lead byte of a multi-byte character


# ------------------------------------------------------------------------------------------------
# token_bytes and persistence


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert (tb[:256] == 1).all() and (tb[tok.bos_token_id:] == 0).all()
    assert (tb[256:tok.bos_token_id] >= 2).all()
    for text in AWKWARD:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    tb[0] = 99  # callers get a copy
    assert tok.token_bytes()[0] == 1


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert torch.equal(torch.load(tmp_path / "tok" / TOKEN_BYTES_FILE, weights_only=True), tok.token_bytes())
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size and ranks(loaded) == ranks(tok)
    assert loaded.encode(AWKWARD) == tok.encode(AWKWARD)
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    big = inspect.getsource(inspect)
    assert loaded.encode(big) == tok.encode(big)


def test_load_missing(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*: run `python train.py --stage tokenizer` first"):
        Tokenizer.load(tmp_path / "nowhere")
    tok.save(tmp_path / "tok")
    (tmp_path / "tok" / TOKEN_BYTES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "tok")


def corrupt_json(state: dict) -> None:
    state["tokens"][300] = state["tokens"][301]  # a duplicate token


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text("{not json"),
    lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
    lambda p: p.write_text(json.dumps({"format": "something-else"})),
    lambda p: p.write_text(p.read_text().replace('"<|bos|>"', '"<|BOS|>"')),
    lambda p: p.write_text(p.read_text().replace('"tokens": ["', '"tokens": ["!!')),
    lambda p: p.write_text(json.dumps((lambda s: (corrupt_json(s), s)[1])(json.loads(p.read_text())))),
], ids=["bad-json", "binary", "wrong-format", "wrong-specials", "bad-base64", "duplicate-token"])
def test_load_corrupt_tokenizer_file(tok, tmp_path, damage):
    tok.save(tmp_path)
    damage(tmp_path / TOKENIZER_FILE)
    with pytest.raises(ValueError, match=f"corrupt tokenizer file .*{TOKENIZER_FILE}"):
        Tokenizer.load(tmp_path)


def test_load_corrupt_token_bytes(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / TOKEN_BYTES_FILE).write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match=f"corrupt tokenizer file .*{TOKEN_BYTES_FILE}"):
        Tokenizer.load(tmp_path)
    torch.save(torch.zeros(VOCAB, dtype=torch.int32), tmp_path / TOKEN_BYTES_FILE)
    with pytest.raises(ValueError, match=f"{TOKEN_BYTES_FILE}: does not match"):
        Tokenizer.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# chat rendering

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "print(6*7)"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_render(tok):
    """The rendering spelled out piece by piece: (ids, mask) built independently of _render."""
    sp, enc = tok.encode_special, tok.encode
    pieces = [
        ([tok.bos_token_id], 0),
        ([sp("<|user_start|>")], 0), (enc("You are terse.\n\nWhat is 6*7?"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0),
        (enc("Let me compute."), 1),
        ([sp("<|python_start|>")], 1), (enc("print(6*7)"), 1), ([sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")], 0), (enc("42"), 0), ([sp("<|output_end|>")], 0),
        (enc("It is 42."), 1),
        ([sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")], 0), (enc("Thanks!"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0), (enc("You're welcome."), 1), ([sp("<|assistant_end|>")], 1),
    ]
    ids = [i for p, _ in pieces for i in p]
    mask = [m for p, m in pieces for _ in p]
    return ids, mask


def test_render_conversation(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert (ids, mask) == expected_render(tok)
    assert CONVERSATION["messages"][1]["content"] == "What is 6*7?"  # input left untouched
    shown = tok.visualize(ids, mask, color=False)
    assert "[<|python_start|>]" in shown and "|<|output_start|>|" in shown
    assert "\033[32m" in tok.visualize(ids, mask)


def test_render_without_system(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    assert ids == [tok.bos_token_id, sp("<|user_start|>"), *tok.encode("hi"), sp("<|user_end|>"),
                   sp("<|assistant_start|>"), *tok.encode("yo"), sp("<|assistant_end|>")]
    assert mask == [0] * (3 + len(tok.encode("hi"))) + [0] + [1] * (len(tok.encode("yo")) + 1)


def test_render_truncates(tok):
    full_ids, full_mask = expected_render(tok)
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert ids == full_ids[:7] and mask == full_mask[:7]
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        tok.render_conversation(CONVERSATION, max_tokens=0)


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONVERSATION)
    full_ids, _ = expected_render(tok)
    cut = len(full_ids) - len(tok.encode("You're welcome.")) - 1  # up to and including assistant_start
    assert ids == full_ids[:cut]
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert len(CONVERSATION["messages"]) == 5  # input left untouched
    with pytest.raises(ValueError, match="last message \\(3\\) to be the assistant turn"):
        tok.render_for_completion({"messages": CONVERSATION["messages"][:4]})


def user(text):
    return {"role": "user", "content": text}


def assistant(content):
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty 'messages' list"),
    ([assistant("hi")], "message 0 has role 'assistant', expected 'user'"),
    ([user("a"), user("b")], "message 1 has role 'user', expected 'assistant'"),
    ([user("a"), assistant("b"), assistant("c")], "message 2 has role 'assistant'"),
    ([{"role": "system", "content": "s"}, assistant("b")], "message 1 must be a user message"),
    ([user("a"), assistant("b"), {"role": "system", "content": "s"}], "message 2 has role 'system'"),
    ([user("a"), {"role": "tool", "content": "b"}], "message 1 has role 'tool'"),
    ([user(["a"])], "message 0 \\(user\\) must have str content"),
    ([user("a"), assistant(5)], "message 1 \\(assistant\\) content must be a str or a list"),
    ([user("a"), assistant([{"type": "image", "text": "x"}])], "message 1 part 0 must be"),
    ([user("a"), {"content": "b"}], "message 1 must be a dict with 'role' and 'content'"),
])
def test_render_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_visualize_length_mismatch(tok):
    with pytest.raises(ValueError, match="differ in length"):
        tok.visualize([1, 2], [1])


# ------------------------------------------------------------------------------------------------
# compression report


def test_compression_report_offline(tok, tmp_path, monkeypatch):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: references are missing
    reader = tiktoken.load.read_file
    texts = corpus()[:3]
    start = time.perf_counter()
    report = compression_report(tok, texts, references=("gpt2", "cl100k_base", "no_such_encoding"))
    assert time.perf_counter() - start < 10
    ours = report["encodings"]["nanofast"]
    assert report["bytes"] == sum(len(t.encode()) for t in texts)
    assert ours["tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert ours["bytes_per_token"] > 1 and ours["reason"] is None
    for name in ("gpt2", "cl100k_base"):
        assert report["encodings"][name] == {"tokens": None, "bytes_per_token": None,
                                             "reason": "not available offline"}
    assert report["encodings"]["no_such_encoding"]["reason"].startswith("unknown to tiktoken")
    assert tiktoken.load.read_file is reader  # the network guard was removed again
    assert list(tmp_path.iterdir()) == []  # and nothing was fetched into the cache
    table = compression_table(report)
    assert "| nanofast |" in table and "| gpt2 | - | - | not available offline |" in table


def test_compression_report_hanging_lookup_times_out(tok, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: release.wait(10))
    try:
        start = time.perf_counter()
        report = compression_report(tok, ["some text"], references=("gpt2",), timeout_s=0.2)
        assert time.perf_counter() - start < 2
        assert report["encodings"]["gpt2"]["reason"] == "not available offline (lookup timed out)"
    finally:
        release.set()


def test_compression_report_bad_input(tok):
    with pytest.raises(TypeError, match="texts must be a list of str"):
        compression_report(tok, "a str")
    with pytest.raises(ValueError, match="needs non-empty texts"):
        compression_report(tok, [""], references=())
