"""The CORE metric: DCLM's in-context-learning tasks, scored the way nanochat scores its base models.

The eval bundle (`core.yaml`, `eval_meta_data.csv`, `eval_data/**/*.jsonl`) is downloaded once, under a
file lock, into `base_dir()/eval_bundle`. Every example is rendered with nanochat's prompt templates and
few-shot sampling (`random.Random(1234 + index)` over the other evaluated examples), so numbers are
comparable with nanochat's:

- multiple_choice: same context, one continuation per choice; the choice with the lowest mean loss wins.
- schema: one context per option, a common continuation; the option with the lowest mean loss wins.
- language_modeling: correct iff greedy argmax reproduces every continuation token.

All candidates of an example go through the model in one right-padded forward. Accuracy per task is
centred on its random baseline, `(acc - b) / (1 - b)`, and CORE is the mean centred accuracy.

Without the bundle (no network), `offline_core_tasks` builds one task of each type from the embedded
stdlib corpus in the same structures; its scores are marked `"source": "offline"` and are not CORE.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import random
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from filelock import FileLock

from nanofast.common import all_sum, base_dir
from nanofast.dataset import stdlib_documents
from nanofast.download import DownloadError, RetryableError, download_file

if TYPE_CHECKING:
    from nanofast.tokenizer import Tokenizer

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIR = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat shuffles each task with this before truncating to max_per_task
FEWSHOT_SEED = 1234  # nanochat seeds example i's few-shot draw with FEWSHOT_SEED + i


@dataclass
class CoreTask:
    """One ICL task: its rows (dicts as in the bundle's jsonl) and how to render and score them.

    random_baseline is in percent (as in eval_meta_data.csv); source is "real" (the DCLM bundle) or
    "offline" (generated from the embedded corpus).
    """
    label: str
    icl_task_type: str
    num_fewshot: int
    continuation_delimiter: str
    examples: list[dict] = field(repr=False)
    random_baseline: float
    source: str = "real"


@dataclass
class ExampleScore:
    """The outcome of one example: whether it was right, the chosen candidate (None for
    language_modeling) and each candidate's mean continuation loss (empty for language_modeling)."""
    correct: bool
    choice: int | None
    losses: list[float]


# ---------------------------------------------------------------------------------------------
# the bundle: download once under a lock, then parse

def _bundle_ready(bundle: Path) -> bool:
    return (bundle / "core.yaml").is_file()


def ensure_bundle(base: str | os.PathLike | None = None, download: bool = False, *, url: str = EVAL_BUNDLE_URL,
                  retries: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> Path | None:
    """Return `base_dir(base)/eval_bundle` if it is there; else download and extract it when
    `download` is true (once across processes: a file lock serialises callers and the loser of the
    race finds the bundle in place), else return None.

    The zip streams into `eval_bundle.zip.part` (resumed with HTTP Range after a cut), is checked
    (CRC of every member, a core.yaml inside) before it is renamed, and is extracted into a temporary
    folder that is renamed into place, so `eval_bundle/` only ever names a complete bundle.
    """
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(f"need retries >= 0, backoff >= 0, timeout > 0; got retries={retries}, "
                         f"backoff={backoff}, timeout={timeout}")
    root = base_dir(base)
    bundle = root / BUNDLE_DIR
    if _bundle_ready(bundle):
        return bundle
    if not download:
        return None
    with FileLock(str(root / f"{BUNDLE_DIR}.lock")):
        if _bundle_ready(bundle):  # another caller finished it while we waited for the lock
            return bundle
        if bundle.exists():
            raise FileExistsError(f"{bundle} exists but has no core.yaml (not written by ensure_bundle): "
                                  "remove it so the bundle can be downloaded")
        archive = root / f"{BUNDLE_DIR}.zip"
        if not archive.is_file():
            _download_zip(url, archive, retries, backoff, timeout)
        _extract_bundle(archive, root, bundle)
        archive.unlink()
    return bundle


def _download_zip(url: str, final: Path, retries: int, backoff: float, timeout: float) -> None:
    try:
        download_file(url, final, retries, backoff, timeout, verify=_verify_zip)
    except DownloadError as e:
        raise DownloadError(f"eval bundle: {e}") from None


def _verify_zip(part: Path, total: int | None) -> None:
    size = part.stat().st_size
    if total is not None and size != total:
        raise RetryableError(f"{part.name}: got {size} of {total} bytes")  # keep it: the next try resumes
    try:
        with zipfile.ZipFile(part) as zf:
            bad = zf.testzip()
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        part.unlink()  # corrupt bytes are not worth resuming from
        raise RetryableError(f"{part.name}: not a readable zip file ({e})") from None
    if bad is not None:
        part.unlink()
        raise RetryableError(f"{part.name}: member {bad!r} fails its CRC check")
    # core.yaml at the root or in one top-level folder: the layouts _extract_bundle accepts
    if not any(n == "core.yaml" or (n.count("/") == 1 and n.endswith("/core.yaml")) for n in names):
        part.unlink()
        raise DownloadError(f"{part.name} is a zip without core.yaml: the URL does not serve the CORE eval bundle")


def _extract_bundle(archive: Path, root: Path, bundle: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_DIR}-", dir=root))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and '..' components
        # nanochat's zip holds a top-level eval_bundle/ folder; accept the files at the root too.
        candidates = [tmp / BUNDLE_DIR, tmp] + sorted(p for p in tmp.iterdir() if p.is_dir())
        src = next((c for c in candidates if (c / "core.yaml").is_file()), None)
        if src is None:
            raise DownloadError(f"{archive.name} has no core.yaml at its root or in one top-level folder")
        os.replace(src, bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_core_tasks(bundle_dir: str | os.PathLike) -> list[CoreTask]:
    """Parse `core.yaml` (either nanochat's `icl_tasks:` mapping or a bare list of tasks), the random
    baselines of `eval_meta_data.csv` and each task's jsonl under `eval_data/`.

    Raises FileNotFoundError for a missing file and ValueError naming the file, row and key of
    anything malformed.
    """
    bundle = Path(bundle_dir)
    config_path, meta_path = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"CORE bundle file {path} is missing: call ensure_bundle(download=True)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{config_path} is not valid YAML: {e}") from None
    rows = config.get("icl_tasks") if isinstance(config, dict) else config
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{config_path} must hold a non-empty list of tasks (or an 'icl_tasks:' list)")
    baselines = _read_baselines(meta_path)
    tasks, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{config_path} task {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} must be a mapping, got {type(row).__name__}")
        for key in ("label", "dataset_uri", "icl_task_type"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {row.get(key)!r}")
        label = row["label"]
        if label in seen:
            raise ValueError(f"{where}: duplicate label {label!r}")
        seen.add(label)
        kind = row["icl_task_type"]
        if kind not in TASK_TYPES:
            raise ValueError(f"{where} ({label}): unknown icl_task_type {kind!r}, expected one of {list(TASK_TYPES)}")
        shots = row.get("num_fewshot", 0)
        if isinstance(shots, list):  # the bundle lists shot counts; nanochat evaluates the first
            shots = shots[0] if shots else None
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"{where} ({label}): num_fewshot must be an int >= 0 or a non-empty list of them, "
                             f"got {row.get('num_fewshot')!r}")
        delimiter = row.get("continuation_delimiter", " ")
        if not isinstance(delimiter, str):
            raise ValueError(f"{where} ({label}): continuation_delimiter must be a string, got {delimiter!r}")
        baseline = _baseline(meta_path, baselines, label)
        data_path = bundle / "eval_data" / row["dataset_uri"]
        if not data_path.is_file():
            raise FileNotFoundError(f"task {label!r}: dataset file {data_path} is missing")
        examples = _read_jsonl(data_path, kind)
        if not examples:
            raise ValueError(f"task {label!r}: {data_path} has no examples")
        tasks.append(CoreTask(label, kind, shots, delimiter, examples, baseline, "real"))
    return tasks


def _read_baselines(path: Path) -> dict[str, tuple[int, str]]:
    """Eval Task -> (line number, raw 'Random baseline'); parsed only for the tasks core.yaml uses."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}")
        return {row["Eval Task"]: (line, row["Random baseline"]) for line, row in enumerate(reader, start=2)}


def _baseline(path: Path, baselines: dict[str, tuple[int, str]], label: str) -> float:
    if label not in baselines:
        raise ValueError(f"{path} has no 'Random baseline' for task {label!r}")
    line, raw = baselines[label]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{path} line {line} ({label}): 'Random baseline' {raw!r} is not a number") from None
    if not 0 <= value < 100:
        raise ValueError(f"{path} line {line} ({label}): 'Random baseline' must be in [0, 100) percent, got {value}")
    return value


def _read_jsonl(path: Path, kind: str) -> list[dict]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: invalid JSON ({e})") from None
            check_example(row, kind, f"{path} line {line_no}")
            examples.append(row)
    return examples


def check_example(row: Any, kind: str, where: str = "example") -> None:
    """Raise ValueError (naming `where` and the key) unless `row` has the fields `kind` needs."""
    if kind not in TASK_TYPES:
        raise ValueError(f"{where}: unknown icl_task_type {kind!r}, expected one of {list(TASK_TYPES)}")
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a {kind} row must be a JSON object, got {type(row).__name__}")
    strings = {"multiple_choice": ("query",), "schema": ("continuation",),
               "language_modeling": ("context", "continuation")}[kind]
    for key in strings:
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: {kind} rows need a string '{key}', got {row.get(key)!r}")
    if kind == "language_modeling":
        return
    key = "choices" if kind == "multiple_choice" else "context_options"
    options = row.get(key)
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: {kind} rows need '{key}' as a non-empty list of strings, got {options!r}")
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise ValueError(f"{where}: 'gold' must be an index into the {len(options)} {key}, got {gold!r}")


# ---------------------------------------------------------------------------------------------
# prompts: nanochat's templates, restated without jinja

def sample_fewshot(num_examples: int, index: int, num_fewshot: int) -> list[int]:
    """Indices of the few-shot examples for example `index` among `num_examples`: nanochat's draw,
    `random.Random(1234 + index).sample(others, num_fewshot)`, so deterministic and never `index`."""
    if not 0 <= index < num_examples:
        raise ValueError(f"index must be in [0, {num_examples}), got {index}")
    if num_fewshot > num_examples - 1:
        raise ValueError(f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} examples to draw from, "
                         f"have {num_examples}: raise max_per_task or lower num_fewshot")
    if num_fewshot <= 0:
        return []
    others = [i for i in range(num_examples) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, num_fewshot)


def render_prompts(task: CoreTask, item: dict, fewshot: Sequence[dict]) -> list[str]:
    """The candidate prompts of one example: one per choice (multiple_choice), one per context option
    (schema), or [prompt without, prompt with] the continuation (language_modeling)."""
    d = task.continuation_delimiter
    kind = task.icl_task_type
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    if kind == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
        head = f"{shots}{item['context'].strip()}{d}"
        # Strip the prompt without the continuation (as nanochat does): a trailing delimiter space
        # would be merged into the continuation's first token in the full prompt.
        return [head.strip(), head + item["continuation"]]
    raise ValueError(f"task {task.label!r}: unknown icl_task_type {kind!r}, expected one of {list(TASK_TYPES)}")


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def build_candidates(tokenizer: Tokenizer, task: CoreTask, examples: Sequence[dict], index: int,
                     max_seq_len: int | None = None) -> list[tuple[list[int], int, int]]:
    """Token rows of example `index` (few-shot drawn from `examples`) as (tokens, start, end):
    tokens[start:end] is the scored continuation. Rows longer than `max_seq_len` lose tokens on the
    left, so the continuation is always kept whole.
    """
    item = examples[index]
    fewshot = [examples[i] for i in sample_fewshot(len(examples), index, task.num_fewshot)]
    prompts = render_prompts(task, item, fewshot)
    rows = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    if task.icl_task_type == "language_modeling":
        without, with_ = rows
        # nanochat asserts the shorter prompt tokenizes as a prefix; where BPE merges across the
        # boundary, score from the first differing token instead.
        start = min(_common_prefix([without, with_]), len(with_) - 1)
        spans = [(with_, start, len(with_))]
    elif task.icl_task_type == "multiple_choice":
        # Choices share the context: score from the first token where they differ (at least one
        # token each, even if a choice is a prefix of another).
        start = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
        spans = [(r, start, len(r)) for r in rows]
    else:
        suffix = min(_common_suffix(rows), min(len(r) for r in rows) - 1)
        spans = [(r, len(r) - suffix, len(r)) for r in rows]
    if max_seq_len is not None:
        cropped = []
        for tokens, start, end in spans:
            crop = max(0, len(tokens) - max_seq_len)
            if start - crop < 1:  # the first continuation token needs a position before it
                raise ValueError(f"task {task.label!r} example {index}: its continuation of {end - start} tokens "
                                 f"does not fit in the model's sequence_len {max_seq_len}")
            cropped.append((tokens[crop:], start - crop, end - crop))
        spans = cropped
    return spans


# ---------------------------------------------------------------------------------------------
# scoring

def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _max_seq_len(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "sequence_len", None)


@torch.no_grad()
def score_example(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, examples: Sequence[dict], index: int,
                  device: torch.device | str | None = None) -> ExampleScore:
    """Score example `index` of `examples` with every candidate in one right-padded forward.

    `model(idx)` must return logits (B, T, vocab); prompts are cropped to `model.config.sequence_len`
    when the model has one.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    spans = build_candidates(tokenizer, task, examples, index, _max_seq_len(model))
    T = max(len(tokens) for tokens, _, _ in spans)
    pad = tokenizer.bos_token_id  # any id works: causal attention keeps padding out of earlier positions
    ids = torch.full((len(spans), T), pad, dtype=torch.long)
    targets = torch.full((len(spans), T), -1, dtype=torch.long)
    for b, (tokens, start, end) in enumerate(spans):
        ids[b, :len(tokens)] = torch.tensor(tokens)
        targets[b, start - 1:end - 1] = ids[b, start:end]  # position t predicts token t + 1
    ids, targets = ids.to(device), targets.to(device)
    logits = model(ids).float()
    if task.icl_task_type == "language_modeling":
        mask = targets[0] >= 0
        correct = bool((logits[0, mask].argmax(dim=-1) == targets[0, mask]).all())
        return ExampleScore(correct, None, [])
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                             reduction="none").view(targets.shape)
    counts = (targets >= 0).sum(dim=1)
    means = (losses.sum(dim=1) / counts).tolist()
    choice = means.index(min(means))  # ties go to the first candidate, as in nanochat
    return ExampleScore(choice == examples[index]["gold"], choice, means)


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so chance (random_baseline, in percent) is 0 and perfect is 1."""
    if not 0 <= random_baseline < 100:
        raise ValueError(f"random_baseline must be in [0, 100) percent, got {random_baseline}")
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def task_examples(task: CoreTask, max_per_task: int | None = None) -> list[dict]:
    """The examples evaluated for `task`: shuffled with nanochat's seed, then the first `max_per_task`."""
    if max_per_task is not None and (isinstance(max_per_task, bool) or not isinstance(max_per_task, int)
                                     or max_per_task < 1):
        raise ValueError(f"max_per_task must be None or an int >= 1, got {max_per_task!r}")
    examples = list(task.examples)
    random.Random(SHUFFLE_SEED).shuffle(examples)
    return examples[:max_per_task] if max_per_task is not None else examples


def evaluate_core(model: torch.nn.Module, tokenizer: Tokenizer, tasks: list[CoreTask], *, max_per_task: int | None = None,
                  device: torch.device | str | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Accuracy and centred accuracy per task, and CORE = the mean centred accuracy.

    Returns {"core": float, "source": "real" | "offline", "tasks": {label: {"accuracy", "centered", "n"}}}.
    All tasks must come from one source: a mean over bundle and offline tasks means nothing.
    With world_size > 1 (a process group formed) rank r scores examples r, r + world_size, ... and
    the counts are summed: every rank returns what one rank computes (an example's few-shot
    context depends on its index only).
    """
    if not tasks:
        raise ValueError("tasks is empty: pass load_core_tasks(...) or offline_core_tasks()")
    sources = {t.source for t in tasks}
    if len(sources) != 1:
        raise ValueError(f"tasks mix sources {sorted(sources)}: evaluate real and offline tasks separately")
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate task labels in {labels}")
    sizes, correct = [], []
    for task in tasks:
        if task.icl_task_type not in TASK_TYPES:
            raise ValueError(f"task {task.label!r}: unknown icl_task_type {task.icl_task_type!r}, "
                             f"expected one of {list(TASK_TYPES)}")
        examples = task_examples(task, max_per_task)
        if not examples:
            raise ValueError(f"task {task.label!r} has no examples")
        sizes.append(len(examples))
        correct.append(sum(score_example(model, tokenizer, task, examples, i, device).correct
                           for i in range(rank, len(examples), world_size)))
    if world_size > 1:
        correct = all_sum(correct, device or next(model.parameters()).device, world_size)
    results = {}
    for task, n, right in zip(tasks, sizes, correct):
        accuracy = right / n
        results[task.label] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task.random_baseline),
                               "n": n}
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "source": sources.pop(), "tasks": results}


# ---------------------------------------------------------------------------------------------
# offline tasks from the embedded corpus (same structures, not the real CORE)

OFFLINE_MC_CHOICES = 4
OFFLINE_SCHEMA_OPTIONS = 2
_MIN_LINE, _MAX_LINE = 8, 80  # characters: long enough to carry signal, short enough for tiny models


@functools.lru_cache(maxsize=1)
def _offline_corpus() -> tuple[tuple[tuple[str, ...], ...], list[tuple[int, int]], list[str]]:
    """The seed-independent part of the offline tasks, computed once per process: each stdlib
    document as stripped lines (indentation dropped, so choices differ in content only); every
    (doc, i) whose line i and the three before it are good; the good lines found in >= 3 documents.
    """
    docs = tuple(tuple(line.strip() for line in doc.splitlines()) for doc in stdlib_documents())
    windows, counts = [], Counter()
    for d, lines in enumerate(docs):
        good = [_good(line) for line in lines]
        windows += [(d, i) for i in range(3, len(lines)) if good[i - 3] and good[i - 2] and good[i - 1] and good[i]]
        counts.update({line for line, ok in zip(lines, good) if ok and _split_points(line)})
    common = sorted(line for line, n in counts.items() if n >= 3)  # sorted: the draw must not depend on set order
    return docs, windows, common


def _good(line: str) -> bool:
    return (_MIN_LINE <= len(line) <= _MAX_LINE and line.isascii() and line.isprintable()
            and not line.startswith(("#", '"', "'")) and any(c.isalnum() for c in line))


def _distractors(rng: random.Random, docs, pool: list[tuple[int, int]], doc_index: int, avoid: set[str],
                 n: int, span: int) -> list[str]:
    """n distinct texts of `span` consecutive lines from documents other than doc_index."""
    out: list[str] = []
    while len(out) < n:
        d, i = pool[rng.randrange(len(pool))]
        if d == doc_index:
            continue
        text = "\n".join(docs[d][i - span + 1:i + 1])
        if text not in avoid:
            avoid.add(text)
            out.append(text)
    return out


def _distinct_windows(rng: random.Random, windows: list[tuple[int, int]], size: int, key):
    """Yield `size` random (doc, line) windows whose key(doc, line) differ. A generator, so the
    caller's own draws from `rng` interleave with the sampling exactly as in one loop."""
    seen = set()
    while len(seen) < size:
        d, i = windows[rng.randrange(len(windows))]
        k = key(d, i)
        if k not in seen:
            seen.add(k)
            yield d, i


def offline_core_tasks(seed: int = 0, size: int = 100) -> list[CoreTask]:
    """Three tasks generated from the stdlib corpus, one per ICL type, deterministic in `seed`:

    - offline_next_line (multiple_choice, 4 choices, baseline 25%): given three lines of code, which
      line comes next (the others are lines from other files);
    - offline_preceding_lines (schema, 2 options, baseline 50%): which two lines precede a given line;
    - offline_common_line (language_modeling, baseline 0%): complete a line that recurs across files.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4 (few-shot examples are drawn from the task), got {size!r}")
    rng = random.Random(seed)
    docs, windows, common = _offline_corpus()
    if size > len(common):
        raise ValueError(f"size={size} exceeds the {len(common)} common lines of the corpus")
    mc = []
    for d, i in _distinct_windows(rng, windows, size, key=lambda d, i: "\n".join(docs[d][i - 3:i])):
        query, gold_line = "\n".join(docs[d][i - 3:i]), docs[d][i]
        choices = [gold_line] + _distractors(rng, docs, windows, d, {gold_line}, OFFLINE_MC_CHOICES - 1, 1)
        rng.shuffle(choices)
        mc.append({"query": query, "choices": choices, "gold": choices.index(gold_line)})
    schema = []
    for d, i in _distinct_windows(rng, windows, size, key=lambda d, i: docs[d][i]):
        context, continuation = "\n".join(docs[d][i - 2:i]), docs[d][i]
        options = [context] + _distractors(rng, docs, windows, d, {context}, OFFLINE_SCHEMA_OPTIONS - 1, 2)
        rng.shuffle(options)
        schema.append({"context_options": options, "continuation": continuation, "gold": options.index(context)})
    lm = [_split_line(rng, line) for line in rng.sample(common, size)]
    return [
        CoreTask("offline_next_line", "multiple_choice", 1, "\n", mc, 100.0 / OFFLINE_MC_CHOICES, "offline"),
        CoreTask("offline_preceding_lines", "schema", 0, "\n", schema, 100.0 / OFFLINE_SCHEMA_OPTIONS, "offline"),
        CoreTask("offline_common_line", "language_modeling", 2, " ", lm, 0.0, "offline"),
    ]


def _split_points(line: str) -> list[int]:
    """Single spaces with text on both sides: context + ' ' + continuation rebuilds the line exactly."""
    return [p for p in range(1, len(line) - 1) if line[p] == " " and line[p - 1] != " " and line[p + 1] != " "]


def _split_line(rng: random.Random, line: str) -> dict:
    points = _split_points(line)
    # Split in the second half when possible: a longer context makes the completion learnable.
    p = rng.choice([q for q in points if q >= len(line) // 2] or points)
    return {"context": line[:p], "continuation": line[p + 1:]}
