"""Task data from the Hugging Face datasets parquet API, downloaded once and cached.

`{endpoint}/api/datasets/{repo}/parquet/{subset}/{split}` answers with a JSON list of parquet
file URLs. A split is cached in `{data_dir}/{repo with / as __}/{subset}/{split}/` as
`00000.parquet, 00001.parquet, ...` and is complete only once `manifest.json` exists: it is
written last, under a file lock, after every file has been verified and renamed into place.
Concurrent ranks or processes therefore download each file once, and readers that see the
manifest never see a partial file (downloads stream into `*.part` files first).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from nanofast.download import DownloadError, RetryableError, download_file

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = "manifest.json"
LISTING = "listing.json"


def api_url(repo: str, subset: str, split: str) -> str:
    """The parquet-listing URL of one split; $HF_ENDPOINT (as huggingface_hub reads it) selects a mirror."""
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return f"{endpoint.rstrip('/')}/api/datasets/{repo}/parquet/{subset}/{split}"


def split_dir(data_dir: str | os.PathLike, repo: str, subset: str, split: str) -> Path:
    """Where one split of one dataset is cached."""
    for what, value in (("repo", repo), ("subset", subset), ("split", split)):
        if not isinstance(value, str) or not value or value in (".", "..") or "\\" in value \
                or (what != "repo" and "/" in value):
            raise ValueError(f"bad {what} {value!r}")
    return Path(data_dir) / repo.replace("/", "__") / subset / split


def cached_files(data_dir: str | os.PathLike, repo: str, subset: str, split: str) -> list[Path] | None:
    """The parquet files of a completely downloaded split, or None if it is absent or unfinished."""
    directory = split_dir(data_dir, repo, subset, split)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = [directory / name for name in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if files and all(f.is_file() for f in files) else None


def _verify_listing(part: Path, total: int | None) -> None:
    """Accept a JSON list of URLs (the parquet API's answer); anything else is retried from scratch."""
    try:
        urls = json.loads(part.read_bytes())
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ValueError(f"expected a non-empty JSON list of URLs, got {str(urls)[:100]!r}")
    except ValueError as e:
        part.unlink()
        raise RetryableError(f"{part.name}: not a parquet file listing ({e})") from None


def download_split(data_dir: str | os.PathLike, repo: str, subset: str, split: str, *, retries: int = 5,
                   backoff: float = 1.0, timeout: float = 60) -> list[Path]:
    """Download (once) the parquet files of `repo`/`subset`/`split` into the cache; return them.

    Safe to call from several processes at once: the first to take the lock downloads, the
    others wait and then find the finished split. Raises DownloadError when the data cannot be
    fetched (e.g. a 404 for a wrong subset or split name).
    """
    files = cached_files(data_dir, repo, subset, split)
    if files is not None:
        return files
    directory = split_dir(data_dir, repo, subset, split)
    directory.mkdir(parents=True, exist_ok=True)
    url = api_url(repo, subset, split)
    with FileLock(str(directory / ".lock")):
        files = cached_files(data_dir, repo, subset, split)  # another process may have finished meanwhile
        if files is not None:
            return files
        try:
            listing = download_file(url, directory / LISTING, retries, backoff, timeout, verify=_verify_listing)
            urls = json.loads(listing.read_text())
            files = [download_file(u, directory / f"{i:05d}.parquet", retries, backoff, timeout)
                     for i, u in enumerate(urls)]
        except DownloadError as e:
            raise DownloadError(f"could not download {repo} {subset}/{split} (listing {url}): {e}") from None
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"repo": repo, "subset": subset, "split": split, "urls": urls,
                                   "files": [f.name for f in files]}, indent=1))
        os.replace(tmp, directory / MANIFEST)  # last: marks the split complete
    return files
