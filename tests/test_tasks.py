"""Task datasets: nanofast/tasks (parquet API download and conversions, offline generators, mixtures)."""
import io
import json
import keyword
import os
import re
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanofast.dataset import stdlib_documents
from nanofast.download import DownloadError
from nanofast.tasks import TASK_NAMES, Task, TaskMixture, download_task, extract_answer, gsm8k_parts, load_task
from nanofast.tasks.hub import cached_files, download_split, split_dir
from nanofast.tasks.offline import LETTERS
from nanofast.tokenizer import Tokenizer
from nanofast.tools import calculate
from test_download import ShardServer  # the local 127.0.0.1 HTTP server of the downloader tests

HAS_SANDBOX = os.path.exists(os.path.join(os.path.dirname(__file__), "..", "nanofast", "sandbox.py"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(stdlib_documents(max_doc_chars=3000), vocab_size=512)


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class Hub:
    """A fake Hugging Face parquet API on 127.0.0.1 ($HF_ENDPOINT points at it)."""

    def __init__(self, srv: ShardServer):
        self.srv = srv
        self.base = f"http://127.0.0.1:{srv.httpd.server_address[1]}"

    def publish(self, repo: str, subset: str, split: str, tables: list[pa.Table]) -> list[str]:
        paths = [f"files/{repo}/{subset}/{split}/{i}.parquet" for i in range(len(tables))]
        for path, table in zip(paths, tables):
            self.srv.files[path] = parquet(table)
        listing = f"api/datasets/{repo}/parquet/{subset}/{split}"
        self.srv.files[listing] = json.dumps([f"{self.base}/{p}" for p in paths]).encode()
        return [listing, *paths]

    def count(self, name: str) -> int:
        return len(self.srv.requested(name))


@pytest.fixture
def hub(monkeypatch):
    srv = ShardServer({})
    srv.thread.start()
    h = Hub(srv)
    monkeypatch.setenv("HF_ENDPOINT", h.base)
    yield h
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# real data in each dataset's schema

SMOLTALK = pa.table({"messages": [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
], "source": ["a", "b", "c"]})
MMLU_TEST = pa.table({"question": ["What is 2+3?", "Which planet is largest?"],
                      "subject": ["elementary_mathematics", "astronomy"],
                      "choices": [["4", "5", "6", "7"], ["Mars", "Venus", "Jupiter", "Earth"]],
                      "answer": [1, 2]})
# the parquet export of auxiliary_train wraps every row in a "train" struct
MMLU_AUX = pa.table({"train": [{"answer": 3, "choices": ["a", "b", "c", "d"], "question": "Pick d.", "subject": ""},
                               {"answer": 0, "choices": ["w", "x", "y", "z"], "question": "Pick w.", "subject": ""}]})
ARC = pa.table({"id": ["q1", "q2"], "question": ["What do plants need?", "Which is a mammal?"],
                "choices": [{"text": ["light", "sand", "rocks"], "label": ["A", "B", "C"]},
                            {"text": ["shark", "whale", "trout", "eel"], "label": ["1", "2", "3", "4"]}],
                "answerKey": ["A", "2"]})
GSM_ANSWERS = [
    ("Natalia sold clips to 48 friends in April, and half as many in May. How many clips altogether?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
     "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"),
    ("A car costs $1,200 a month for 12 months plus $1,000. What is the total?",
     "The payments are 1,200 * 12 = $<<1200*12=14400>>14,400.\n"
     "The total is 14,400 + 1,000 = $<<14400+1000=15400>>15,400.\n#### 15,400"),
]
HUMANEVAL = pa.table({"task_id": ["HumanEval/0"],
                      "prompt": ["from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
                                 "    \"\"\"Sum of xs.\n    >>> total([1, 2])\n    3\n    \"\"\"\n"],
                      "canonical_solution": ["    return sum(xs)\n"],
                      "test": ["def check(candidate):\n    assert candidate([1, 2]) == 3\n"
                               "    assert candidate([]) == 0\n"],
                      "entry_point": ["total"]})


def publish_all(hub: Hub) -> None:
    hub.publish("HuggingFaceTB/smol-smoltalk", "default", "train", [SMOLTALK.slice(0, 2), SMOLTALK.slice(2)])
    hub.publish("cais/mmlu", "all", "test", [MMLU_TEST])
    hub.publish("cais/mmlu", "auxiliary_train", "train", [MMLU_AUX])
    hub.publish("allenai/ai2_arc", "ARC-Easy", "test", [ARC])
    hub.publish("openai/gsm8k", "main", "test", [pa.table({"question": [q for q, _ in GSM_ANSWERS],
                                                           "answer": [a for _, a in GSM_ANSWERS]})])
    hub.publish("openai/openai_humaneval", "openai_humaneval", "test", [HUMANEVAL])


def by_user(task: Task) -> dict[str, dict]:
    return {c["messages"][0]["content"] if c["messages"][0]["role"] == "user" else c["messages"][1]["content"]: c
            for c in task}


def test_real_conversions_download_once_then_cached(hub, tmp_path, tokenizer):
    publish_all(hub)
    loaded = {(name, split): load_task(name, split, data_dir=tmp_path, download=True)
              for name, split in [("smoltalk", "train"), ("mmlu", "test"), ("mmlu", "train"), ("arc_easy", "test"),
                                  ("gsm8k", "test"), ("humaneval", "test")]}
    assert {t.source for t in loaded.values()} == {"real"}
    n_requests = len(hub.srv.requests)
    assert n_requests == 6 + 7  # one listing per split, each parquet file once

    smol = loaded["smoltalk", "train"]
    assert len(smol) == 3 and smol.eval_type == "generative"
    convs = {len(c["messages"]): c for c in smol}
    assert convs[5]["messages"] == SMOLTALK.column("messages")[1].as_py()  # system turn kept (merged on render)

    mmlu = by_user(loaded["mmlu", "test"])
    q = mmlu["Multiple Choice question: What is 2+3?\n- 4=A\n- 5=B\n- 6=C\n- 7=D\n\n"
             "Respond only with the letter of the correct answer."]
    assert q["messages"][1]["content"] == "B" and q["letters"] == ["A", "B", "C", "D"]
    assert q["subject"] == "elementary_mathematics" and loaded["mmlu", "test"].eval_type == "categorical"
    aux = {c["messages"][0]["content"].split("\n")[0]: c["messages"][1]["content"] for c in loaded["mmlu", "train"]}
    assert aux == {"Multiple Choice question: Pick d.": "D", "Multiple Choice question: Pick w.": "A"}

    arc = {c["messages"][0]["content"].split("\n")[0]: c for c in loaded["arc_easy", "test"]}
    assert loaded["arc_easy", "test"].name == "arc_easy"
    plants = arc["Multiple Choice question: What do plants need?"]
    assert plants["letters"] == ["A", "B", "C"] and plants["messages"][1]["content"] == "A"
    mammal = arc["Multiple Choice question: Which is a mammal?"]
    assert mammal["letters"] == ["1", "2", "3", "4"] and "- whale=2\n" in mammal["messages"][0]["content"]
    assert loaded["arc_easy", "test"].evaluate(mammal, "2") and not loaded["arc_easy", "test"].evaluate(mammal, "1")

    gsm = by_user(loaded["gsm8k", "test"])
    assert gsm[GSM_ANSWERS[0][0]]["messages"][1]["content"] == gsm8k_parts(GSM_ANSWERS[0][1])

    he_task = loaded["humaneval", "test"]
    he = he_task[0]
    prompt, solution = HUMANEVAL.column("prompt")[0].as_py(), HUMANEVAL.column("canonical_solution")[0].as_py()
    assert he["messages"] == [{"role": "user", "content": prompt}, {"role": "assistant", "content": prompt + solution}]
    assert (he["prompt"], he["entry_point"]) == (prompt, "total") and "candidate([]) == 0" in he["test"]

    for task in loaded.values():
        for conv in task:
            ids, mask = tokenizer.render_conversation(conv)
            assert sum(mask) > 0

    # a second load, and one with the server gone, read the cache: no network
    again = load_task("gsm8k", "test", data_dir=tmp_path)
    assert again.source == "real" and len(again) == 2 and len(hub.srv.requests) == n_requests
    hub.srv.httpd.shutdown()
    assert load_task("mmlu", "test", data_dir=tmp_path, download=True).source == "real"


def test_real_seed_shuffles_and_size_caps(hub, tmp_path):
    rows = [(f"Question {i}?", f"It is {i} + 1 = <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}") for i in range(30)]
    hub.publish("openai/gsm8k", "main", "train", [pa.table({"question": [q for q, _ in rows],
                                                            "answer": [a for _, a in rows]})])
    order = lambda task: [c["messages"][0]["content"] for c in task]  # noqa: E731
    a = load_task("gsm8k", "train", data_dir=tmp_path, download=True, seed=1)
    assert order(a) == order(load_task("gsm8k", "train", data_dir=tmp_path, seed=1))
    assert order(a) != order(load_task("gsm8k", "train", data_dir=tmp_path, seed=2))
    assert sorted(order(a)) == sorted(q for q, _ in rows)
    assert order(load_task("gsm8k", "train", data_dir=tmp_path, seed=1, size=5)) == order(a)[:5]
    assert len(load_task("gsm8k", "train", data_dir=tmp_path, size=1000)) == 30  # real data is capped


def test_concurrent_downloads_fetch_once_and_never_expose_partial_files(hub, tmp_path):
    names = hub.publish("openai/gsm8k", "main", "test", [pa.table({"question": [q], "answer": [a]})
                                                         for q, a in GSM_ANSWERS])
    hub.srv.stall[names[1]] = 1  # the first parquet file answers after 1 s
    results, errors = [], []

    def worker():
        try:
            results.append(download_task("gsm8k", "test", data_dir=tmp_path))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # mid-download: the split is not complete, so nothing of it is read
    assert cached_files(tmp_path, "openai/gsm8k", "main", "test") is None
    assert load_task("gsm8k", "test", data_dir=tmp_path, size=5).source == "offline"
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert [hub.count(n) for n in names] == [1, 1, 1]
    task = load_task("gsm8k", "test", data_dir=tmp_path)
    assert task.source == "real" and len(task) == 2
    assert not list(split_dir(tmp_path, "openai/gsm8k", "main", "test").glob("*.part"))


def test_incomplete_cache_is_not_used_and_download_resumes(hub, tmp_path):
    names = hub.publish("openai/gsm8k", "main", "train", [pa.table({"question": [q], "answer": [a]})
                                                          for q, a in GSM_ANSWERS])
    directory = split_dir(tmp_path, "openai/gsm8k", "main", "train")
    directory.mkdir(parents=True)
    (directory / "00000.parquet").write_bytes(hub.srv.files[names[1]])  # a whole file, but no manifest
    half = hub.srv.files[names[2]]
    (directory / "00001.parquet.part").write_bytes(half[:len(half) // 2])  # an interrupted transfer
    assert cached_files(tmp_path, "openai/gsm8k", "main", "train") is None
    assert load_task("gsm8k", "train", data_dir=tmp_path, size=3).source == "offline"
    task = load_task("gsm8k", "train", data_dir=tmp_path, download=True)
    assert task.source == "real" and len(task) == 2
    assert hub.count(names[1]) == 0 and hub.srv.requested(names[2]) == [f"bytes={len(half) // 2}-"]


def test_download_errors_and_retries(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"openai/gsm8k main/test.*HTTP 404"):
        download_task("gsm8k", "test", data_dir=tmp_path)  # nothing published: the listing 404s
    assert load_task("gsm8k", "test", data_dir=tmp_path, size=2).source == "offline"
    names = hub.publish("openai/gsm8k", "main", "test", [pa.table({"question": ["q"], "answer": ["#### 1"]})])
    hub.srv.garbage[names[0]] = 1  # a listing that is not JSON is fetched again
    hub.srv.garbage[names[1]] = 1  # so is a parquet file with bad bytes
    files = download_split(tmp_path, "openai/gsm8k", "main", "test", backoff=0.001)
    assert pq.read_table(files[0]).num_rows == 1
    assert [hub.count(n) for n in names] == [1 + 2, 2]  # the listing: the 404, the garbage, the good one


# ------------------------------------------------------------------------------------------------
# GSM8K-style answers


def test_gsm8k_parts_and_scoring(absent):
    parts = gsm8k_parts(GSM_ANSWERS[1][1])
    assert parts == [
        {"type": "text", "text": "The payments are 1,200 * 12 = $"},
        {"type": "python", "text": "1200*12"}, {"type": "python_output", "text": "14400"},
        {"type": "text", "text": "14,400.\nThe total is 14,400 + 1,000 = $"},
        {"type": "python", "text": "14400+1000"}, {"type": "python_output", "text": "15400"},
        {"type": "text", "text": "15,400.\n#### 15,400"}]
    for answer in (a for _, a in GSM_ANSWERS):
        p = gsm8k_parts(answer)
        calls = [(x["text"], y["text"]) for x, y in zip(p, p[1:]) if x["type"] == "python"]
        assert len(calls) == 2 and all(calculate(expr) == out for expr, out in calls)
        assert "".join(x["text"] if x["type"] == "text" else "" for x in p).endswith(answer.rsplit("\n", 1)[1])
    assert gsm8k_parts("x <<no_equals>> y")[1:3] == [{"type": "python", "text": "no_equals"},
                                                     {"type": "python_output", "text": ""}]
    assert extract_answer("so #### 1,234.") == "1234" and extract_answer("#### -7") == "-7"
    assert extract_answer("no marker 12") is None

    task = load_task("gsm8k", "test", data_dir=absent, size=2)  # scoring is the same offline
    conv = {"messages": [{"role": "user", "content": GSM_ANSWERS[1][0]},
                         {"role": "assistant", "content": gsm8k_parts(GSM_ANSWERS[1][1])}]}
    for completion, ok in [("The total is $15,400.\n#### 15400", True), ("#### 15,400", True),
                           ("#### 15400.0", True), ("#### 15401", False), ("The total is 15400.", False),
                           ("", False)]:
        assert task.evaluate(conv, completion) is ok, completion
        assert task.reward(conv, completion) == (1.0 if ok else 0.0)
    with pytest.raises(TypeError, match="completion"):
        task.evaluate(conv, None)


# ------------------------------------------------------------------------------------------------
# offline generators

OFFLINE_CASES = [("smoltalk", "train"), ("mmlu", "train"), ("arc_easy", "test"), ("arc_challenge", "validation"),
                 ("gsm8k", "train"), ("spellingbee", "train"), ("identity", "train"), ("multiple_choice", "dev"),
                 ("arithmetic", "test"), ("humaneval", "test")]


@pytest.fixture
def absent(tmp_path):
    return tmp_path / "no_task_data"


@pytest.mark.parametrize("name,split", OFFLINE_CASES)
def test_offline_generators_deterministic_and_render(name, split, absent, tokenizer):
    task = load_task(name, split, data_dir=absent, seed=3, size=60)
    assert task.source == "offline" and task.name == name and len(task) == 60
    assert list(task) == list(load_task(name, split, data_dir=absent, seed=3, size=60))
    assert list(task) != list(load_task(name, split, data_dir=absent, seed=4, size=60))
    for conv in task:
        assert conv["task"] == name and conv["messages"][-1]["role"] == "assistant"
        ids, mask = tokenizer.render_conversation(conv)
        assert sum(mask) > 0 and len(ids) == len(mask)
        assert tokenizer.render_for_completion(conv) == ids[:len(tokenizer.render_for_completion(conv))]
        if task.eval_type == "categorical":
            assert conv["letters"] == list(LETTERS) and conv["messages"][-1]["content"] in conv["letters"]


@pytest.mark.parametrize("name,held_out", [("smoltalk", "test"), ("multiple_choice", "test"), ("mmlu", "validation"),
                                           ("spellingbee", "test"), ("arithmetic", "test"), ("identity", "test")])
def test_offline_train_and_held_out_are_disjoint(name, held_out, absent):
    def users(task):
        return {"\n".join(m["content"] for m in c["messages"] if m["role"] == "user") for c in task}

    train = users(load_task(name, "train", data_dir=absent, seed=0, size=1500))
    test = users(load_task(name, held_out, data_dir=absent, seed=1, size=150))
    assert train and test and not train & test
    if name != "identity":  # identity repeats its few facts; the others are distinct within a split
        assert len(test) == 150


def mc_key(conv: dict) -> tuple[str, str]:
    """(question, text of the correct choice): what makes two multiple-choice questions the same."""
    text = conv["messages"][0]["content"]
    choices = {letter: choice for choice, letter in re.findall(r"^- (.*)=([A-D])$", text, re.M)}
    return text.split("\n")[0], choices[conv["messages"][1]["content"]]


def test_offline_mc_stand_ins_share_one_split_assignment(absent):
    # SFT trains on the offline MMLU; no offline ARC/MMLU test question may be among it
    train = {mc_key(c) for c in load_task("mmlu", "train", data_dir=absent, size=1500)}
    for name in ("arc_easy", "arc_challenge", "mmlu", "multiple_choice"):
        held_out = {mc_key(c) for c in load_task(name, "test", data_dir=absent, size=150)}
        assert len(held_out) == 150 and not train & held_out, name


def test_spellingbee_counts(absent):
    task = load_task("spellingbee", "test", data_dir=absent, size=200)
    for conv in task:
        word, letter, parts = conv["word"], conv["letter"], conv["messages"][1]["content"]
        assert word in conv["messages"][0]["content"] and letter in conv["messages"][0]["content"]
        kinds = [p["type"] for p in parts]
        assert kinds == ["text", "python", "python_output", "text"]
        assert parts[0]["text"].startswith(f"Spelling '{word}' letter by letter: {','.join(word)}")
        assert calculate(parts[1]["text"]) == parts[2]["text"] == str(word.count(letter))
        assert extract_answer(parts[3]["text"]) == str(word.count(letter))
        assert task.evaluate(conv, f"#### {word.count(letter)}")
        assert not task.evaluate(conv, f"#### {word.count(letter) + 1}")
    assert {word.count(letter) for word, letter in ((c["word"], c["letter"]) for c in task)} >= {0, 1, 2}


def test_arithmetic_annotations_are_correct(absent):
    task = load_task("arithmetic", "train", data_dir=absent, size=500)
    for conv in task:
        question, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert all(int(n) <= 100 for n in re.findall(r"\d+", question))
        calls = [(x["text"], y["text"]) for x, y in zip(parts, parts[1:]) if x["type"] == "python"]
        assert 1 <= len(calls) <= 2
        for expr, out in calls:
            assert calculate(expr) == out
        final = extract_answer(parts[-1]["text"])
        assert final == calls[-1][1] and int(final) >= 0
        assert task.evaluate(conv, f"The answer is\n#### {final}") and not task.evaluate(conv, "#### 99999")


def test_multiple_choice_answers_are_correct(absent):
    task = load_task("multiple_choice", "train", data_dir=absent, size=800)
    answers, subjects = set(), set()
    for conv in task:
        text = conv["messages"][0]["content"]
        choices = dict((letter, choice) for choice, letter in re.findall(r"^- (.*)=([A-D])$", text, re.M))
        assert sorted(choices) == list(LETTERS) and len(set(choices.values())) == 4
        answer = conv["messages"][1]["content"]
        answers.add(answer)
        subjects.add(conv["subject"])
        correct = choices[answer]
        if conv["subject"] == "keywords":
            assert keyword.iskeyword(correct) and sum(keyword.iskeyword(c) for c in choices.values()) == 1
        if m := re.match(r"Multiple Choice question: What is (\d+) ([-+*]) (\d+)\?", text):
            assert int(correct) == eval(f"{m[1]}{m[2]}{m[3]}")  # the question's own digits only
        if m := re.match(r"Multiple Choice question: How many times does the letter (\w) appear in (\w+)\?", text):
            assert int(correct) == m[2].count(m[1])
        assert task.evaluate(conv, answer) and task.evaluate(conv, f" {answer}\n")
        assert not any(task.evaluate(conv, x) for x in LETTERS if x != answer)
    assert answers == set(LETTERS)
    assert subjects == {"keywords", "builtins", "modules", "arithmetic", "spelling", "functions"}


def test_identity_answers_state_the_facts(absent):
    task = load_task("identity", "train", data_dir=absent, size=300)
    assert any(len(c["messages"]) > 2 for c in task)
    for conv in task:
        assert conv["keyword"].lower() in conv["messages"][-1]["content"].lower()
        assert task.evaluate(conv, conv["messages"][-1]["content"])
        assert not task.evaluate(conv, "I am a potato.")
    assert any("nanofast" in c["messages"][-1]["content"] for c in task)


def test_offline_humaneval_problems_pass_their_tests(absent):
    task = load_task("humaneval", "test", data_dir=absent)
    assert len(task) > 100 and len({c["entry_point"] for c in task}) == len(task)
    for conv in task:
        assert conv["messages"][1]["content"].startswith(conv["prompt"])
        namespace = {}
        exec(conv["messages"][1]["content"] + "\n" + conv["test"], namespace)  # our own generated code
        namespace["check"](namespace[conv["entry_point"]])
        wrong = {}
        exec(conv["prompt"] + "    return None\n" + conv["test"], wrong)
        with pytest.raises(AssertionError):
            wrong["check"](wrong[conv["entry_point"]])


@pytest.mark.skipif(not HAS_SANDBOX, reason="nanofast/sandbox.py (run_humaneval) is not written yet")
def test_humaneval_evaluate_runs_in_the_sandbox(absent):
    task = load_task("humaneval", "test", data_dir=absent, size=3)
    for conv in task:
        assert task.evaluate(conv, conv["messages"][1]["content"])
        assert task.evaluate(conv, "```python\n" + conv["messages"][1]["content"] + "```\nDone.")
        assert not task.evaluate(conv, conv["prompt"] + "    return None\n")
        assert task.reward(conv, conv["prompt"] + "    return None\n") == 0.0


# ------------------------------------------------------------------------------------------------
# mixtures and errors


def test_task_mixture(hub, tmp_path):
    absent = tmp_path / "none"
    gsm, mc, ident = (load_task("gsm8k", "train", data_dir=absent, size=30),
                      load_task("mmlu", "train", data_dir=absent, size=20),
                      load_task("identity", "train", data_dir=absent, size=10))
    mix = TaskMixture([gsm, mc, ident, ident], seed=7)
    assert len(mix) == 70 and mix.source == "offline" and mix.eval_type == "mixed"
    convs = list(mix)
    assert convs == list(TaskMixture([gsm, mc, ident, ident], seed=7))
    assert convs != list(TaskMixture([gsm, mc, ident, ident], seed=8))
    assert sorted(map(json.dumps, convs)) == sorted(map(json.dumps, [*gsm, *mc, *ident, *ident]))
    assert [c["task"] for c in convs[:20]].count("gsm8k") < 20  # interleaved, not concatenated
    for conv in convs:
        ref = conv["messages"][-1]["content"]
        good = ref if isinstance(ref, str) else "".join(p["text"] for p in ref)
        if conv["task"] == "identity":
            good = conv["keyword"]
        assert mix.evaluate(conv, good) and mix.reward(conv, good) == 1.0
    assert mix[-1] == convs[-1]

    hub.publish("openai/gsm8k", "main", "test", [pa.table({"question": [q for q, _ in GSM_ANSWERS],
                                                           "answer": [a for _, a in GSM_ANSWERS]})])
    real = load_task("gsm8k", "test", data_dir=tmp_path, download=True)
    mixed = TaskMixture([real, load_task("arithmetic", "test", data_dir=absent, size=5)])
    assert mixed.source == "mixed" and mixed.eval_type == "generative" and len(mixed) == 7
    assert TaskMixture([real]).source == "real"
    with pytest.raises(ValueError, match="tasks"):
        TaskMixture([])
    with pytest.raises(ValueError, match="'task'"):
        mixed.evaluate({"messages": [], "task": "mmlu"}, "A")


def test_argument_errors(tmp_path):
    absent = tmp_path / "none"
    with pytest.raises(ValueError, match="unknown task name 'mnist'"):
        load_task("mnist", "train", data_dir=absent)
    with pytest.raises(ValueError, match=r"bad split 'val' for task 'gsm8k'.*\('train', 'test'\)"):
        load_task("gsm8k", "val", data_dir=absent)
    with pytest.raises(ValueError, match="bad split 'train' for task 'humaneval'"):
        load_task("humaneval", "train", data_dir=absent)
    with pytest.raises(ValueError, match="bad split 'dev' for task 'spellingbee'"):
        load_task("spellingbee", "dev", data_dir=absent)
    for size in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="size must be a positive int"):
            load_task("arithmetic", "train", data_dir=absent, size=size)
    with pytest.raises(ValueError, match="size=2000 is more than the mmlu generator can make distinct dev"):
        load_task("mmlu", "dev", data_dir=absent, size=2000)  # a 5% slice of the questions
    assert len(load_task("humaneval", "test", data_dir=absent, size=500)) == len(load_task("humaneval", "test",
                                                                                          data_dir=absent))
    with pytest.raises(ValueError, match="seed must be an int"):
        load_task("identity", "train", data_dir=absent, seed="0")
    with pytest.raises(ValueError, match="generated offline"):
        download_task("spellingbee", "train", data_dir=absent)
    task = load_task("identity", "train", data_dir=absent, size=3)
    with pytest.raises(IndexError, match="identity index 3 out of range"):
        task[3]
    with pytest.raises(TypeError, match="index must be an int"):
        task["0"]
    with pytest.raises(TypeError, match="smoltalk"):
        load_task("smoltalk", "test", data_dir=absent, size=2).evaluate({}, "hi")
    assert set(TASK_NAMES) == {"smoltalk", "mmlu", "arc_easy", "arc_challenge", "gsm8k", "humaneval",
                               "spellingbee", "identity", "multiple_choice", "arithmetic"}
