"""`python -m nanofast.chat` on a tiny checkpoint saved the way training saves them."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanofast import chat
from nanofast.checkpoint import save_checkpoint
from nanofast.detokenize import answer_parts, display_text, parts_display, truncate_parts
from nanofast.decode_graph import DecodeGraphs
from nanofast.engine import Engine, SamplingParams
from test_serve import stop_ids, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A data root laid out like train.py's: tokenizer/ and checkpoints/sft/."""
    root = tmp_path_factory.mktemp("chatbase")
    tokenizer = tiny_tokenizer()
    tokenizer.save(root / "tokenizer")
    save_checkpoint(root / "checkpoints" / "sft", 5, tiny_model(tokenizer), None, meta={})
    return root


@pytest.fixture(scope="module")
def reference(base):
    """(tokenizer, engine) over the checkpoint as loaded back, for the expected answers."""
    model, tokenizer, _ = chat.load_model(base / "checkpoints" / "sft", None, "cpu")
    return tokenizer, Engine(model, tokenizer)


def answer(reference, prompt: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """Greedy tokens for `prompt` and their text without the stop token."""
    tokenizer, engine = reference
    ids = stop_ids(tokenizer)
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=ids))[0]
    return display_text(tokenizer, out[:-1] if out[-1] in ids else out), out


def user_turn(tokenizer, text: str) -> list[int]:
    sp = tokenizer.encode_special
    return [sp("<|user_start|>"), *tokenizer.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]


def run_main(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = chat.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_default_checkpoint_prefers_sft(base, tmp_path, monkeypatch):
    assert chat.default_checkpoint(base) == base / "checkpoints" / "sft"
    monkeypatch.setenv("NANOFAST_BASE_DIR", str(base))
    assert chat.default_checkpoint() == base / "checkpoints" / "sft"
    assert chat.find_tokenizer_dir(base / "checkpoints" / "sft") == base / "tokenizer"
    assert chat.default_checkpoint(tmp_path) is None


def test_default_checkpoint_of_a_base_dir_is_the_latest_runs(base, tmp_path):
    """train.py writes each run under <base-dir>/runs/<name>: the most recently trained run wins,
    and within it the most post-trained checkpoint."""
    model = tiny_model(tiny_tokenizer())
    save_checkpoint(tmp_path / "runs" / "d2" / "checkpoints" / "sft", 1, model, None, meta={})
    save_checkpoint(tmp_path / "runs" / "d3" / "checkpoints" / "base", 1, model, None, meta={})
    newer = tmp_path / "runs" / "d3" / "checkpoints"
    os.utime(newer / "base", (newer.stat().st_mtime + 10,) * 2)  # its stage folder was written to last
    assert chat.default_checkpoint(tmp_path) == newer / "base"


def test_one_shot_prompt(base, reference, monkeypatch):
    expected, _ = answer(reference, [reference[0].bos_token_id, *user_turn(reference[0], "Hi there")], 10)
    static = []  # a spy: the chat's decode steps run the engine's static decode step
    run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, rows: static.append(len(rows)) or run(self, rows))
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "-p", "Hi there",
                               "--temperature", "0", "--max-tokens", "10"])
    assert code == 0, err
    assert out == expected + "\n" and expected
    assert static and set(static) == {1}


def test_one_shot_as_a_subprocess_with_the_default_checkpoint(base, reference):
    expected, _ = answer(reference, [reference[0].bos_token_id, *user_turn(reference[0], "Hi there")], 8)
    env = dict(os.environ, NANOFAST_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "nanofast.chat", "-p", "Hi there", "--temperature", "0",
                          "--max-tokens", "8", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode("utf-8") == expected + "\n"


def test_interactive_multi_turn_clear_and_quit(base, reference):
    tokenizer = reference[0]
    end = tokenizer.encode_special("<|assistant_end|>")
    first_prompt = [tokenizer.bos_token_id, *user_turn(tokenizer, "hello")]
    first, first_tokens = answer(reference, first_prompt, 6)
    closed = first_tokens[:-1] + [end] if first_tokens[-1] in stop_ids(tokenizer) else first_tokens + [end]
    second, _ = answer(reference, first_prompt + closed + user_turn(tokenizer, "and then?"), 6)
    stdin = "hello\n\nand then?\n/clear\nhello\n/quit\nnever read\n"
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "--temperature", "0",
                               "--max-tokens", "6"], stdin)
    assert code == 0, err
    # the second answer sees the first turn; after /clear the first answer comes again
    assert out == f"{first}\n{second}\n{first}\n"
    assert second != first
    assert "(conversation cleared)" in err


def test_interactive_ends_at_eof_and_sampling_with_a_seed_repeats(base):
    args = ["--checkpoint", str(base / "checkpoints" / "sft"), "--max-tokens", "8", "--seed", "7",
            "--temperature", "1.0"]
    code, out, _ = run_main(args, "hi\nhi\n")
    assert code == 0 and out.endswith("\n") and out.count("\n") >= 2
    assert run_main(args, "hi\nhi\n")[1] == out  # same seed, same answers


def test_conversation_longer_than_the_context_is_refused(base):
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "-p", "word " * 200])
    assert code == 1 and out == ""
    assert "context is 128" in err and "/clear" in err


def test_missing_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFAST_BASE_DIR", str(tmp_path))
    code, out, err = run_main(["-p", "hi"])
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert "run `python train.py --stage all` first or pass --checkpoint" in err
    code, _, err = run_main(["--checkpoint", str(tmp_path / "nope"), "-p", "hi"])
    assert code == 1 and "does not exist" in err


def test_base_dir_finds_the_newest_checkpoint_and_its_error_names_where_to_point(base, reference, tmp_path,
                                                                                monkeypatch):
    """--base-dir (chat and serve) is where the newest checkpoint is looked for; without a
    checkpoint there the one-line error names the flag and NANOFAST_BASE_DIR (issue 30)."""
    monkeypatch.setenv("NANOFAST_BASE_DIR", str(tmp_path / "elsewhere"))
    expected, _ = answer(reference, [reference[0].bos_token_id, *user_turn(reference[0], "Hi there")], 8)
    code, out, err = run_main(["--base-dir", str(base), "-p", "Hi there", "--temperature", "0", "--max-tokens", "8"])
    assert code == 0 and out == expected + "\n", err
    missing = tmp_path / "typo"
    code, out, err = run_main(["--base-dir", str(missing), "-p", "hi"])
    assert code == 1 and out == "" and err.count("\n") == 1
    assert str(missing) in err and "(--base-dir;" in err and "NANOFAST_BASE_DIR" in err and not missing.exists()
    code, _, err = run_main(["-p", "hi"])  # from the environment
    assert code == 1 and "($NANOFAST_BASE_DIR;" in err and str(tmp_path / "elsewhere") in err
    from nanofast import serve

    assert serve.main(["--base-dir", str(missing)]) == 1  # the server: the same lookup, before it listens


def test_tokenizer_must_match_the_checkpoint(base, tmp_path):
    from nanofast.tokenizer import Tokenizer
    from test_serve import TEXTS

    Tokenizer.train(TEXTS, vocab_size=290).save(tmp_path / "other")
    code, _, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "--tokenizer",
                             str(tmp_path / "other"), "-p", "hi"])
    assert code == 1 and "--tokenizer" in err and "300" in err


def test_bad_options_are_rejected():
    with pytest.raises(SystemExit):
        chat.parse_args(["--temperature", "-1"])
    with pytest.raises(SystemExit):
        chat.parse_args(["--max-tokens", "0"])


def test_stopping_a_reply_early_aborts_its_request(reference):
    tokenizer, engine = reference
    prompt = [tokenizer.bos_token_id, *user_turn(tokenizer, "Hi there")]
    params = SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=stop_ids(tokenizer))
    generated: list[int] = []
    pieces = chat.stream_reply(engine, tokenizer, prompt, params, generated)
    next(pieces)
    assert engine.has_unfinished()
    pieces.close()  # what Ctrl-C in the middle of an answer does
    assert not engine.has_unfinished() and engine.blocks.in_use == 0
    assert 0 < len(generated) < 50


def test_ctrl_c_exits_quietly(base):
    class Interrupting(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    out = io.StringIO()
    code = chat.main(["--checkpoint", str(base / "checkpoints" / "sft")], stdin=Interrupting(), stdout=out,
                     stderr=io.StringIO())
    assert code == 130 and out.getvalue() == "\n"


def test_a_nanochat_tokenizer_pickle_loads_and_a_crafted_one_is_refused(tmp_path):
    """nanochat's tokenizer.pkl is a pickled tiktoken Encoding: that loads; a pickle that would
    call anything else is refused in one line before it runs."""
    import pickle

    from nanofast.checkpoint import CheckpointError

    tokenizer = tiny_tokenizer()
    good = tmp_path / "nanochat"
    good.mkdir()
    (good / "tokenizer.pkl").write_bytes(pickle.dumps(tokenizer.enc))
    loaded = chat.load_tokenizer(good)
    assert loaded.encode("Hello there") == tokenizer.encode("Hello there")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "crafted"
    bad.mkdir()
    (bad / "tokenizer.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="would construct posix.system when loaded: refused") as e:
        chat.load_tokenizer(bad)
    assert "\n" not in str(e.value) and not marker.exists()



def test_special_tokens_are_shown_readably_never_as_machine_tokens(reference):
    """The calculator call and its result read as one block; other special tokens show as nothing."""
    tokenizer = reference[0]
    sp = tokenizer.encode_special
    ids = [*tokenizer.encode("The sum is "), sp("<|python_start|>"), *tokenizer.encode("19*2"), sp("<|python_end|>"),
           sp("<|output_start|>"), *tokenizer.encode("38"), sp("<|output_end|>"), *tokenizer.encode(". Done"),
           sp("<|user_start|>"), sp("<|bos|>")]
    assert display_text(tokenizer, ids) == "The sum is [calculator: 19*2 = 38]. Done"
    assert display_text(tokenizer, ids, dim=True) == "The sum is \x1b[2m[calculator: 19*2 = 38]\x1b[0m. Done"
    assert "<|" not in display_text(tokenizer, list(range(tokenizer.vocab_size)))


def test_a_long_conversation_drops_its_oldest_exchanges_and_goes_on(base):
    """Ten turns in a 128-token context: the default answer budget (a quarter of the context)
    leaves room, the oldest exchanges are dropped with a notice, and no turn is refused."""
    assert chat.default_answer_tokens(128) == 32 and chat.default_answer_tokens(100_000) == 512
    stdin = "".join(f"tell me about the number {i} please\n" for i in range(10))
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "--temperature", "0"], stdin)
    assert code == 0 and out.count("\n") == 10, err
    assert "error" not in err and "(context full: dropped the" in err
    cuts = re.findall(r"\[answer cut at (\d+) tokens: (--max-tokens|the model's context)\]", err)
    assert all(int(n) <= 32 for n, _ in cuts)


def test_a_cut_answer_is_marked(base):
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft"), "-p", "Hi", "--max-tokens", "1"])
    assert code == 0 and "[answer cut at 1 tokens: --max-tokens]" in err


def test_help_is_answered_by_the_cli_not_the_model(base):
    code, out, err = run_main(["--checkpoint", str(base / "checkpoints" / "sft")], "/help\n/quit\n")
    assert code == 0 and out == "" and err.count(chat.HELP) == 2  # the banner and /help


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(base, reference):
    """The first Ctrl-C (here: while the answer is written) stops that answer and frees its
    request; the next message is answered; the stopped answer stays in the conversation."""

    class InterruptOnce(io.StringIO):
        fired = False

        def write(self, text):
            if text.strip() and not InterruptOnce.fired:
                InterruptOnce.fired = True
                raise KeyboardInterrupt
            return super().write(text)

    out, err = InterruptOnce(), io.StringIO()
    code = chat.main(["--checkpoint", str(base / "checkpoints" / "sft"), "--temperature", "0", "--max-tokens", "4"],
                     stdin=io.StringIO("hello\nhello again\n"), stdout=out, stderr=err)
    assert code == 0 and InterruptOnce.fired and "(stopped)" in err.getvalue()
    assert out.getvalue().count("\n") == 2 and out.getvalue().split("\n")[1]  # the second answer came
