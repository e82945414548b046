"""Run logging: a CSV log always, Weights & Biases unless turned off, and the resolved config in both; a run
that fails before it has saved anything leaves no folder behind (:func:`remove_failed_run`)."""

from __future__ import annotations

import contextlib
import csv
import logging
import netrc
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from torch import Tensor

log = logging.getLogger(__name__)

OFFLINE_MODES = ("offline", "dryrun", "disabled")
# Lightning's WandbLogger(log_model=...): no checkpoint, those at the end of the fit, each when it is saved
LOG_MODEL_CHOICES = (False, True, "all")
WANDB_ID_FILE = "wandb_run_id.txt"  # in the run folder: the W&B run a resumed run continues


def read_wandb_id(run_dir: str | Path) -> str | None:
    """The W&B run id recorded in ``run_dir`` by a previous start of that run, ``None`` if there is none."""
    path = Path(run_dir, WANDB_ID_FILE)
    return (path.read_text().strip() or None) if path.is_file() else None


def wandb_has_credentials() -> bool:
    """True when an API key is in ``WANDB_API_KEY`` or in ``~/.netrc`` for the W&B host (no network used)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that never blocks or breaks training because of W&B.

    It logs offline (to ``save_dir/wandb/offline-run-*``, syncable later with ``wandb sync``) when there is no
    API key or ``WANDB_MODE`` is offline, and falls back to offline when an online start fails (no network,
    timeout after ``init_timeout`` seconds). ``id_file``: where the run id is written when the run starts
    (rank 0 only), so that a resumed run can pass it back as ``id``.

    ``log_model`` (``False``; ``True``: at the end of the fit; ``"all"``: at every save) logs the checkpoints
    of the ``ModelCheckpoint`` callbacks as ``model`` artifacts, also offline, where Lightning refuses it: the
    artifact is recorded in the offline run and its file staged locally, uploaded by ``wandb sync``.

    >>> logger = WandbLogger(project="unetseg", save_dir="runs", offline=True)
    >>> logger._offline
    True
    """

    def __init__(
        self,
        *args: Any,
        offline: bool | None = None,
        init_timeout: float = 60.0,
        id_file: str | None = None,
        log_model: bool | str = False,
        **kwargs: Any,
    ) -> None:
        self.id_file = id_file
        self._started = False  # whether this logger has started (or attached to) its W&B run
        self.local_dir: Path | None = None  # the run's local folder (save_dir/wandb/<offline-|>run-...)
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "") in OFFLINE_MODES or not wandb_has_credentials()
        if not offline:
            import wandb

            kwargs.setdefault("settings", wandb.Settings(init_timeout=init_timeout))
        # Lightning rejects log_model with offline=True (it cannot upload); W&B records the artifact offline.
        super().__init__(*args, offline=offline, log_model=False, **kwargs)
        self._log_model = check_log_model(log_model)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        try:
            run = super().experiment
        except Exception as err:  # W&B must not end a training run
            if self._offline:
                raise
            log.warning(
                "W&B could not start online (%s); logging offline under %s instead", err, self.save_dir
            )
            self._offline = True
            self._wandb_init["mode"] = "offline"
            self._wandb_init.pop("settings", None)
            run = super().experiment
        if not self._started:
            self._started = True
            self._record_id(run)
        return run

    def finish(self) -> None:
        """Finish this logger's W&B run if it has started one (it never starts one to finish it)."""
        if self._started:
            self.experiment.finish()

    def _scan_and_log_checkpoints(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Log the callback's new checkpoints as versions of the ``model-<run id>`` artifact (Lightning's
        method, except that only a callback with a ``monitor`` gives the alias ``best``: the ``last.ckpt``
        callback has none, and with Lightning's it would take that alias from the best checkpoint)."""
        import wandb

        monitored = getattr(checkpoint_callback, "monitor", None) is not None
        keys = ("monitor", "mode", "save_last", "save_top_k", "save_weights_only", "_every_n_train_steps")
        settings = {k: getattr(checkpoint_callback, k) for k in keys if hasattr(checkpoint_callback, k)}
        for mtime, path, score, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            metadata = {
                "score": score.item() if isinstance(score, Tensor) else score,
                "original_filename": Path(path).name,
                type(checkpoint_callback).__name__: settings,
            }
            self._checkpoint_name = self._checkpoint_name or f"model-{self.experiment.id}"
            artifact = wandb.Artifact(name=self._checkpoint_name, type="model", metadata=metadata)
            artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
            best = monitored and path == checkpoint_callback.best_model_path
            self.experiment.log_artifact(artifact, aliases=["latest", "best"] if best else ["latest"])
            self._logged_model_time[path] = mtime

    def _record_id(self, run: Any) -> None:
        """Write the run id to ``id_file`` so that ``--resume`` continues this W&B run."""
        run_dir = getattr(run, "dir", None)
        self.local_dir = Path(run_dir).parent if run_dir else None
        run_id = getattr(run, "id", None)
        if self.id_file and run_id:
            path = Path(self.id_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{run_id}\n")


def check_log_model(value: bool | str, key: str = "logging.log_model") -> bool | str:
    """``value`` if it is one of :data:`LOG_MODEL_CHOICES`, else a ``ValueError`` naming ``key``.

    >>> check_log_model("all")
    'all'
    """
    if value is True or value is False or value == "all":
        return value
    raise ValueError(
        f"{key}={value!r} is not one of {list(LOG_MODEL_CHOICES)}: false (no checkpoint), true "
        "(the checkpoints at the end of the fit) or 'all' (every checkpoint when it is saved)"
    )


class _RunExperimentWriter(ExperimentWriter):
    """CSV writer that continues an existing ``metrics.csv`` when resuming (Lightning's always deletes it) and
    warns only about an old ``metrics.csv``, not about other files of the run folder."""

    def __init__(self, log_dir: str, resume: bool = False) -> None:
        self.resume = resume
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        if self.resume:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])
        else:
            log.warning(
                "%s exists from an earlier run in this folder: it is replaced", self.metrics_file_path
            )
            self._fs.rm_file(self.metrics_file_path)


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; with ``resume=True`` it continues ``metrics.csv`` in an existing run folder.

    Rows logged between the checkpoint a run resumes from and the moment it stopped are kept, so after a
    resume some ``step`` values appear twice (the replayed steps, logged again).

    >>> RunCSVLogger("runs", name="demo", version="version_3", resume=True).log_dir.endswith("version_3")
    True
    """

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunExperimentWriter(log_dir=self.log_dir, resume=self.resume)
        return self._experiment


class RunLogging:
    """Where a run is logged: ``save_dir/<name>/version_N/`` (CSV metrics, config, checkpoints) and W&B.

    ``name`` defaults to the stem of the last ``--config`` file (``unet_add``); ``group`` and ``tags`` are
    passed to W&B (the ablation runner sets them). ``version`` names the run folder (``version_N``, the next
    free one, when ``None``); a fixed one (``slurm-$SLURM_JOB_ID``) lets a requeued job find its run again.
    The W&B run id is written to ``<run folder>/wandb_run_id.txt``; ``build(resume=True)`` continues that
    W&B run and the folder's ``metrics.csv``. ``log_model`` logs the run's checkpoints as W&B ``model``
    artifacts (``False``, ``True``: at the end of the fit, ``"all"``: at every save), offline too.

    >>> [type(lg).__name__ for lg in RunLogging(wandb=False).build("demo")]
    ['RunCSVLogger']
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str | None = None,
        project: str = "unetseg",
        group: str | None = None,
        tags: list[str] | None = None,
        wandb: bool = True,
        offline: bool | None = None,
        version: int | str | None = None,
        log_model: bool | str = False,
    ) -> None:
        self.save_dir = save_dir
        self.name = name
        self.project = project
        self.group = group
        self.tags = list(tags or [])
        self.wandb = wandb
        self.offline = offline
        self.version = version
        self.log_model = check_log_model(log_model)

    def build(self, default_name: str = "unetseg", resume: bool = False) -> list[Logger]:
        """The loggers for one run; the CSV logger comes first so files land in its versioned folder.

        ``resume=True`` continues the run folder's ``metrics.csv`` and its recorded W&B run.
        Paths are made absolute, so that a resumed run's checkpoint folder matches the one recorded in its
        checkpoint (Lightning compares them as strings) wherever it is resumed from.
        """
        name = self.name or default_name
        save_dir = os.path.abspath(self.save_dir)
        csv_logger = RunCSVLogger(save_dir=save_dir, name=name, version=self.version, resume=resume)
        loggers: list[Logger] = [csv_logger]
        if self.wandb:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            run_id = read_wandb_id(csv_logger.log_dir) if resume else None
            loggers.append(
                WandbLogger(
                    name=name,
                    project=self.project,
                    group=self.group,
                    tags=self.tags,
                    save_dir=save_dir,
                    offline=self.offline,
                    id=run_id,
                    id_file=os.path.join(csv_logger.log_dir, WANDB_ID_FILE),
                    log_model=self.log_model,
                )
            )
        return loggers


def has_results(run_dir: str | Path) -> bool:
    """Whether a run folder holds a checkpoint (``*.ckpt``) or logged metrics (a row in ``metrics.csv``)."""
    metrics = Path(run_dir, "metrics.csv")
    if metrics.is_file():
        with metrics.open() as f:
            if next(f, None) is not None and next(f, None) is not None:  # a header and a row
                return True
    return any(Path(run_dir).rglob("*.ckpt"))


def remove_failed_run(run_dir: str | Path, new_parents: Sequence[Path], loggers: Sequence[Logger]) -> bool:
    """Delete the folder of a run that failed before saving a checkpoint or a metric (:func:`has_results`),
    the local folders of its W&B runs and the folders of ``new_parents`` (made for this run) left empty.
    Returns whether it deleted anything; a folder with results is kept.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or has_results(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for local in {lg.local_dir for lg in loggers if isinstance(lg, WandbLogger) and lg.local_dir}:
        shutil.rmtree(local, ignore_errors=True)
        for link in local.parent.iterdir() if local.parent.is_dir() else []:
            if link.is_symlink() and not link.exists():  # latest-run, debug.log: now dangling
                link.unlink()
    for folder in sorted(new_parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return True


class SaveConfigToLoggers(SaveConfigCallback):
    """Saves the resolved config next to the checkpoints and into W&B, with parameter counts per part."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        counts = getattr(getattr(pl_module, "net", None), "parameter_counts", None)
        params = {f"params/{part}": n for part, n in counts().items()} if callable(counts) else {}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, _LightningWandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)
                Path(logger.experiment.dir, "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
