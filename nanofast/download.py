"""Parallel, resumable download of ClimbMix parquet shards (standard library HTTP only).

Each shard streams into `<name>.part`; an interrupted transfer resumes with an HTTP Range
request, and only a file whose size matches the server's and that parses as parquet is renamed
to its final name. So a shard under its final name is always complete, and `list_shards`, which
only sees `*.parquet`, never picks up a partial one.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable

import pyarrow.parquet as pq
from filelock import FileLock
from tqdm import tqdm

from nanofast.dataset import CLIMBMIX_NUM_SHARDS, CLIMBMIX_URL, shard_name

CHUNK = 1 << 20  # 1 MiB reads: few syscalls, bounded memory per worker
MAX_BACKOFF = 60.0  # seconds; exponential backoff stops growing here
RETRY_STATUS = frozenset({408, 429})  # client-side codes that mean "try again later"


class RetryableError(Exception):
    """A failure worth another attempt: network trouble, truncated body, 5xx, 408/429, bad bytes."""


class DownloadError(RuntimeError):
    """Raised at the end of `download_shards` when some shards could not be fetched."""


def _content_range_total(header: str | None, start: int) -> int | None:
    """Total size from 'bytes <start>-<end>/<total>'; checks that the server resumed at `start`."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (header or "").strip())
    if m is None or int(m.group(1)) != start:
        raise RetryableError(f"unexpected Content-Range {header!r} for a resume at byte {start}")
    return None if m.group(3) == "*" else int(m.group(3))


def _fetch(url: str, part: Path, timeout: float) -> int | None:
    """Download `url` into `part`, appending when the server honours a Range request.
    Returns the expected total size in bytes, or None when the server did not say."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            if resp.status == 206:
                total = _content_range_total(resp.headers.get("Content-Range"), have)
                mode = "ab"
            else:  # 200: the server sent the whole file (no Range support), so start over
                length = resp.headers.get("Content-Length")
                total, mode = (int(length) if length is not None else None), "wb"
            with open(part, mode) as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our .part already reaches past the end of the remote file: start over
            part.unlink(missing_ok=True)
            raise RetryableError(f"{url}: HTTP 416 for a resume at byte {have}, restarting") from None
        if e.code >= 500 or e.code in RETRY_STATUS:
            raise RetryableError(f"{url}: HTTP {e.code} {e.reason}") from None
        # Other 4xx (404 above all) cannot succeed on a retry.
        hint = ": check the base URL and the shard index" if e.code == 404 else ""
        raise DownloadError(f"{url} returned HTTP {e.code} {e.reason} (not retried){hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as e:
        # URLError covers refused/reset connections; HTTPException covers IncompleteRead.
        raise RetryableError(f"{url}: {type(e).__name__}: {e}") from None
    return total


def _verify(part: Path, total: int | None) -> None:
    """Raise RetryableError unless `part` is a complete, readable parquet file."""
    size = part.stat().st_size
    if total is not None and size != total:
        raise RetryableError(f"{part.name}: got {size} of {total} bytes")  # keep it: the next try resumes
    with open(part, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    try:
        if head != b"PAR1" or tail != b"PAR1":
            raise ValueError("missing PAR1 magic bytes")
        pq.read_metadata(part)
    except Exception as e:
        part.unlink()  # corrupt bytes are not worth resuming from
        raise RetryableError(f"{part.name}: not a readable parquet file ({e})") from None


def download_file(url: str, final: Path, retries: int = 5, backoff: float = 1.0, timeout: float = 30,
                  verify: Callable[[Path, int | None], None] = _verify) -> Path:
    """Download `url` to `final` (skipped if already present) with up to `retries` retries.

    Bytes stream into `<final>.part` (resumed on the next attempt) and are renamed to `final` only
    after `verify(part, expected_size)` accepts them; by default that checks for a whole parquet
    file. `verify` raises RetryableError to reject the bytes (deleting `part` if not resumable).
    """
    if final.exists():
        return final
    part = final.with_name(final.name + ".part")
    # One writer per file, however many processes (ranks, nodes on a shared disk) want it: the
    # others wait on the lock, then find the file whole. The OS drops a dead holder's lock. The
    # lock file goes once the file is whole: later callers return at the check above, never lock.
    lock = Path(str(final) + ".lock")
    with FileLock(str(lock)):
        for attempt in range(retries + 1):
            if final.exists():
                return final
            try:
                total = _fetch(url, part, timeout)
                verify(part, total)
                os.replace(part, final)  # atomic: the final name only ever names a whole file
                lock.unlink(missing_ok=True)
                return final
            except RetryableError as e:
                if attempt == retries:
                    raise DownloadError(f"gave up after {retries + 1} attempts: {e}") from None
                time.sleep(min(backoff * 2 ** attempt, MAX_BACKOFF))
    raise AssertionError("unreachable")


def download_shard(index: int, data_dir: Path, base_url: str = CLIMBMIX_URL, retries: int = 5,
                   backoff: float = 1.0, timeout: float = 30) -> Path:
    """Download one shard (skipped if already present) with up to `retries` retries."""
    return download_file(base_url.format(i=index), data_dir / shard_name(index), retries, backoff, timeout)


def _check_args(indices: list[int], base_url: str, workers: int, retries: int, backoff: float,
                timeout: float) -> None:
    if any(i < 0 for i in indices):
        raise ValueError(f"shard indices must be >= 0, got {min(indices)}")
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(f"need workers >= 1, retries >= 0, backoff >= 0, timeout > 0; got "
                         f"workers={workers}, retries={retries}, backoff={backoff}, timeout={timeout}")
    try:
        distinct = base_url.format(i=0) != base_url.format(i=1)
    except (KeyError, IndexError, ValueError):
        distinct = False
    if not distinct:
        raise ValueError(f"base_url {base_url!r} needs an '{{i:05d}}' placeholder for the shard index")


def download_shards(indices: Iterable[int], data_dir: str | os.PathLike, base_url: str = CLIMBMIX_URL,
                    workers: int = 8, retries: int = 5, backoff: float = 1.0, timeout: float = 30,
                    progress: bool = True) -> list[Path]:
    """Download shards `indices` into `data_dir` in parallel; return their paths in input order.

    `base_url` is a format string with an `{i}` field (e.g. CLIMBMIX_URL). Failed attempts are
    retried `retries` times, sleeping backoff * 2**attempt seconds (capped) in between; a 404
    is not retried. Raises DownloadError after all workers finish if any shard failed.
    """
    indices = list(dict.fromkeys(int(i) for i in indices))  # dedupe, keep order
    _check_args(indices, base_url, workers, retries, backoff, timeout)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths, failures = {}, {}
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(indices), unit="shard", desc="download", disable=not progress) as bar:
        futures = {pool.submit(download_shard, i, data_dir, base_url, retries, backoff, timeout): i
                   for i in indices}
        for future in as_completed(futures):
            i = futures[future]
            try:
                paths[i] = future.result()
            except Exception as e:  # collect every failure so one bad shard does not hide others
                failures[i] = e
            bar.update(1)
    if failures:
        first = min(failures)
        raise DownloadError(f"failed to download {len(failures)} of {len(indices)} shards "
                            f"{sorted(failures)}; shard {first}: {failures[first]}")
    return [paths[i] for i in indices]


def download_climbmix(data_dir: str | os.PathLike, num_train_shards: int, rank: int = 0, world_size: int = 1,
                      **kwargs) -> list[Path]:
    """Download ClimbMix train shards 0..num_train_shards-1 plus the validation shard (the last);
    return their paths in that order. Keyword arguments go to `download_shards`.

    With several ranks each calls this: rank r fetches shards r, r + world_size, ... first, then
    the rest, which by then are whole or being fetched by their owner (waited for on the file's
    lock), so the ranks share the work and each returns only when every shard is there.
    """
    val_index = CLIMBMIX_NUM_SHARDS - 1
    if not 1 <= num_train_shards <= val_index:
        raise ValueError(f"num_train_shards must be in [1, {val_index}], got {num_train_shards}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    indices = [*range(num_train_shards), val_index]
    order = indices[rank::world_size] + [i for k, i in enumerate(indices) if k % world_size != rank]
    paths = dict(zip(order, download_shards(order, data_dir, **kwargs)))
    return [paths[i] for i in indices]
