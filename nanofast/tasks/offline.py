"""Offline task generators: conversations made by code from the embedded corpus, no network.

They stand in for the real datasets on a machine without them (and provide the synthetic tasks
nanochat also generates: identity, spelling). Each is deterministic for a (split, seed) and kept
simple and regular, so that a tiny model can learn it.

Held-out splits never overlap train: every example has a split key (e.g. the word and letter of a
spelling question, the question text of a word problem) whose hash alone picks its split, the
same for every seed. Tasks that share a generator share the hash too (the offline MMLU and ARC
both use multiple choice's), so no test question of one is a training question of the other.
"""
from __future__ import annotations

import abc

import builtins
import functools
import keyword
import random
import re
import string
import sys
import types
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from nanofast.dataset import stdlib_documents
from nanofast.tasks.base import FinalNumberMixin, LetterMixin, Task, gsm8k_parts, mc_conversation
from nanofast.tasks.real import HumanEvalMixin, humaneval_conversation

DEFAULT_TRAIN_SIZE = 2000
DEFAULT_HELDOUT_SIZE = 200
# split of a key: hash % 20 -> 0-1 test (10%), 2 validation, 3 dev, the rest train
_BUCKETS = {0: "test", 1: "test", 2: "validation", 3: "dev"}


def split_of(family: str, key: str) -> str:
    """The split an example with split key `key` belongs to (stable across seeds and machines)."""
    return _BUCKETS.get(zlib.crc32(f"{family}\0{key}".encode()) % 20, "train")


# ------------------------------------------------------------------------------------------------
# the embedded corpus: words and documented functions of the Python standard library


@dataclass(frozen=True)
class Corpus:
    """What the offline generators draw from (built once per process by `corpus()`)."""

    words: tuple[str, ...]                      # lowercase words (3-12 letters) found in 8+ files
    functions: tuple[tuple[str, str, str], ...]  # (name, parameters, first docstring sentence)


_DEF_RE = re.compile(r'^def ([a-z][a-z0-9_]*)\(([^)]*)\)[^:\n]*:\n[ \t]+[rRuU]?"""(.*?)"""', re.M | re.S)
_SENTENCE_RE = re.compile(r"(.+?\.)(?:\s|$)")


@functools.lru_cache(maxsize=1)
def corpus() -> Corpus:
    """Words and documented top-level functions of `stdlib_documents()` (cached: ~1 s to build)."""
    docs = stdlib_documents()
    counts = Counter()  # in how many documents a word occurs: data tables' junk strings occur in few
    defs: dict[str, list[tuple[str, str]]] = {}
    for doc in docs:
        counts.update(set(re.findall(r"\b[a-z]{3,12}\b", doc)))
        for m in _DEF_RE.finditer(doc):
            defs.setdefault(m.group(1), []).append((m.group(2), m.group(3)))
    words = tuple(sorted(w for w, c in counts.items() if c >= 8))
    functions = []
    for name, found in defs.items():
        if len(found) != 1:  # a name defined in several modules has no single answer
            continue
        params, doc = found[0]
        first_paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        m = _SENTENCE_RE.match(first_paragraph)
        params = " ".join(params.split())
        # the regex stops at the first ")": parameters holding brackets may be cut, so skip them
        if m and 15 <= len(m.group(1)) <= 160 and m.group(1)[0].isupper() and ">>>" not in m.group(1) \
                and len(params) <= 80 and not any(c in params for c in "([{"):
            functions.append((name, params, m.group(1)))
    return Corpus(words, tuple(sorted(functions)))


# ------------------------------------------------------------------------------------------------
# the generator machinery


class GeneratedTask(Task):
    """Conversations drawn from `make(rng)` until `size` distinct ones of `split` are found.

    `make` returns (split key, dedupe key or None, conversation): the split key picks the split
    (see `split_of`; a tuple of keys must all pick it), the dedupe key keeps conversations within
    a split distinct (None: repeats are allowed, e.g. identity's few facts).
    """

    source = "offline"
    family: str = ""  # hashing namespace of the split keys, shared by tasks that share a generator
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None, name: str | None = None):
        if split not in self.splits:
            raise ValueError(f"bad split {split!r} for {name or self.name}: expected one of {self.splits}")
        self.name = name or self.name
        self.split, self.seed = split, seed
        if size is None:
            size = self.default_size(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")  # str seeds hash the same in every process
        self._items: list[dict] = []
        seen: set[str] = set()
        attempts = candidates = 0  # candidates: draws that fell in this split
        found_at_window_start = 0
        while len(self._items) < size:
            attempts += 1
            # out of distinct examples: almost no new one in the last 1000 candidates (or in far too many draws)
            exhausted = candidates % 1000 == 999 and len(self._items) - found_at_window_start < 10
            if exhausted or attempts > 100 * size + 10_000:
                raise ValueError(f"size={size} is more than the {self.name} generator can make distinct "
                                 f"{split} conversations (found {len(self._items)})")
            split_key, dedupe_key, conversation = self.make(rng)
            keys = split_key if isinstance(split_key, tuple) else (split_key,)
            if len(self.splits) > 1 and any(split_of(self.family or self.name, k) != split for k in keys):
                continue
            candidates += 1
            if candidates % 1000 == 0:
                found_at_window_start = len(self._items)
            if dedupe_key is not None:
                if dedupe_key in seen:
                    continue
                seen.add(dedupe_key)
            self._items.append(conversation)

    def default_size(self, split: str) -> int:
        """Number of conversations when `size` is None."""
        return DEFAULT_TRAIN_SIZE if split == "train" else DEFAULT_HELDOUT_SIZE

    @abc.abstractmethod
    def make(self, rng: random.Random) -> tuple[str | tuple[str, ...], str | None, dict]:
        """One candidate: (split key or keys, dedupe key or None, conversation)."""

    def __len__(self) -> int:
        return len(self._items)

    def _get(self, i: int) -> dict:
        return self._items[i]


def _vary(rng: random.Random, text: str) -> str:
    """Casual typing: sometimes all lowercase, sometimes without the final punctuation."""
    if rng.random() < 0.2:
        text = text.lower()
    if rng.random() < 0.2 and text[-1] in "?.!":
        text = text[:-1]
    return text


# ------------------------------------------------------------------------------------------------
# identity

_IDENTITY = {
    # topic: (user phrasings, answers, the fact every answer states)
    "name": (
        ["What is your name?", "What's your name?", "Who are you?", "What should I call you?",
         "Do you have a name?", "Tell me your name.", "Introduce yourself.", "What are you called?"],
        ["My name is nanofast.", "I'm nanofast, a small language model.", "You can call me nanofast.",
         "I am nanofast. How can I help you?"],
        "nanofast"),
    "maker": (
        ["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Which company made you?",
         "Where do you come from?", "Who is your creator?"],
        ["I was made by the nanofast project.", "The nanofast project built and trained me.",
         "I come from the nanofast project, which trained me from scratch.",
         "I was created by the nanofast project, not by a big company."],
        "nanofast project"),
    "what": (
        ["What are you?", "What kind of AI are you?", "Are you a human?", "How were you trained?",
         "Are you a person or a program?", "Tell me about yourself."],
        ["I am a small language model trained from scratch with nanofast.",
         "I'm a small language model, not a person. I was trained from scratch with nanofast.",
         "I am nanofast, a small language model that was trained from scratch with nanofast."],
        "language model"),
    "limits": (
        ["What are your limitations?", "Can you make mistakes?", "Are you always right?",
         "Can you browse the internet?", "Should I trust everything you say?", "What can't you do?"],
        ["I am a small model, so I can make mistakes. Please check important answers.",
         "I can make mistakes: I am a small language model with limited knowledge, and I cannot browse "
         "the internet.",
         "I cannot browse the internet and I only know what I learned in training, so I can make mistakes."],
        "mistakes"),
}
_GREETINGS = ["", "", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: "]


class Identity(GeneratedTask):
    """Who the model is: its name (nanofast), maker (the nanofast project), what it is, its limits.

    Scored by whether the answer states the fact of the last question's topic (its "keyword").
    """

    name, family, eval_type = "identity", "identity", "generative"

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        turns = 1 if rng.random() < 0.7 else rng.choice([2, 3])
        topics = rng.sample(sorted(_IDENTITY), turns)
        messages = []
        for k, topic in enumerate(topics):
            questions, answers, _ = _IDENTITY[topic]
            question = rng.choice(questions)
            if k == 0:
                question = rng.choice(_GREETINGS) + question
            messages.append({"role": "user", "content": _vary(rng, question)})
            messages.append({"role": "assistant", "content": rng.choice(answers)})
        key = "\n".join(m["content"] for m in messages[::2])
        return key, None, {"messages": messages, "keyword": _IDENTITY[topics[-1]][2]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Does `completion` state the fact the last question asks about (e.g. the name nanofast)?"""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return conversation["keyword"].lower() in completion.lower()


# ------------------------------------------------------------------------------------------------
# spelling bee

_SPELL_QUESTIONS = [
    "How many times does the letter {l} appear in {w}?", "How many {l} are in the word {w}?",
    "Count the letter {l} in {w}.", "How many times is {l} in {w}?", "In the word {w}, how many {l} are there?",
    "Count how many {l} appear in {w}.", "What is the count of {l} in {w}?", "How many {l}'s does {w} have?",
    "Tell me how many {l} are in {w}.", "Number of {l} in {w}?",
]


def spelling_parts(word: str, letter: str) -> list[dict]:
    """Spell `word`, count `letter` by hand, check with Python's str.count, answer "#### N"."""
    count = word.count(letter)
    lines = [f"Spelling '{word}' letter by letter: {','.join(word)}", "", f"Counting '{letter}':"]
    running = 0
    for i, ch in enumerate(word, 1):
        if ch == letter:
            running += 1
            lines.append(f"{i}:{ch} hit! count={running}")  # no space before ch: same token as the spelling
        else:
            lines.append(f"{i}:{ch}")
    lines += ["", f"That gives {running}.", "", "Checking with Python:", "", ""]
    return [{"type": "text", "text": "\n".join(lines)},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives {count}.\n\n#### {count}"}]


class SpellingBee(FinalNumberMixin, GeneratedTask):
    """How many times does a letter appear in a word (words from the embedded corpus)?"""

    name, family = "spellingbee", "spellingbee"

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        word = rng.choice(corpus().words)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice(string.ascii_lowercase)
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = rng.choice(_SPELL_QUESTIONS).format(l=f"{lq}{letter}{lq}", w=f"{wq}{word}{wq}")
        question = _vary(rng, question)
        conversation = {"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": spelling_parts(word, letter)}],
                        "word": word, "letter": letter}
        return f"{word}:{letter}", question, conversation


# ------------------------------------------------------------------------------------------------
# arithmetic word problems in GSM8K's format

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kate", "Leo", "Mia",
          "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Zoe"]
_ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
          ("cookie", "cookies"), ("book", "books"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"),
          ("balloon", "balloons"), ("egg", "eggs"), ("orange", "oranges"), ("crayon", "crayons"),
          ("button", "buttons"), ("flower", "flowers"), ("toy car", "toy cars")]


def _word_problem(rng: random.Random) -> tuple[str, str]:
    """(question, answer with <<expr=result>> annotations and a final "#### N")."""
    n, m = rng.sample(_NAMES, 2)
    one, many = rng.choice(_ITEMS)
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 39)
        s = a + b
        return (f"{n} has {a} {many} and gets {b} more. How many {many} does {n} have now?",
                f"{n} has {a} + {b} = <<{a}+{b}={s}>>{s} {many} now.\n#### {s}")
    if kind == 1:
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        d = a - b
        return (f"{n} has {a} {many} and gives {b} of them to {m}. How many {many} does {n} have left?",
                f"{n} has {a} - {b} = <<{a}-{b}={d}>>{d} {many} left.\n#### {d}")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        p = a * b
        return (f"{n} buys {a} boxes of {many}. Each box has {b} {many}. How many {many} does {n} buy?",
                f"{n} buys {a} * {b} = <<{a}*{b}={p}>>{p} {many}.\n#### {p}")
    if kind == 3:
        k, q = rng.randint(2, 9), rng.randint(2, 11)
        t = k * q
        return (f"{n} shares {t} {many} equally among {k} friends. How many {many} does each friend get?",
                f"Each friend gets {t} / {k} = <<{t}/{k}={q}>>{q} {many}.\n#### {q}")
    if kind == 4:
        a, b = rng.randint(5, 50), rng.randint(2, 40)
        s = a + b
        c = rng.randint(1, s - 1)
        r = s - c
        return (f"{n} has {a} {many}, buys {b} more, then gives {c} to {m}. How many {many} does {n} have now?",
                f"After buying, {n} has {a} + {b} = <<{a}+{b}={s}>>{s} {many}.\n"
                f"After giving some away, {n} has {s} - {c} = <<{s}-{c}={r}>>{r} {many}.\n#### {r}")
    if kind == 5:
        p, k = rng.randint(1, 9), rng.randint(2, 9)
        c = p * k
        bill = next(v for v in (10, 20, 50, 100) if v >= c)
        r = bill - c
        return (f"Each {one} costs ${p}. {n} buys {k} of them and pays with a ${bill} bill. "
                f"How much change does {n} get?",
                f"The {many} cost {k} * {p} = $<<{k}*{p}={c}>>{c}.\n"
                f"The change is {bill} - {c} = $<<{bill}-{c}={r}>>{r}.\n#### {r}")
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
    p = a * b
    t = p + c
    return (f"{n} has {a} bags with {b} {many} in each bag and {c} loose {many}. "
            f"How many {many} does {n} have in total?",
            f"The bags hold {a} * {b} = <<{a}*{b}={p}>>{p} {many}.\n"
            f"In total {n} has {p} + {c} = <<{p}+{c}={t}>>{t} {many}.\n#### {t}")


class Arithmetic(FinalNumberMixin, GeneratedTask):
    """Short word problems (1-2 operations, operands < 100) rendered like GSM8K's conversion."""

    name, family = "arithmetic", "arithmetic"

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        question, answer = _word_problem(rng)
        conversation = {"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": gsm8k_parts(answer)}]}
        return question, question, conversation


# ------------------------------------------------------------------------------------------------
# multiple choice

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class _Vocab:
    keywords: tuple[str, ...]
    builtins: tuple[str, ...]   # built-in functions and types (not the site module's helpers)
    modules: tuple[str, ...]
    plain: tuple[str, ...]      # corpus words that are none of the above
    by_length: dict[int, tuple[str, ...]]
    by_initial: dict[str, tuple[str, ...]]


@functools.lru_cache(maxsize=1)
def _mc_vocab() -> _Vocab:
    keywords = tuple(sorted(keyword.kwlist))
    builtin_names = tuple(sorted(n for n in dir(builtins) if n.islower() and not n.startswith("_")
                                 and isinstance(getattr(builtins, n), (types.BuiltinFunctionType, type))))
    modules = tuple(sorted(n for n in sys.stdlib_module_names if n.isalpha() and n.islower()))
    taken = {w.lower() for w in keywords + builtin_names + modules}
    words = corpus().words
    by_length: dict[int, list[str]] = {}
    by_initial: dict[str, list[str]] = {}
    for w in words:
        by_length.setdefault(len(w), []).append(w)
        by_initial.setdefault(w[0], []).append(w)
    return _Vocab(keywords, builtin_names, modules, tuple(w for w in words if w not in taken),
                  {k: tuple(v) for k, v in by_length.items()}, {k: tuple(v) for k, v in by_initial.items()})


def _mc_question(rng: random.Random) -> tuple[str, str, list[str]]:
    """(subject, question, 4 choices with the correct one first)."""
    vocab = _mc_vocab()
    words = corpus().words
    kind = rng.randrange(8)
    if kind < 3:
        subject, question, pool = [
            ("keywords", "Which of these is a Python keyword?", vocab.keywords),
            ("builtins", "Which of these is a built-in function of Python?", vocab.builtins),
            ("modules", "Which of these is a module of the Python standard library?", vocab.modules)][kind]
        return subject, question, [rng.choice(pool), *rng.sample(vocab.plain, 3)]
    if kind == 3:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-*") if a < 13 and b < 13 else rng.choice("+-")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = rng.sample([value + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        return "arithmetic", f"What is {a} {op} {b}?", [str(v) for v in [value, *wrong]]
    if kind == 4:
        length = rng.randint(3, 9)
        others = [rng.choice(vocab.by_length[k]) for k in rng.sample([k for k in range(3, 13) if k != length], 3)]
        return ("spelling", f"Which of these words has exactly {length} letters?",
                [rng.choice(vocab.by_length[length]), *others])
    if kind == 5:
        letter, *other_letters = rng.sample("abcdefghilmnoprstuw", 4)
        return ("spelling", f"Which of these words starts with the letter {letter}?",
                [rng.choice(vocab.by_initial[x]) for x in [letter, *other_letters]])
    if kind == 6:
        word = rng.choice(words)
        letter = rng.choice(word)
        count = word.count(letter)
        wrong = rng.sample([c for c in range(max(0, count - 3), count + 4) if c != count], 3)
        return ("spelling", f"How many times does the letter {letter} appear in {word}?",
                [str(c) for c in [count, *wrong]])
    functions = corpus().functions
    picked = rng.sample(functions, 4)
    summaries = {s for _, _, s in picked}
    if len(summaries) < 4:  # two functions documented alike: the question would have two answers
        return _mc_question(rng)
    return ("functions", f'Which Python function is documented as: "{picked[0][2]}"?',
            [f[0] for f in picked])


class MultipleChoice(LetterMixin, GeneratedTask):
    """4-way multiple choice from the embedded data (keywords, builtins, modules, sums, spelling,
    function docs), rendered like MMLU/ARC; stands in for them when they are not downloaded."""

    name, family = "multiple_choice", "multiple_choice"
    splits = ("train", "validation", "dev", "test")

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        subject, question, choices = _mc_question(rng)
        correct = choices[0]
        if len(set(choices)) != len(choices):  # e.g. a sampled distractor equal to the answer
            return self.make(rng)
        rng.shuffle(choices)
        letter = LETTERS[choices.index(correct)]
        conversation = mc_conversation(question, LETTERS, choices, letter, subject=subject)
        key = f"{question}\0{correct}"  # the same question and answer with other distractors is no new question
        return key, key, conversation


# ------------------------------------------------------------------------------------------------
# general chat (stands in for SmolTalk)

_DOC_QUESTIONS = ["What does the function {f} do?", "What does {f}() do?", "Explain what the Python function {f} does.",
                  "Can you tell me what {f} is for?", "What is the purpose of {f}?"]
_DOC_ANSWERS = ["The function {f} does this: {s}", "According to its documentation: {s}", "{f}: {s}",
                "Here is what {f} does. {s}"]
_PARAM_QUESTIONS = ["What arguments does the function {f} take?", "What are the parameters of {f}?",
                    "How do I call {f}?"]
_SMALL_TALK = [
    (["Hello!", "Hi", "Hey there!", "Good morning!"], ["Hello! How can I help you today?", "Hi! What can I do for you?"]),
    (["Thanks!", "Thank you.", "Thanks a lot, that helps."], ["You're welcome!", "Glad I could help."]),
    (["Goodbye!", "Bye.", "See you later."], ["Goodbye! Have a nice day.", "Bye! Come back any time."]),
    (["How are you?", "How are you doing today?"], ["I'm doing well, thank you. How can I help?"]),
]
_WORD_TASKS = [
    ("Write the word {w} in uppercase.", lambda w: w.upper()),
    ("Reverse the letters of the word {w}.", lambda w: w[::-1]),
    ("Spell the word {w}.", lambda w: f"{w}:{','.join(w)}"),
    ("How many letters does the word {w} have?", lambda w: f"The word {w} has {len(w)} letters."),
]


def _chat_turn(rng: random.Random) -> tuple[str, str, str]:
    """(split key, user text, assistant text) of one exchange."""
    kind = rng.randrange(10)
    if kind < 5:
        f, _, summary = rng.choice(corpus().functions)
        return (f"doc:{f}", rng.choice(_DOC_QUESTIONS).format(f=f),
                rng.choice(_DOC_ANSWERS).format(f=f, s=summary))
    if kind < 7:
        f, params, _ = rng.choice(corpus().functions)
        answer = f"{f} takes these parameters: {params}." if params else f"{f} takes no arguments."
        return f"params:{f}", rng.choice(_PARAM_QUESTIONS).format(f=f), answer
    if kind < 9:
        word = rng.choice(corpus().words)
        template, solve = rng.choice(_WORD_TASKS)
        return f"word:{template}:{word}", template.format(w=word), solve(word)
    questions, answers = rng.choice(_SMALL_TALK)
    question = rng.choice(questions)
    return f"talk:{question}", question, rng.choice(answers)


class SmolTalkOffline(GeneratedTask):
    """General chat from templates over the embedded corpus (what does function X do, its
    parameters, word games, small talk), 1-3 exchanges, sometimes with a system message."""

    name, family, eval_type = "smoltalk", "smoltalk", "generative"

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        turns = [_chat_turn(rng) for _ in range(1 if rng.random() < 0.7 else rng.choice([2, 3]))]
        messages = []
        if rng.random() < 0.1:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        for _, question, answer in turns:
            messages += [{"role": "user", "content": _vary(rng, question)}, {"role": "assistant", "content": answer}]
        # every subject of the conversation must belong to the split: one subject's questions
        # (e.g. about one function) never appear on both sides
        users = "\n".join(m["content"] for m in messages if m["role"] == "user")
        return tuple(t[0] for t in turns), users, {"messages": messages}


# ------------------------------------------------------------------------------------------------
# small coding problems in HumanEval's format


@dataclass(frozen=True)
class _Problem:
    name: str
    signature: str       # parameters and return annotation, e.g. "(x: int) -> int"
    doc: str
    body: str            # the canonical solution's statements, unindented, one per line
    reference: Callable  # an independent implementation that computes the expected outputs
    inputs: tuple        # argument tuples for the docstring example and the tests


def _problems() -> list[_Problem]:
    ints = ((0,), (3,), (-4,), (10,), (57,))
    texts = (("hello",), ("banana",), ("",), ("Mississippi",), ("a b c",))
    lists = (([1, 2, 3],), ([5, -2, 9, 0],), ([7],), ([-3, -8, -1],))
    out = []
    for k in range(2, 21):
        out += [
            _Problem(f"add_{k}", "(x: int) -> int", f"Return x plus {k}.", f"return x + {k}",
                     lambda x, k=k: k + x, ints),
            _Problem(f"multiply_by_{k}", "(x: int) -> int", f"Return x multiplied by {k}.", f"return x * {k}",
                     lambda x, k=k: sum([x] * k), ints),
            _Problem(f"subtract_{k}", "(x: int) -> int", f"Return x minus {k}.", f"return x - {k}",
                     lambda x, k=k: -(k - x), ints),
            _Problem(f"is_divisible_by_{k}", "(x: int) -> bool", f"Return True if x is divisible by {k}.",
                     f"return x % {k} == 0", lambda x, k=k: (x // k) * k == x, ints + ((k * 3,),)),
        ]
    for c in "aeinorst":
        out += [
            _Problem(f"count_{c}", "(s: str) -> int", f"Return how many times the letter '{c}' appears in s.",
                     f"return s.count('{c}')", lambda s, c=c: sum(ch == c for ch in s), texts),
            _Problem(f"starts_with_{c}", "(s: str) -> bool", f"Return True if s starts with the letter '{c}'.",
                     f"return s.startswith('{c}')", lambda s, c=c: s[:1] == c, texts + ((c + "xyz",),)),
        ]
    for k in range(2, 5):
        out.append(_Problem(f"repeat_{k}", "(s: str) -> str", f"Return s repeated {k} times.",
                            f"return s * {k}", lambda s, k=k: "".join([s] * k), texts))
    out += [
        _Problem("add", "(a: int, b: int) -> int", "Return the sum of a and b.", "return a + b",
                 lambda a, b: sum([a, b]), ((1, 2), (0, 0), (-5, 3), (40, 2))),
        _Problem("reverse_string", "(s: str) -> str", "Return s reversed.", "return s[::-1]",
                 lambda s: "".join(reversed(s)), texts),
        _Problem("count_vowels", "(s: str) -> int", "Return the number of vowels (a, e, i, o, u) in s.",
                 "return sum(1 for ch in s if ch in 'aeiou')", lambda s: len([c for c in s if c in "aeiou"]), texts),
        _Problem("max_of_list", "(xs: list) -> int", "Return the largest number in the non-empty list xs.",
                 "return max(xs)", lambda xs: sorted(xs)[-1], lists),
        _Problem("min_of_list", "(xs: list) -> int", "Return the smallest number in the non-empty list xs.",
                 "return min(xs)", lambda xs: sorted(xs)[0], lists),
        _Problem("sum_of_list", "(xs: list) -> int", "Return the sum of the numbers in xs.", "return sum(xs)",
                 lambda xs: functools.reduce(lambda a, b: a + b, xs, 0), lists + (([],),)),
        _Problem("is_palindrome", "(s: str) -> bool", "Return True if s reads the same forwards and backwards.",
                 "return s == s[::-1]", lambda s: all(s[i] == s[-1 - i] for i in range(len(s))),
                 texts + (("level",), ("abba",))),
        _Problem("square", "(x: int) -> int", "Return x squared.", "return x * x", lambda x: x ** 2, ints),
        _Problem("to_upper", "(s: str) -> str", "Return s in uppercase.", "return s.upper()",
                 lambda s: "".join(ch.upper() for ch in s), texts),
        _Problem("first_element", "(xs: list) -> int", "Return the first element of the non-empty list xs.",
                 "return xs[0]", lambda xs: next(iter(xs)), lists),
        _Problem("last_element", "(xs: list) -> int", "Return the last element of the non-empty list xs.",
                 "return xs[-1]", lambda xs: list(reversed(xs))[0], lists),
        _Problem("string_length", "(s: str) -> int", "Return the number of characters in s.", "return len(s)",
                 lambda s: sum(1 for _ in s), texts),
        _Problem("is_even", "(x: int) -> bool", "Return True if x is even.", "return x % 2 == 0",
                 lambda x: x // 2 * 2 == x, ints),
        _Problem("absolute_value", "(x: int) -> int", "Return the absolute value of x.", "return abs(x)",
                 lambda x: x if x >= 0 else -x, ints),
        _Problem("factorial", "(n: int) -> int", "Return n factorial (n >= 0).",
                 "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
                 lambda n: functools.reduce(lambda a, b: a * b, range(1, n + 1), 1), ((0,), (1,), (5,), (7,))),
        _Problem("remove_spaces", "(s: str) -> str", "Return s with every space removed.",
                 "return s.replace(' ', '')", lambda s: "".join(ch for ch in s if ch != " "), texts),
        _Problem("count_words", "(s: str) -> int", "Return the number of words in s, separated by spaces.",
                 "return len(s.split())", lambda s: len([w for w in s.split(" ") if w]), texts),
        _Problem("double_list", "(xs: list) -> list", "Return a list with every number of xs doubled.",
                 "return [2 * x for x in xs]", lambda xs: [x + x for x in xs], lists),
        _Problem("filter_positive", "(xs: list) -> list", "Return the numbers of xs that are greater than 0.",
                 "return [x for x in xs if x > 0]", lambda xs: list(filter(lambda x: x > 0, xs)), lists),
        _Problem("sort_list", "(xs: list) -> list", "Return the numbers of xs sorted from smallest to largest.",
                 "return sorted(xs)", lambda xs: functools.reduce(
                     lambda acc, x: [a for a in acc if a <= x] + [x] + [a for a in acc if a > x], xs, []), lists),
        _Problem("last_char", "(s: str) -> str", "Return the last character of s, or '' if s is empty.",
                 "return s[-1:]", lambda s: s[len(s) - 1] if s else "", texts),
    ]
    return out


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def coding_problem(p: _Problem) -> dict:
    """A HumanEval-format conversation (prompt, canonical solution, test, entry_point) for `p`."""
    example = p.inputs[1] if len(p.inputs) > 1 else p.inputs[0]
    prompt = (f"def {p.name}{p.signature}:\n    \"\"\"{p.doc}\n    >>> {_call(p.name, example)}\n"
              f"    {p.reference(*example)!r}\n    \"\"\"\n")
    solution = "".join(f"    {line}\n" for line in p.body.split("\n"))
    test = "def check(candidate):\n" + "".join(
        f"    assert {_call('candidate', args)} == {p.reference(*args)!r}\n" for args in p.inputs)
    return humaneval_conversation(prompt, solution, test, p.name)


class HumanEvalOffline(HumanEvalMixin, GeneratedTask):
    """Small Python functions (add k, count a letter, reverse a string, max of a list, ...) in
    HumanEval's format; test split only, like HumanEval. A fixed problem set like the real one, so
    `size` caps it (in a seeded order) rather than generating more."""

    name, family = "humaneval", "humaneval"
    splits = ("test",)

    def __init__(self, split: str = "test", seed: int = 0, size: int | None = None, name: str | None = None):
        problems = _problems()
        random.Random(f"humaneval/{seed}").shuffle(problems)
        self._pool = problems
        super().__init__(split, seed, None if size is None else min(size, len(problems)), name)

    def default_size(self, split: str) -> int:
        return len(self._pool)

    def make(self, rng: random.Random) -> tuple[str, str | None, dict]:
        problem = self._pool[len(self._items)]  # in the seeded order, each problem once
        return problem.name, problem.name, coding_problem(problem)
