"""Pretraining shards on disk, and the small default corpus embedded in every Python install.

A data directory holds parquet files named `shard_{i:05d}.parquet` with a single `text` column,
one document per row. The LAST shard (in sorted order) is always the validation split, the
others are the training split. Two sources produce such directories:

- ClimbMix (the nanochat pretraining set), downloaded by `nanofast.download`: 6543 shards of
  ~100 MB with 1000-row row groups; shard 6542 is the validation shard.
- The default corpus written by `write_default_corpus`: the `.py` sources of the installed Python
  standard library. It needs no network, so the tokenizer and smoke-test stages run anywhere.
"""
from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet"
CLIMBMIX_NUM_SHARDS = 6543  # shard_06542 is the validation shard

SPLITS = ("train", "val")
MANIFEST = "default_corpus.json"  # written last: its presence with complete=True marks a finished corpus
CORPUS_SEED = 1337  # fixed so that every machine writes the same shards
# ~730 stdlib files make ~90 documents per shard; 16-row groups give ~40 train row groups, enough
# for ranks (which split the data by row group) to get near-equal shares.
CORPUS_ROW_GROUP = 16
# Directory names under the stdlib that are not "library source": test suites and installed packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def shard_name(index: int) -> str:
    """File name of shard `index`, e.g. 7 -> 'shard_00007.parquet'."""
    return f"shard_{index:05d}.parquet"


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """All complete parquet shards in `data_dir`, sorted by name (temp/partial files are ignored)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    # Partial downloads end in .part and unfinished writes in .tmp, so a suffix match excludes them.
    return sorted(p for p in data_dir.iterdir() if p.suffix == ".parquet" and p.is_file())


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split: 'val' is the last shard, 'train' all the others."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
    paths = list_shards(data_dir)
    if not paths:
        raise FileNotFoundError(
            f"no parquet shards in {data_dir}: run `python train.py --stage tokenizer` "
            "(writes the default corpus) or download ClimbMix with --data climbmix")
    if split == "val":
        return paths[-1:]
    if len(paths) < 2:
        raise ValueError(f"only one parquet shard in {data_dir}, which is the validation shard: "
                         "the train split needs at least two shards")
    return paths[:-1]


class Location(NamedTuple):
    """Where a row group lives: file index in the path list, row group in that file, and its
    global index counted across all files (the unit that ranks divide among themselves)."""
    file: int
    row_group: int
    index: int


def iter_documents(paths: Sequence[str | os.PathLike], start: int = 0,
                   step: int = 1) -> Iterator[tuple[Location, list[str]]]:
    """Yield `(location, texts)` for the row groups with global index start, start+step, ...

    Row groups are numbered globally across `paths` in order, so rank r of w passing start=r,
    step=w reads a disjoint share; resuming from global index g is start=g with the same step.
    Only the footers of files before `start` are read, never their data.
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    offset = 0  # global index of the first row group of the current file
    for file_idx, path in enumerate(paths):
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_row_groups
        if start < offset + n:
            # first global index >= max(start, offset) that is congruent to start modulo step
            first = start if start >= offset else start + -(-(offset - start) // step) * step
            for g in range(first, offset + n, step):
                texts = pf.read_row_group(g - offset, columns=["text"]).column("text").to_pylist()
                yield Location(file_idx, g - offset, g), texts
        offset += n


def count_row_groups(paths: Sequence[str | os.PathLike]) -> int:
    """Total number of row groups across `paths` (reads only the parquet footers)."""
    return sum(pq.ParquetFile(p).metadata.num_row_groups for p in paths)


# -----------------------------------------------------------------------------
# The default corpus: the Python standard library's own sources

def stdlib_documents(max_doc_chars: int | None = None) -> list[str]:
    """Texts of the stdlib `.py` files (no test suites, no installed packages, UTF-8 only),
    in sorted relative-path order, each optionally cut to `max_doc_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is huge
        rel_paths += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    docs = []
    for rel in sorted(rel_paths):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):  # a few files carry legacy encodings on purpose
            continue
        if not text.strip():  # empty __init__.py files teach nothing
            continue
        docs.append(text[:max_doc_chars] if max_doc_chars is not None else text)
    return docs


def _select_documents(num_shards: int, max_chars: int | None, max_doc_chars: int | None) -> list[str]:
    """Shuffle the stdlib docs with the fixed seed and keep those fitting in `max_chars` total."""
    docs = stdlib_documents(max_doc_chars)
    random.Random(CORPUS_SEED).shuffle(docs)  # so that every shard mixes many packages
    if max_chars is not None:
        # Skip documents that no longer fit rather than cutting one: small budgets then still
        # get many whole files, which the shards need to be non-empty.
        kept, budget = [], max_chars
        for doc in docs:
            if len(doc) <= budget:
                kept.append(doc)
                budget -= len(doc)
        docs = kept
    if len(docs) < num_shards:
        raise ValueError(f"the default corpus has only {len(docs)} documents under max_chars={max_chars}, "
                         f"fewer than num_shards={num_shards}: raise max_chars or lower num_shards")
    return docs


def _write_parquet_atomic(path: Path, texts: list[str], row_group_size: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_default_corpus(data_dir: str | os.PathLike, num_shards: int = 8, max_chars: int | None = None,
                         max_doc_chars: int | None = None) -> list[Path]:
    """Write the stdlib corpus into `data_dir` as `num_shards` parquet shards; return their paths.

    One document per source file; the last shard is the validation split. Deterministic (same
    texts on every call for a given Python install) and idempotent: a finished corpus written
    with the same settings is left untouched. Safe to call from several processes at once.
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (at least one train and one val shard), got {num_shards}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    if max_doc_chars is not None and max_doc_chars < 1:
        raise ValueError(f"max_doc_chars must be positive or None, got {max_doc_chars}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = {"source": "python-stdlib", "python": sys.version.split()[0], "seed": CORPUS_SEED,
                "num_shards": num_shards, "max_chars": max_chars, "max_doc_chars": max_doc_chars}
    paths = [data_dir / shard_name(i) for i in range(num_shards)]
    manifest_path = data_dir / MANIFEST
    with FileLock(str(data_dir / ".default_corpus.lock")):
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if manifest is None and list_shards(data_dir):
            raise FileExistsError(f"{data_dir} already holds parquet shards that are not the default corpus: "
                                  "use an empty directory for it")
        if manifest is not None and manifest.get("complete"):
            if manifest["settings"] != settings:
                raise FileExistsError(f"{data_dir} holds a default corpus written with other settings "
                                      f"({manifest['settings']}): delete it or use another directory")
            if all(p.exists() for p in paths):
                return paths
        docs = _select_documents(num_shards, max_chars, max_doc_chars)
        bounds = [len(docs) * i // num_shards for i in range(num_shards + 1)]
        # Announce the write before renaming shards in, so an interrupted write is known to be ours.
        _write_json_atomic(manifest_path, {"settings": settings, "complete": False})
        # Shards beyond num_shards are ours too (a manifest exists), left by a larger num_shards.
        for stale in set(list_shards(data_dir)) - set(paths):
            stale.unlink()
        for i, path in enumerate(paths):
            _write_parquet_atomic(path, docs[bounds[i]:bounds[i + 1]], CORPUS_ROW_GROUP)
        _write_json_atomic(manifest_path, {
            "settings": settings, "complete": True, "docs": len(docs), "chars": sum(map(len, docs)),
            "shard_docs": [bounds[i + 1] - bounds[i] for i in range(num_shards)]})
    return paths


def default_corpus_stats(data_dir: str | os.PathLike) -> dict:
    """{'docs', 'chars', 'shard_docs', 'settings'} of the default corpus in `data_dir`."""
    manifest_path = Path(data_dir) / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"no default corpus in {data_dir}: call write_default_corpus on it first")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise RuntimeError(f"the default corpus in {data_dir} is incomplete: call write_default_corpus again")
    return {k: manifest[k] for k in ("docs", "chars", "shard_docs", "settings")}
