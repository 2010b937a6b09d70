"""The CORE metric: nanofast/core_eval.py, checked against an unbatched reference that renders prompts
with an independently written reference, an oracle model, and a local HTTP server for the bundle download."""
import csv
import io
import json
import os
import random
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
import yaml

from nanofast.core_eval import (CoreTask, build_candidates, centered_accuracy, ensure_bundle, evaluate_core,
                                load_core_tasks, offline_core_tasks, render_prompts, sample_fewshot, score_example,
                                task_examples)
from nanofast.dataset import stdlib_documents
from nanofast.download import DownloadError
from nanofast.model import GPT, config_for_depth
from nanofast.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# fixtures: a tiny tokenizer, a tiny random GPT, a small bundle on disk


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(stdlib_documents(max_doc_chars=2000)[:200], vocab_size=400)


def tiny_gpt(tok: Tokenizer, sequence_len: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, vocab_size=tok.vocab_size, sequence_len=sequence_len, head_dim=64))
    model.init_weights()
    with torch.no_grad():  # the real init zeroes projections and nearly zeroes lm_head: near-tied losses
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return tiny_gpt(tok)


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
OBJECTS = ["apple", "book", "cup", "drum", "egg", "flute", "glove", "hat", "ink", "jar"]

MC_ROWS = [{"query": f"Question {i}: which word is number {i % 4} in the list?",
            "choices": ["alpha", "bravo", "charlie", "delta"], "gold": i % 4} for i in range(10)]
SCHEMA_ROWS = [{"context_options": [f"Tom put the {o} in the box because it was", f"Tom put the {o} in the bag because it was"],
                "continuation": f"too {'small' if i % 3 else 'big'}.", "gold": i % 2} for i, o in enumerate(OBJECTS)]
LM_ROWS = [{"context": f"  Spell it out: {w} has", "continuation": f"{len(w)} letters"} for w in WORDS]
BASELINES = {"tiny_mc": 25.0, "tiny_schema": 50.0, "tiny_lm": 0.0}


def write_bundle(root, icl_key: bool = True):
    """A bundle in the eval_bundle layout: core.yaml, eval_meta_data.csv, eval_data/**.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"label": "tiny_mc", "dataset_uri": "tiny/mc.jsonl", "num_fewshot": [1], "icl_task_type": "multiple_choice",
         "continuation_delimiter": "\nAnswer: "},
        {"label": "tiny_schema", "dataset_uri": "tiny/schema.jsonl", "num_fewshot": [1], "icl_task_type": "schema"},
        {"label": "tiny_lm", "dataset_uri": "lm.jsonl", "num_fewshot": 2, "icl_task_type": "language_modeling",
         "continuation_delimiter": " "},
    ]
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks} if icl_key else tasks))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Random baseline", "Description"])
        for label, b in BASELINES.items():
            w.writerow([label, "tiny", b, "written by the test"])
        w.writerow(["unused_task", "tiny", "", "not in core.yaml: its empty baseline is never parsed"])
    for uri, rows in [("tiny/mc.jsonl", MC_ROWS), ("tiny/schema.jsonl", SCHEMA_ROWS), ("lm.jsonl", LM_ROWS)]:
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


# ---------------------------------------------------------------------------------------------
# the independent reference, written from the format's description: few-shot demonstrations
# (each "<context><delimiter><answer>") separated by blank lines, then the example itself; one
# unpadded forward per candidate


def _demos(pairs: list[tuple[str, str]], delimiter: str) -> str:
    return "".join(context + delimiter + answer + "\n\n" for context, answer in pairs)


def ref_data(task: CoreTask, max_per_task=None) -> list[dict]:
    data = list(task.examples)
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task else data


def ref_prompts(task: CoreTask, data: list[dict], idx: int) -> list[str]:
    others = [i for i in range(len(data)) if i != idx]
    shots = [data[i] for i in random.Random(1234 + idx).sample(others, task.num_fewshot)]
    d, item = task.continuation_delimiter, data[idx]
    if task.icl_task_type == "multiple_choice":
        demos = _demos([(ex["query"], ex["choices"][ex["gold"]]) for ex in shots], d)
        return [demos + item["query"] + d + choice for choice in item["choices"]]
    if task.icl_task_type == "schema":
        demos = _demos([(ex["context_options"][ex["gold"]], ex["continuation"]) for ex in shots], d)
        return [demos + option + d + item["continuation"] for option in item["context_options"]]
    demos = _demos([(ex["context"].strip(), ex["continuation"]) for ex in shots], d)
    prefix = demos + item["context"].strip() + d
    return [prefix.strip(), prefix + item["continuation"]]


def ref_spans(tok, task, data, idx, max_len=None) -> list[tuple[list[int], int, int]]:
    rows = [tok.encode(p, prepend=tok.bos_token_id) for p in ref_prompts(task, data, idx)]
    if task.icl_task_type == "language_modeling":
        assert rows[1][:len(rows[0])] == rows[0]
        spans = [(rows[1], len(rows[0]), len(rows[1]))]
    elif task.icl_task_type == "multiple_choice":
        start = len(os.path.commonprefix(rows))
        spans = [(r, start, len(r)) for r in rows]
    else:
        suffix = len(os.path.commonprefix([r[::-1] for r in rows]))
        spans = [(r, len(r) - suffix, len(r)) for r in rows]
    out = []
    for r, s, e in spans:
        if max_len is not None and len(r) > max_len:
            cut = len(r) - max_len
            r, s, e = r[cut:], s - cut, e - cut
        out.append((r, s, e))
    return out


@torch.no_grad()
def ref_score(model, tok, task, data, idx, max_len=None):
    """(correct, choice, losses) with one unpadded forward per candidate."""
    losses = []
    for r, s, e in ref_spans(tok, task, data, idx, max_len):
        logits = model(torch.tensor([r]))[0].float()
        if task.icl_task_type == "language_modeling":
            ok = logits[s - 1:e - 1].argmax(-1).tolist() == r[s:e]
            return ok, None, []
        losses.append(F.cross_entropy(logits[s - 1:e - 1], torch.tensor(r[s:e])).item())
    choice = losses.index(min(losses))
    return choice == data[idx]["gold"], choice, losses


class Oracle(torch.nn.Module):
    """Knows every gold prompt: after any prefix of one it puts a large logit on the gold next token."""

    def __init__(self, gold_rows: list[list[int]], vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.next = {tuple(r[:t + 1]): r[t + 1] for r in gold_rows for t in range(len(r) - 1)}

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


class ZeroLogits(torch.nn.Module):
    """Uniform predictions: every candidate ties, so the first one is always chosen."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


class Recorder(torch.nn.Module):
    """Passes through to a GPT (exposing its config) and records every input shape."""

    def __init__(self, inner: GPT):
        super().__init__()
        self.inner, self.config, self.shapes = inner, inner.config, []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.inner(idx)


# ---------------------------------------------------------------------------------------------
# parsing and evaluating a bundle


@pytest.mark.parametrize("icl_key", [True, False], ids=["icl_tasks-mapping", "bare-list"])
def test_bundle_is_parsed(tmp_path, icl_key):
    tasks = load_core_tasks(write_bundle(tmp_path / "b", icl_key=icl_key))
    assert [(t.label, t.icl_task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline, t.source)
            for t in tasks] == [("tiny_mc", "multiple_choice", 1, "\nAnswer: ", 25.0, "real"),
                                ("tiny_schema", "schema", 1, " ", 50.0, "real"),  # delimiter defaults to ' '
                                ("tiny_lm", "language_modeling", 2, " ", 0.0, "real")]
    assert [t.examples for t in tasks] == [MC_ROWS, SCHEMA_ROWS, LM_ROWS]


def test_evaluate_bundle_matches_unbatched_reference(bundle, tok, model):
    tasks = load_core_tasks(bundle)
    out = evaluate_core(model, tok, tasks)
    assert out["source"] == "real" and set(out["tasks"]) == set(BASELINES)
    for task in tasks:
        data = ref_data(task)
        ref = [ref_score(model, tok, task, data, i) for i in range(len(data))]
        got = [score_example(model, tok, task, data, i) for i in range(len(data))]
        assert [g.choice for g in got] == [r[1] for r in ref]
        assert [g.correct for g in got] == [r[0] for r in ref]
        for g, r in zip(got, ref):
            assert g.losses == pytest.approx(r[2], rel=1e-4, abs=1e-5)
        acc = sum(r[0] for r in ref) / len(ref)
        b = BASELINES[task.label] / 100
        assert out["tasks"][task.label] == {"accuracy": acc, "centered": pytest.approx((acc - b) / (1 - b)), "n": len(data)}
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / 3)
    # A tiny random model's losses differ between choices: the comparison above is not vacuous.
    mc = score_example(model, tok, tasks[0], ref_data(tasks[0]), 0)
    assert max(mc.losses) - min(mc.losses) > 1e-2


def test_offline_tasks_match_unbatched_reference(tok, model):
    tasks = offline_core_tasks(seed=3, size=40)
    out = evaluate_core(model, tok, tasks, max_per_task=8)
    assert out["source"] == "offline"
    for task in tasks:
        data = ref_data(task, 8)
        assert task_examples(task, 8) == data
        ref = [ref_score(model, tok, task, data, i, max_len=256) for i in range(8)]
        got = [score_example(model, tok, task, data, i) for i in range(8)]
        assert [(g.correct, g.choice) for g in got] == [r[:2] for r in ref]
        assert out["tasks"][task.label]["accuracy"] == sum(r[0] for r in ref) / 8


def test_rendering_matches_nanochat_templates(bundle):
    for task in load_core_tasks(bundle) + offline_core_tasks(seed=1, size=20):
        data = ref_data(task)
        for i in range(5):
            shots = [data[j] for j in sample_fewshot(len(data), i, task.num_fewshot)]
            assert render_prompts(task, data[i], shots) == ref_prompts(task, data, i)


# ---------------------------------------------------------------------------------------------
# oracle and uniform models: exact accuracies


def gold_rows(tok, task, data) -> list[list[int]]:
    rows = []
    for i in range(len(data)):
        prompts = ref_prompts(task, data, i)
        gold = prompts[1] if task.icl_task_type == "language_modeling" else prompts[data[i]["gold"]]
        rows.append(tok.encode(gold, prepend=tok.bos_token_id))
    return rows


@pytest.mark.parametrize("source", ["real", "offline"])
def test_oracle_scores_perfectly(bundle, tok, source):
    tasks = load_core_tasks(bundle) if source == "real" else offline_core_tasks(seed=0, size=30)
    rows = [r for t in tasks for r in gold_rows(tok, t, ref_data(t, 10))]
    out = evaluate_core(Oracle(rows, tok.vocab_size), tok, tasks, max_per_task=10)
    assert out["core"] == 1.0
    for label, r in out["tasks"].items():
        assert r == {"accuracy": 1.0, "centered": 1.0, "n": 10}, label


def test_uniform_model_picks_first_candidate(bundle, tok):
    tasks = load_core_tasks(bundle)
    out = evaluate_core(ZeroLogits(tok.vocab_size), tok, tasks)
    mc_acc = sum(r["gold"] == 0 for r in MC_ROWS) / len(MC_ROWS)
    schema_acc = sum(r["gold"] == 0 for r in SCHEMA_ROWS) / len(SCHEMA_ROWS)
    assert out["tasks"]["tiny_mc"] == {"accuracy": mc_acc, "centered": pytest.approx((mc_acc - 0.25) / 0.75), "n": 10}
    assert out["tasks"]["tiny_schema"] == {"accuracy": schema_acc, "centered": pytest.approx((schema_acc - 0.5) / 0.5), "n": 10}
    assert out["tasks"]["tiny_lm"] == {"accuracy": 0.0, "centered": 0.0, "n": 10}  # argmax is token 0, a raw byte
    assert out["core"] == pytest.approx(((mc_acc - 0.25) / 0.75 + (schema_acc - 0.5) / 0.5) / 3)


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25.0) == 0.0
    assert centered_accuracy(1.0, 25.0) == 1.0
    assert centered_accuracy(0.625, 50.0) == pytest.approx(0.25)
    assert centered_accuracy(0.1, 25.0) == pytest.approx(-0.2)  # worse than chance goes negative
    assert centered_accuracy(0.3, 0.0) == 0.3
    with pytest.raises(ValueError, match="random_baseline"):
        centered_accuracy(0.5, 100.0)


# ---------------------------------------------------------------------------------------------
# cropping, few-shot sampling, batching


def test_long_prompts_are_cropped_from_the_left(bundle, tok):
    short = Recorder(tiny_gpt(tok, sequence_len=24, seed=1))
    tasks = load_core_tasks(bundle)
    for task in tasks:
        data = ref_data(task)
        for i in range(len(data)):
            full = build_candidates(tok, task, data, i)
            cropped = build_candidates(tok, task, data, i, max_seq_len=24)
            assert any(len(t) > 24 for t, _, _ in full)  # the prompts really are longer than the model
            for (ft, fs, fe), (ct, cs, ce) in zip(full, cropped):
                assert ct == ft[-24:] and ct[cs:ce] == ft[fs:fe] and ce == len(ct)
            got = score_example(short, tok, task, data, i)
            ref = ref_score(short.inner, tok, task, data, i, max_len=24)
            assert (got.correct, got.choice) == ref[:2]
    assert short.shapes and max(T for _, T in short.shapes) <= 24
    # One forward per example: all candidates of an MC example travel together, right-padded.
    short.shapes.clear()
    score_example(short, tok, tasks[0], ref_data(tasks[0]), 0)
    assert len(short.shapes) == 1 and short.shapes[0][0] == 4


def test_continuation_longer_than_the_model_raises(tok):
    task = CoreTask("long", "language_modeling", 0, " ", [{"context": "x", "continuation": "word " * 40}] * 2, 0.0)
    with pytest.raises(ValueError, match="does not fit in the model's sequence_len 16"):
        build_candidates(tok, task, task.examples, 0, max_seq_len=16)


def test_lm_prompt_merged_across_the_boundary_scores_from_the_first_differing_token(tok):
    # With no delimiter, BPE merges "sel" + "f" into one token: the shorter prompt's tokens are not a
    # prefix of the full prompt's (nanochat asserts they are); scoring starts where they differ.
    task = CoreTask("merge", "language_modeling", 0, "", [{"context": "x = sel", "continuation": "f.value"}] * 2, 0.0)
    without, with_ = (tok.encode(p, prepend=tok.bos_token_id) for p in render_prompts(task, task.examples[0], []))
    assert with_[:len(without)] != without
    [(tokens, start, end)] = build_candidates(tok, task, task.examples, 0)
    assert tokens == with_ and end == len(with_) and tokens[:start] == without[:start] and tokens[start] != without[start]
    assert tok.decode(tokens[start:end]).endswith("f.value")
    out = evaluate_core(Oracle([with_], tok.vocab_size), tok, [task])
    assert out["tasks"]["merge"]["accuracy"] == 1.0


def test_fewshot_is_deterministic_and_excludes_the_example():
    for n, k in [(10, 3), (5, 4), (100, 5), (2, 1)]:
        for i in range(n):
            picks = sample_fewshot(n, i, k)
            assert picks == sample_fewshot(n, i, k) and len(picks) == len(set(picks)) == k
            assert i not in picks and all(0 <= p < n for p in picks)
    assert sample_fewshot(10, 3, 0) == []
    assert len({tuple(sample_fewshot(50, i, 3)) for i in range(50)}) > 40  # seeded per example, not one draw
    with pytest.raises(ValueError, match="num_fewshot=4 needs at least 5 examples"):
        sample_fewshot(4, 0, 4)
    with pytest.raises(ValueError, match="index"):
        sample_fewshot(4, 4, 1)


# ---------------------------------------------------------------------------------------------
# offline tasks


def test_offline_tasks_are_deterministic_and_well_formed():
    a, b = offline_core_tasks(seed=7, size=50), offline_core_tasks(seed=7, size=50)
    assert a == b
    assert [t.examples for t in offline_core_tasks(seed=8, size=50)] != [t.examples for t in a]
    assert [(t.icl_task_type, t.random_baseline, t.source, len(t.examples)) for t in a] == [
        ("multiple_choice", 25.0, "offline", 50), ("schema", 50.0, "offline", 50),
        ("language_modeling", 0.0, "offline", 50)]
    mc, schema, lm = (t.examples for t in a)
    for ex in mc:
        assert len(ex["choices"]) == 4 == len(set(ex["choices"])) and 0 <= ex["gold"] < 4 and ex["query"].count("\n") == 2
    assert len({ex["gold"] for ex in mc}) > 1  # the gold position is shuffled
    for ex in schema:
        assert len(ex["context_options"]) == 2 == len(set(ex["context_options"])) and 0 <= ex["gold"] < 2
    for ex in lm:
        assert ex["context"] == ex["context"].strip() and ex["context"] and ex["continuation"].strip() == ex["continuation"]
    assert len({ex["context"] + " " + ex["continuation"] for ex in lm}) == 50
    with pytest.raises(ValueError, match="size"):
        offline_core_tasks(size=1)


# ---------------------------------------------------------------------------------------------
# errors


def mutate(root, name):
    if name == "no-core-yaml":
        (root / "core.yaml").unlink()
    elif name == "no-meta-csv":
        (root / "eval_meta_data.csv").unlink()
    elif name == "no-jsonl":
        (root / "eval_data" / "lm.jsonl").unlink()
    elif name == "bad-yaml":
        (root / "core.yaml").write_text("icl_tasks: [label: x, {\n")
    elif name == "not-a-list":
        (root / "core.yaml").write_text("icl_tasks: 3\n")
    else:
        rows = yaml.safe_load((root / "core.yaml").read_text())["icl_tasks"]
        if name == "missing-uri":
            del rows[1]["dataset_uri"]
        elif name == "unknown-type":
            rows[2]["icl_task_type"] = "ranking"
        elif name == "bad-fewshot":
            rows[0]["num_fewshot"] = ["three"]
        elif name == "no-baseline":
            rows[0]["label"] = "unlisted"
        elif name == "duplicate-label":
            rows[1]["label"] = "tiny_mc"
        (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": rows}))
    if name == "bad-gold":
        lines = (root / "eval_data" / "tiny" / "mc.jsonl").read_text().splitlines()
        lines[2] = json.dumps(dict(MC_ROWS[2], gold=4))
        (root / "eval_data" / "tiny" / "mc.jsonl").write_text("\n".join(lines))
    elif name == "bad-json":
        with open(root / "eval_data" / "tiny" / "schema.jsonl", "a") as f:
            f.write("{not json\n")
    elif name == "bad-baseline":
        text = (root / "eval_meta_data.csv").read_text().replace("tiny_schema,tiny,50.0", "tiny_schema,tiny,n/a")
        (root / "eval_meta_data.csv").write_text(text)
    elif name == "lm-missing-key":
        (root / "eval_data" / "lm.jsonl").write_text(json.dumps({"context": "a"}) + "\n")


@pytest.mark.parametrize("name, exc, match", [
    ("no-core-yaml", FileNotFoundError, r"core\.yaml is missing"),
    ("no-meta-csv", FileNotFoundError, r"eval_meta_data\.csv is missing"),
    ("no-jsonl", FileNotFoundError, r"task 'tiny_lm': dataset file .*lm\.jsonl is missing"),
    ("bad-yaml", ValueError, "not valid YAML"),
    ("not-a-list", ValueError, "non-empty list of tasks"),
    ("missing-uri", ValueError, r"task 1: 'dataset_uri' must be a non-empty string"),
    ("unknown-type", ValueError, r"\(tiny_lm\): unknown icl_task_type 'ranking'"),
    ("bad-fewshot", ValueError, r"\(tiny_mc\): num_fewshot must be"),
    ("no-baseline", ValueError, r"no 'Random baseline' for task 'unlisted'"),
    ("duplicate-label", ValueError, "duplicate label 'tiny_mc'"),
    ("bad-gold", ValueError, r"mc\.jsonl line 3: 'gold' must be an index into the 4 choices, got 4"),
    ("bad-json", ValueError, r"schema\.jsonl line 11: invalid JSON"),
    ("bad-baseline", ValueError, r"eval_meta_data\.csv line 3 \(tiny_schema\): 'Random baseline' 'n/a' is not a number"),
    ("lm-missing-key", ValueError, r"lm\.jsonl line 1: language_modeling rows need a string 'continuation'"),
])
def test_bundle_errors_are_clear(bundle, name, exc, match):
    mutate(bundle, name)
    with pytest.raises(exc, match=match):
        load_core_tasks(bundle)


def test_evaluate_errors_are_clear(bundle, tok):
    real = load_core_tasks(bundle)
    zero = ZeroLogits(tok.vocab_size)
    with pytest.raises(ValueError, match="tasks is empty"):
        evaluate_core(zero, tok, [])
    with pytest.raises(ValueError, match=r"mix sources \['offline', 'real'\]"):
        evaluate_core(zero, tok, real[:1] + offline_core_tasks(size=10)[:1])
    with pytest.raises(ValueError, match="max_per_task must be None or an int >= 1, got 0"):
        evaluate_core(zero, tok, real, max_per_task=0)
    bogus = CoreTask("bogus", "ranking", 0, " ", MC_ROWS, 25.0)
    with pytest.raises(ValueError, match="task 'bogus': unknown icl_task_type 'ranking'"):
        evaluate_core(zero, tok, [bogus])
    with pytest.raises(ValueError, match="num_fewshot=1 needs at least 2 examples.*max_per_task"):
        evaluate_core(zero, tok, real, max_per_task=1)


# ---------------------------------------------------------------------------------------------
# download: once under the lock, re-used afterwards


def bundle_zip(tmp_path) -> bytes:
    src = write_bundle(tmp_path / "src" / "eval_bundle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(src.parent).as_posix())  # nanochat's layout: eval_bundle/...
    return buf.getvalue()


class ZipServer:
    """Serves one file at /eval_bundle.zip on 127.0.0.1, slowly (so concurrent callers overlap);
    the first `garbage` requests get bytes that are not a zip."""

    def __init__(self, data: bytes, delay: float = 0.3, garbage: int = 0):
        self.data, self.delay, self.garbage, self.requests = data, delay, garbage, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                if self.path != "/eval_bundle.zip":
                    return self.send_error(404)
                time.sleep(server.delay)
                body = server.data
                if server.garbage > 0:
                    server.garbage -= 1
                    body = b"this is not a zip archive" * 10
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str = "eval_bundle.zip") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def zip_server(tmp_path):
    srv = ZipServer(bundle_zip(tmp_path))
    yield srv
    srv.close()


FAST = dict(backoff=0.001, timeout=5)


def test_download_once_under_lock_then_reuse(tmp_path, zip_server):
    base = tmp_path / "base"
    assert ensure_bundle(base) is None and zip_server.requests == []  # absent, and no download asked
    results, errors = [], []
    start = threading.Barrier(2)

    def call():
        start.wait()
        try:
            results.append(ensure_bundle(base, download=True, url=zip_server.url(), **FAST))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and results == [base / "eval_bundle"] * 2
    assert zip_server.requests == ["/eval_bundle.zip"]  # two concurrent callers, one download
    assert sorted(p.name for p in base.iterdir()) == ["eval_bundle", "eval_bundle.lock"]  # no .part, zip or temp dir
    assert [t.examples for t in load_core_tasks(results[0])] == [MC_ROWS, SCHEMA_ROWS, LM_ROWS]
    # Present: re-used without the network (this URL would fail).
    assert ensure_bundle(base, download=True, url=zip_server.url("gone.zip"), **FAST) == base / "eval_bundle"
    assert ensure_bundle(base) == base / "eval_bundle"
    assert zip_server.requests == ["/eval_bundle.zip"]


def test_download_retries_a_corrupt_zip(tmp_path, zip_server):
    zip_server.garbage, zip_server.delay = 1, 0.0
    bundle = ensure_bundle(tmp_path / "base", download=True, url=zip_server.url(), **FAST)
    assert zip_server.requests == ["/eval_bundle.zip"] * 2
    assert len(load_core_tasks(bundle)) == 3


def test_download_errors(tmp_path, zip_server):
    zip_server.delay = 0.0
    with pytest.raises(DownloadError, match="eval bundle: .*HTTP 404"):
        ensure_bundle(tmp_path / "a", download=True, url=zip_server.url("missing.zip"), **FAST)
    assert zip_server.requests == ["/missing.zip"]  # a 404 is not retried
    zip_server.garbage = 10
    with pytest.raises(DownloadError, match="gave up after 3 attempts.*not a readable zip"):
        ensure_bundle(tmp_path / "b", download=True, url=zip_server.url(), retries=2, **FAST)
    (tmp_path / "c" / "eval_bundle").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="has no core.yaml"):
        ensure_bundle(tmp_path / "c", download=True, url=zip_server.url(), **FAST)
    with pytest.raises(ValueError, match="timeout"):
        ensure_bundle(tmp_path / "d", download=True, url=zip_server.url(), timeout=0)

