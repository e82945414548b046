"""Checkpoint files: atomic saves, the clean-up of what a killed save left behind, where ``--resume``
continues, and the checkpoint callbacks that keep those rules through signals and kills.

``AtomicCheckpointIO`` writes each checkpoint to a temporary file next to its destination and renames it into
place, so a killed save never leaves a half-written ``.ckpt`` nor replaces a good one. ``SigtermCheckpoint``
saves ``last.ckpt`` when a scheduler stops the fit with SIGTERM; ``ResumedTopK`` keeps ``save_top_k`` true
after a resume from a checkpoint older than the newest best one (a kill between the two saves).
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
    """Turn a ``--resume`` value into a run folder and checkpoint; a clear ``ValueError`` when there is none
    or when the checkpoint is truncated or unreadable (see :func:`check_checkpoint`).

    ``last``: of the runs ``save_dir/name/*``, the one with the newest checkpoint. ``auto``: the folder
    ``save_dir/name/version`` (``--logging.version`` required), with its newest checkpoint or none (a fresh
    start). A folder: that run. A ``.ckpt`` file: that checkpoint, in its run folder when it is in one
    (``.../checkpoints/x.ckpt`` or ``.../hpc_ckpt_N.ckpt`` next to ``metrics.csv``/``hparams.yaml``).
    """
    point = _resume_point(value, save_dir, name, version)
    if point.checkpoint is not None:
        check_checkpoint(point.checkpoint, point.run_dir)
    return point


def _resume_point(value: str, save_dir: str, name: str, version: int | str | None) -> ResumePoint:
    """:func:`resolve_resume` before the checkpoint is checked."""
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


def _checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (torch's zip format), ``None`` when it looks complete."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return str(err)
    return None if any(n.endswith("/data.pkl") for n in names) else "no data.pkl in the archive"


def check_checkpoint(path: str | Path, run_dir: str | Path | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` when it is truncated or not a checkpoint (reads the zip directory,
    not the tensors), suggesting the newest complete checkpoint of ``run_dir`` (the run folder) if any.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp(), "last.ckpt")
    >>> _ = bad.write_bytes(b"PK")
    >>> check_checkpoint(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: checkpoint .../last.ckpt is truncated or unreadable (File is not a zip file); no other ...
    """
    problem = _checkpoint_problem(Path(path))
    if problem is None:
        return
    folder = Path(run_dir) if run_dir is not None else Path(path).parent
    found = folder.rglob("*.ckpt") if run_dir is not None else folder.glob("*.ckpt")  # a run's, or beside it
    others = [p for p in found if p.resolve() != Path(path).resolve()]
    good = sorted((p for p in others if _checkpoint_problem(p) is None), key=lambda p: p.stat().st_mtime_ns)
    hint = f"resume from another one: --resume {good[-1]}" if good else f"no other checkpoint in {folder}"
    raise ValueError(f"checkpoint {path} is truncated or unreadable ({problem}); {hint}")


class SigtermCheckpoint(Callback):
    """Saves ``last.ckpt`` (the ``ModelCheckpoint`` whose ``filename`` is ``last``) when SIGTERM stops a fit.

    On SIGTERM (a scheduler's preemption or time limit) Lightning's loops raise ``SIGTERMException`` at the
    next batch or epoch boundary; this callback then saves the full training state, so that ``--resume last``
    continues there. ``saved`` is the file written (``None``: no signal, or one during the sanity check or
    after the fit, when there is nothing new to save).

    >>> SigtermCheckpoint().saved is None
    True
    """

    def __init__(self, filename: str = "last") -> None:
        self.filename = filename
        self.saved: Path | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        named = (c for c in trainer.checkpoint_callbacks if getattr(c, "filename", None) == self.filename)
        last = next(named, None)
        if trainer.sanity_checking or not isinstance(last, ModelCheckpoint) or last.dirpath is None:
            return
        path = Path(last.format_checkpoint_name({}))
        trainer.save_checkpoint(path)
        self.saved = path


def _recorded_score(path: Path, callback: ModelCheckpoint) -> torch.Tensor | None:
    """The score ``callback`` recorded for the file ``path`` in that checkpoint itself, ``None`` if none."""
    if _checkpoint_problem(path) is not None:
        return None
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    tracked = (state.get("callbacks") or {}).get(callback.state_key) or {}
    scores = {Path(p).name: s for p, s in (tracked.get("best_k_models") or {}).items()}
    return None if scores.get(path.name) is None else torch.as_tensor(scores[path.name])


def _tracked_names(trainer: L.Trainer) -> set[str]:
    """Names of the files the trainer's checkpoint callbacks track (``last.ckpt`` is the other callback's)."""
    paths = (
        path
        for c in trainer.checkpoint_callbacks
        for path in (*getattr(c, "best_k_models", {}), getattr(c, "best_model_path", ""))
    )
    return {Path(path).name for path in paths if path}


class ResumedTopK(Callback):
    """After a resume, keeps each monitored ``ModelCheckpoint``'s ``save_top_k`` files: the best of those it
    tracks and those it saved after the checkpoint the run resumes from.

    A run killed after saving a new best checkpoint but before ``last.ckpt`` resumes from the older
    ``last.ckpt``, whose callback state knows only the older best (already deleted by then): the new best file
    would stay beside the next one, untracked, and ``best_model_path`` could name a deleted file. On resume
    this callback reads the score each untracked checkpoint of the callback's folder recorded for itself,
    keeps the ``save_top_k`` best files that exist, tracks them as Lightning does, and deletes the others.

    >>> best = ModelCheckpoint(monitor="val/dice", mode="max")
    >>> L.Trainer(callbacks=[best, ResumedTopK()], logger=False).checkpoint_callback is best
    True
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.dirpath:
                self._reconcile(trainer, callback)

    def _reconcile(self, trainer: L.Trainer, callback: ModelCheckpoint) -> None:
        """Track the ``save_top_k`` best of the tracked and untracked files of ``callback``, delete others."""
        folder = str(callback.dirpath)
        tracked = _tracked_names(trainer)
        scores = {p: torch.as_tensor(s) for p, s in callback.best_k_models.items() if Path(p).is_file()}
        for path in sorted(Path(folder).glob(f"*{callback.FILE_EXTENSION}")) if os.path.isdir(folder) else []:
            if path.name not in tracked and (score := _recorded_score(path, callback)) is not None:
                scores[os.path.join(folder, path.name)] = score
        if scores.keys() == callback.best_k_models.keys():
            return
        ranked = sorted(scores, key=lambda p: float(scores[p]), reverse=callback.mode == "max")
        keep = ranked if callback.save_top_k < 0 else ranked[: callback.save_top_k]
        for path in ranked[len(keep):]:
            trainer.strategy.remove_checkpoint(path)
        callback.best_k_models = {p: scores[p] for p in keep}
        callback.best_model_path = keep[0] if keep else ""
        callback.best_model_score = scores[keep[0]] if keep else None
        callback.kth_best_model_path = keep[-1] if keep else ""
        worst = torch.tensor(float("-inf") if callback.mode == "max" else float("inf"))
        callback.kth_value = scores[keep[-1]] if keep else worst
