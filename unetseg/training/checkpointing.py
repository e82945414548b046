"""Checkpoint files: atomic saves, the clean-up of what a killed save left behind, and where ``--resume``
continues.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file next to its destination and renames it into
place, so a killed save never leaves a half-written ``.ckpt`` nor replaces a good one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint atomically on local disks: temporary file in the same folder, fsync, rename.

    Lightning's own save is atomic only when ``$TMPDIR`` is on the checkpoint's filesystem: it writes through
    an fsspec transaction whose temporary file lives in ``$TMPDIR`` and is then moved, which across
    filesystems (``/tmp`` on a node's local disk, runs on NFS/Lustre) is a copy over the previous checkpoint;
    a job killed during that copy leaves a truncated ``last.ckpt`` in place of the good one. Here the
    temporary file ``.<name>.<random>.tmp`` is created next to the destination and ``os.replace``d over it,
    which POSIX makes atomic: readers see the old file or the new one, never a mix. A kill leaves at most a
    stale ``.tmp`` file (never loaded; ``--resume`` deletes them). Remote URLs (``s3://`` ...) use Lightning's
    save.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> AtomicCheckpointIO().save_checkpoint({"step": 3}, f"{folder}/last.ckpt")
    >>> sorted(os.listdir(folder)), torch.load(f"{folder}/last.ckpt")["step"]
    (['last.ckpt'], 3)
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with tmp.open("xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)


def _is_local(path: Any) -> bool:
    """True for a plain local path (fsspec's ``file`` protocol)."""
    protocol = get_filesystem(str(path)).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.*.tmp`` files that a killed ``AtomicCheckpointIO`` save left in ``folder``; returns them."""
    stale = sorted(Path(folder).glob(".*.ckpt.*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


@dataclass
class ResumePoint:
    """Where ``--resume`` continues: the run folder (``None``: a checkpoint outside any run folder, continued
    in a new one) and the checkpoint (``None``: no checkpoint yet, the folder starts from scratch)."""

    run_dir: Path | None
    checkpoint: Path | None


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest resumable checkpoint of a run folder: ``checkpoints/last*.ckpt`` or Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` (saved on the requeue signal), by modification time; ``None`` if there is none."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None


def resolve_resume(value: str, save_dir: str, name: str, version: int | str | None = None) -> ResumePoint:
    """Turn a ``--resume`` value into a run folder and checkpoint; a clear ``ValueError`` when there is none.

    ``last``: of the runs ``save_dir/name/*``, the one with the newest checkpoint. ``auto``: the folder
    ``save_dir/name/version`` (``--logging.version`` required), with its newest checkpoint or none (a fresh
    start). A folder: that run. A ``.ckpt`` file: that checkpoint, in its run folder when it is in one
    (``.../checkpoints/x.ckpt`` or ``.../hpc_ckpt_N.ckpt`` next to ``metrics.csv``/``hparams.yaml``).
    """
    root = Path(save_dir, name)
    if value == "last":
        folders = root.iterdir() if root.is_dir() else []
        runs = [(ckpt, d) for d in folders if (ckpt := newest_checkpoint(d))]
        if not runs:
            raise ValueError(f"--resume last: no run of {name!r} with a checkpoint under {root}")
        ckpt, run_dir = max(runs, key=lambda r: r[0].stat().st_mtime_ns)
        return ResumePoint(run_dir, ckpt)
    if value == "auto":
        if version is None:
            raise ValueError(
                "--resume auto needs a fixed run folder: set --logging.version (e.g. slurm-$SLURM_JOB_ID)"
            )
        run_dir = root / (version if isinstance(version, str) else f"version_{version}")
        return ResumePoint(run_dir, newest_checkpoint(run_dir))
    path = Path(value)
    if path.is_dir():
        ckpt = newest_checkpoint(path)
        if ckpt is None:
            raise ValueError(
                f"--resume {value}: no checkpoint in that folder (looked for checkpoints/last*.ckpt and "
                "hpc_ckpt_*.ckpt)"
            )
        return ResumePoint(path, ckpt)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        is_run = any((run_dir / f).exists() for f in ("checkpoints", "metrics.csv", "hparams.yaml"))
        return ResumePoint(run_dir if is_run else None, path)
    raise ValueError(
        f"--resume {value!r}: no such run folder or checkpoint; expected 'last', 'auto', a run folder "
        f"(e.g. {root / 'version_0'}) or a .ckpt file"
    )
