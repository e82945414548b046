"""Run logging: a CSV log always, Weights & Biases unless turned off, and the resolved config in both."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)

OFFLINE_MODES = ("offline", "dryrun", "disabled")


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
    timeout after ``init_timeout`` seconds).

    >>> logger = WandbLogger(project="unetseg", save_dir="runs", offline=True)
    >>> logger._offline
    True
    """

    def __init__(
        self, *args: Any, offline: bool | None = None, init_timeout: float = 60.0, **kwargs: Any
    ) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "") in OFFLINE_MODES or not wandb_has_credentials()
        if not offline:
            import wandb

            kwargs.setdefault("settings", wandb.Settings(init_timeout=init_timeout))
        super().__init__(*args, offline=offline, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        try:
            return super().experiment
        except Exception as err:  # W&B must not end a training run
            if self._offline:
                raise
            log.warning(
                "W&B could not start online (%s); logging offline under %s instead", err, self.save_dir
            )
            self._offline = True
            self._wandb_init["mode"] = "offline"
            self._wandb_init.pop("settings", None)
            return super().experiment


class RunLogging:
    """Where a run is logged: ``save_dir/<name>/version_N/`` (CSV metrics, config, checkpoints) and W&B.

    ``name`` defaults to the stem of the last ``--config`` file (``unet_add``); ``group`` and ``tags`` are
    passed to W&B (the ablation runner sets them).

    >>> [type(lg).__name__ for lg in RunLogging(wandb=False).build("demo")]
    ['CSVLogger']
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
    ) -> None:
        self.save_dir = save_dir
        self.name = name
        self.project = project
        self.group = group
        self.tags = list(tags or [])
        self.wandb = wandb
        self.offline = offline

    def build(self, default_name: str = "unetseg") -> list[Logger]:
        """The loggers for one run; the CSV logger comes first so files land in its versioned folder."""
        name = self.name or default_name
        loggers: list[Logger] = [CSVLogger(save_dir=self.save_dir, name=name)]
        if self.wandb:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            loggers.append(
                WandbLogger(
                    name=name,
                    project=self.project,
                    group=self.group,
                    tags=self.tags,
                    save_dir=self.save_dir,
                    offline=self.offline,
                )
            )
        return loggers


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
