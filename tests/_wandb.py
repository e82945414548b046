"""Read back what an offline W&B run logged: its ``run-*.wandb`` file (LevelDB-log framed protobufs)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = 7  # b":W&B" + magic 0xBEE1 + version byte
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunks = HEADER, []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            chunks = [chunk]
        elif kind in (MIDDLE, LAST):
            chunks.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def finished(run_dir: Path, timeout: float = 60.0) -> Path:
    """``run_dir`` once W&B has written its exit record (its writer can lag behind ``finish()``)."""
    deadline = time.monotonic() + timeout
    while True:
        (path,) = Path(run_dir).glob("run-*.wandb")
        if any(r.WhichOneof("record_type") == "exit" for r in _records(path)) or time.monotonic() > deadline:
            return Path(run_dir)
        time.sleep(0.2)


def offline_run(save_dir: Path) -> Path:
    """The single offline run folder under ``save_dir/wandb``, once its writer has finished."""
    runs = sorted(Path(save_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run in {save_dir}, found {runs}"
    return finished(runs[0])


def history(run_dir: Path) -> list[dict]:
    """Every ``wandb.log`` row of the run, values decoded from JSON."""
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in _records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def config(run_dir: Path) -> dict:
    """The run's config as last updated (``wandb.config``), values decoded from JSON."""
    (path,) = run_dir.glob("run-*.wandb")
    out: dict = {}
    for record in _records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
