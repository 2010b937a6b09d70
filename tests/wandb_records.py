"""Read back what wandb recorded offline: the records of `run-<id>.wandb` files, which is what
`wandb sync` would upload. The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of
records: a 4-byte checksum, a 2-byte little-endian length, a 1-byte kind: full, first, middle or
last piece) of wandb's protobuf `Record` messages."""
from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # b":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_offline_runs(directory: Path) -> tuple[list[dict], dict, set[str]]:
    """(history rows, summary, run ids) of every offline run under `directory`, files in time order.
    Ends this process's wandb service first: it writes the files, and run.finish() returns before
    they are flushed."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()

    history, summary, ids = [], {}, set()
    for path in sorted(directory.glob("**/offline-run-*/run-*.wandb")):
        for payload in _payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                history.append(_items(record.history.item))
            elif kind == "summary":
                summary.update(_items(record.summary.update))
    return history, summary, ids
