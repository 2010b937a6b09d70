"""Shards on disk and the default (Python stdlib) corpus: nanofast/dataset.py."""
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanofast.dataset import (CLIMBMIX_NUM_SHARDS, CLIMBMIX_URL, Location, count_row_groups,
                              default_corpus_stats, iter_documents, list_shards, split_shards,
                              write_default_corpus)

SMALL = 300_000  # chars: enough for 8 non-empty shards, fast to write


def read_texts(path: Path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


def write_shard(path: Path, row_groups: list[list[str]]) -> None:
    """A parquet shard with exactly the given row groups."""
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for texts in row_groups:
            writer.write_table(pa.table({"text": texts}))


def test_climbmix_constants():
    assert CLIMBMIX_NUM_SHARDS == 6543
    assert CLIMBMIX_URL.format(i=6542).endswith("/climbmix-400b-shuffle/resolve/main/shard_06542.parquet")


def test_default_corpus_is_deterministic(tmp_path):
    a = write_default_corpus(tmp_path / "a", max_chars=SMALL)
    b = write_default_corpus(tmp_path / "b", max_chars=SMALL)
    assert [p.name for p in a] == [f"shard_{i:05d}.parquet" for i in range(8)]
    assert [read_texts(p) for p in a] == [read_texts(p) for p in b]
    texts = [t for p in a for t in read_texts(p)]
    assert len(set(texts)) == len(texts) > 8  # one document per file, spread over all shards
    assert all(read_texts(p) for p in a)


def test_default_corpus_is_idempotent_and_repairs_missing_shards(tmp_path):
    paths = write_default_corpus(tmp_path, max_chars=SMALL)
    stamps = [p.stat().st_mtime_ns for p in paths]
    texts = [read_texts(p) for p in paths]
    assert write_default_corpus(tmp_path, max_chars=SMALL) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # nothing rewritten
    paths[3].unlink()
    write_default_corpus(tmp_path, max_chars=SMALL)
    assert [read_texts(p) for p in paths] == texts
    assert list_shards(tmp_path) == paths  # no temp files left behind
    assert not list(tmp_path.glob("*.tmp"))


def test_val_shard_is_the_last_and_fixed(tmp_path):
    paths = write_default_corpus(tmp_path / "a", num_shards=4, max_chars=SMALL)
    assert split_shards(tmp_path / "a", "val") == [paths[-1]]
    assert split_shards(tmp_path / "a", "train") == paths[:-1]
    again = write_default_corpus(tmp_path / "b", num_shards=4, max_chars=SMALL)
    assert read_texts(again[-1]) == read_texts(paths[-1])
    assert set(read_texts(paths[-1])).isdisjoint(t for p in paths[:-1] for t in read_texts(p))


def test_default_corpus_holds_only_stdlib_sources(tmp_path):
    """Every document is the full text of a stdlib .py file outside test suites and packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    allowed, forbidden = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_parts = Path(dirpath).relative_to(root).parts
        if "site-packages" in rel_parts or "dist-packages" in rel_parts:
            dirnames[:] = []  # third-party code: no need to read it to prove it is absent
            continue
        for name in filenames:
            if name.endswith(".py"):
                try:
                    text = Path(dirpath, name).read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue
                (forbidden if excluded & set(rel_parts) else allowed).add(text)
    forbidden -= allowed  # identical boilerplate files may exist in both
    paths = write_default_corpus(tmp_path)
    docs = [t for p in paths for t in read_texts(p)]
    assert len(docs) > 100
    assert all(doc in allowed for doc in docs)
    assert not forbidden & set(docs)
    stats = default_corpus_stats(tmp_path)
    assert stats["docs"] == len(docs) and stats["chars"] == sum(map(len, docs))
    assert pq.ParquetFile(paths[0]).metadata.row_group(0).num_rows == 16  # small row groups


def test_max_chars_bounds_the_corpus(tmp_path):
    paths = write_default_corpus(tmp_path, max_chars=SMALL)
    chars = sum(len(t) for p in paths for t in read_texts(p))
    assert SMALL // 2 < chars <= SMALL
    stats = default_corpus_stats(tmp_path)
    assert stats["chars"] == chars and sum(stats["shard_docs"]) == stats["docs"]
    capped = write_default_corpus(tmp_path / "capped", max_chars=SMALL, max_doc_chars=500)
    assert max(len(t) for p in capped for t in read_texts(p)) <= 500


def test_default_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="num_shards must be >= 2"):
        write_default_corpus(tmp_path / "a", num_shards=1)
    with pytest.raises(ValueError, match="raise max_chars"):
        write_default_corpus(tmp_path / "b", max_chars=10)
    write_default_corpus(tmp_path / "c", max_chars=SMALL)
    with pytest.raises(FileExistsError, match="other settings"):
        write_default_corpus(tmp_path / "c", max_chars=SMALL + 1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_shard(foreign / "shard_00000.parquet", [["x"]])
    with pytest.raises(FileExistsError, match="not the default corpus"):
        write_default_corpus(foreign)
    with pytest.raises(FileNotFoundError, match="no default corpus"):
        default_corpus_stats(tmp_path / "a")


def test_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no parquet shards in .*--stage tokenizer.*--data climbmix"):
        split_shards(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        split_shards(tmp_path / "missing", "val")
    write_shard(tmp_path / "shard_00000.parquet", [["only"]])
    (tmp_path / "shard_00001.parquet.part").write_bytes(b"PAR1")  # partial download: invisible
    assert split_shards(tmp_path, "val") == [tmp_path / "shard_00000.parquet"]
    with pytest.raises(ValueError, match="only one parquet shard"):
        split_shards(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_shards(tmp_path, "test")


def test_iter_documents_global_row_groups(tmp_path):
    # Row groups per file: 3, 1, 2 -> global indices 0-2, 3, 4-5.
    layout = [[["a0", "a1"], ["a2"], ["a3", "a4"]], [["b0"]], [["c0", "c1"], ["c2"]]]
    paths = []
    for i, row_groups in enumerate(layout):
        paths.append(tmp_path / f"shard_{i:05d}.parquet")
        write_shard(paths[-1], row_groups)
    assert count_row_groups(paths) == 6
    everything = list(iter_documents(paths))
    assert [loc for loc, _ in everything] == [Location(0, 0, 0), Location(0, 1, 1), Location(0, 2, 2),
                                              Location(1, 0, 3), Location(2, 0, 4), Location(2, 1, 5)]
    assert [t for _, texts in everything for t in texts] == [t for f in layout for rg in f for t in rg]
    rank0 = [loc.index for loc, _ in iter_documents(paths, start=0, step=2)]
    rank1 = [loc.index for loc, _ in iter_documents(paths, start=1, step=2)]
    assert rank0 == [0, 2, 4] and rank1 == [1, 3, 5]
    # resuming at global index 3 with step 2 continues rank 1's sequence across the file boundary
    assert [(loc, texts) for loc, texts in iter_documents(paths, start=3, step=2)] == \
        [(Location(1, 0, 3), ["b0"]), (Location(2, 1, 5), ["c2"])]
    assert list(iter_documents(paths, start=6)) == []
    with pytest.raises(ValueError, match="step >= 1"):
        list(iter_documents(paths, step=0))
