"""The ClimbMix downloader against a local HTTP server: nanofast/download.py."""
import io
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanofast.dataset import list_shards
from nanofast.download import DownloadError, download_climbmix, download_shards

FAST = dict(backoff=0.001, timeout=5, progress=False)  # tiny backoff keeps retry tests quick


def parquet_bytes(seed: int, rows: int = 400) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"shard {seed} document {i} " * 3 for i in range(rows)]}), buf,
                   row_group_size=100)
    return buf.getvalue()


class ShardServer:
    """Serves `files` on 127.0.0.1 with Range support; each misbehaviour map says how many more
    requests for a file get that treatment."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_mid, self.fail_500, self.garbage, self.stall = Counter(), Counter(), Counter(), Counter()
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/shard_{{i:05d}}.parquet"

    def requested(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.requests if n == name]

    def take(self, counter: Counter, name: str) -> bool:
        with self.lock:
            if counter[name] > 0:
                counter[name] -= 1
                return True
            return False

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name, rng = self.path.lstrip("/"), self.headers.get("Range")
                with server.lock:
                    server.requests.append((name, rng))
                if name not in server.files:
                    return self.send_error(404)
                if server.take(server.fail_500, name):
                    return self.send_error(500)
                if server.take(server.stall, name):
                    time.sleep(1.0)  # longer than the client's timeout
                data = b"not a parquet file at all" if server.take(server.garbage, name) else server.files[name]
                start = 0
                if rng and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.take(server.cut_mid, name):  # promise the full body, deliver half, hang up
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture
def server():
    srv = ShardServer({f"shard_{i:05d}.parquet": parquet_bytes(i) for i in [0, 1, 2, 3, 6542]})
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


def assert_downloaded(srv: ShardServer, paths, indices):
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in indices]
    for p in paths:
        assert p.read_bytes() == srv.files[p.name]
        assert pq.read_table(p).num_rows == 400
    assert not list(paths[0].parent.glob("*.part"))


def test_parallel_download(server, tmp_path):
    paths = download_shards([3, 0, 2, 1, 0], tmp_path / "data", base_url=server.url(), workers=3, **FAST)
    assert_downloaded(server, paths, [3, 0, 2, 1])  # deduplicated, in the order asked
    assert sorted(n for n, _ in server.requests) == [f"shard_{i:05d}.parquet" for i in range(4)]
    assert all(rng is None for _, rng in server.requests)
    assert list_shards(tmp_path / "data") == sorted(paths)


def test_existing_shard_is_skipped(server, tmp_path):
    download_shards([0], tmp_path, base_url=server.url(), **FAST)
    download_shards([0, 1], tmp_path, base_url=server.url(), **FAST)
    assert len(server.requested("shard_00000.parquet")) == 1


def test_resume_after_mid_file_failure_uses_range(server, tmp_path):
    name = "shard_00001.parquet"
    server.cut_mid[name] = 1
    paths = download_shards([1], tmp_path, base_url=server.url(), **FAST)
    assert_downloaded(server, paths, [1])
    assert server.requested(name) == [None, f"bytes={len(server.files[name]) // 2}-"]


def test_leftover_part_file_is_resumed_not_trusted(server, tmp_path):
    name = "shard_00002.parquet"
    part = tmp_path / (name + ".part")
    part.write_bytes(server.files[name][:1000])
    assert list_shards(tmp_path) == []  # a partial file is not a shard
    paths = download_shards([2], tmp_path, base_url=server.url(), **FAST)
    assert_downloaded(server, paths, [2])
    assert server.requested(name) == ["bytes=1000-"]
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    name = "shard_00002.parquet"
    (tmp_path / (name + ".part")).write_bytes(b"stale bytes from some other file")
    server.ignore_range = True  # answers 200 with the whole file
    paths = download_shards([2], tmp_path, base_url=server.url(), **FAST)
    assert_downloaded(server, paths, [2])
    assert server.requested(name) == ["bytes=32-"]


def test_part_file_longer_than_remote_restarts(server, tmp_path):
    name = "shard_00003.parquet"
    (tmp_path / (name + ".part")).write_bytes(server.files[name] + b"extra")  # server answers 416
    paths = download_shards([3], tmp_path, base_url=server.url(), **FAST)
    assert_downloaded(server, paths, [3])
    assert server.requested(name) == [f"bytes={len(server.files[name]) + 5}-", None]


def test_retries_on_500_corrupt_body_and_timeout(server, tmp_path):
    server.fail_500["shard_00000.parquet"] = 2
    server.garbage["shard_00001.parquet"] = 1
    server.stall["shard_00002.parquet"] = 1
    paths = download_shards([0, 1, 2], tmp_path, base_url=server.url(), workers=3, backoff=0.001, timeout=0.3,
                            progress=False)
    assert_downloaded(server, paths, [0, 1, 2])
    assert len(server.requested("shard_00000.parquet")) == 3
    assert server.requested("shard_00001.parquet") == [None, None]  # corrupt bytes are discarded, not resumed
    assert len(server.requested("shard_00002.parquet")) == 2


def test_gives_up_after_retries_with_backoff(server, tmp_path):
    server.fail_500["shard_00000.parquet"] = 100
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"failed to download 1 of 2 shards \[0\].*gave up after 3 attempts"):
        download_shards([0, 1], tmp_path, base_url=server.url(), retries=2, backoff=0.05, timeout=5,
                        progress=False)
    assert time.monotonic() - start >= 0.05 + 0.1  # slept backoff * 2**attempt between attempts
    assert len(server.requested("shard_00000.parquet")) == 3
    assert [p.name for p in list_shards(tmp_path)] == ["shard_00001.parquet"]  # the others still finished


def test_404_is_not_retried_and_names_the_url(server, tmp_path):
    url = server.url()
    with pytest.raises(DownloadError, match=re.escape(url.format(i=7)) +
                       r" returned HTTP 404 Not Found \(not retried\): check the base URL"):
        download_shards([0, 7], tmp_path, base_url=url, **FAST)
    assert len(server.requested("shard_00007.parquet")) == 1
    assert (tmp_path / "shard_00000.parquet").exists()
    assert not (tmp_path / "shard_00007.parquet").exists()


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as s:  # find a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"gave up after 2 attempts.*URLError"):
        download_shards([0], tmp_path, base_url=f"http://127.0.0.1:{port}/shard_{{i:05d}}.parquet",
                        retries=1, **FAST)
    assert list_shards(tmp_path) == []


def test_download_climbmix_fetches_train_prefix_and_val_shard(server, tmp_path):
    paths = download_climbmix(tmp_path, 2, base_url=server.url(), **FAST)
    assert_downloaded(server, paths, [0, 1, 6542])
    assert list_shards(tmp_path)[-1].name == "shard_06542.parquet"  # the val shard sorts last


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        download_shards([0], tmp_path, base_url="http://127.0.0.1:1/fixed.parquet", **FAST)
    with pytest.raises(ValueError, match="placeholder"):
        download_shards([0], tmp_path, base_url="http://127.0.0.1:1/{index}.parquet", **FAST)
    with pytest.raises(ValueError, match="indices must be >= 0"):
        download_shards([-1], tmp_path, **FAST)
    with pytest.raises(ValueError, match="workers >= 1"):
        download_shards([0], tmp_path, workers=0, **FAST)
    with pytest.raises(ValueError, match=r"num_train_shards must be in \[1, 6542\]"):
        download_climbmix(tmp_path, 0)
    with pytest.raises(ValueError, match=r"num_train_shards must be in \[1, 6542\]"):
        download_climbmix(tmp_path, 6543)


def test_ranks_share_the_shards_and_each_file_is_fetched_once(server, tmp_path):
    """Two ranks (threads here; processes and nodes on one disk alike) call download_climbmix at
    once: each starts with its own share, waits on the file lock of a shard the other is fetching,
    and returns every path once all are whole."""
    results: dict[int, list] = {}

    def rank(r: int) -> None:
        results[r] = download_climbmix(tmp_path, 4, rank=r, world_size=2, base_url=server.url(), workers=2, **FAST)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in range(2):
        assert_downloaded(server, results[r], [0, 1, 2, 3, 6542])
    assert sorted(n for n, _ in server.requests) == sorted(f"shard_{i:05d}.parquet" for i in [0, 1, 2, 3, 6542])
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        download_climbmix(tmp_path, 4, rank=2, world_size=2, base_url=server.url())
