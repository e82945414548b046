"""Command line: ``python train.py --config unet_skip.yaml`` fits a model, then tests its best checkpoint.

Configuration is LightningCLI (jsonargparse): the YAML mirrors the constructors of ``SegmentationModule``,
``SegmentationDataModule``, the net (``model.net``) and Lightning's ``Trainer``, plus a ``logging`` group
(``RunLogging``). ``configs/unet_skip.yaml`` is the base config: every ``--config`` file is applied on top of
it, so variants are overlays of a few lines. A bare config name is looked up in ``./configs`` and in the
repository's ``configs/``; any value can be overridden, e.g. ``--model.net.init_args.long_skip add``.

Scale-out options (see ``docs/cluster.md``): ``--trainer.precision bf16-mixed``, ``--performance.memory_format
channels_last``, ``--performance.compile true``, ``--trainer.devices N --trainer.strategy ddp``,
``--trainer.num_nodes M``, and ``--resume last|auto|RUN_FOLDER|CKPT`` to continue a run where it stopped
(epoch, optimizer, scheduler, CSV log, W&B run). Lightning's SLURM requeue checkpoints (``hpc_ckpt_N.ckpt``)
go into the run folder, which is the Trainer's ``default_root_dir``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from unetseg.data import SegmentationDataModule
from unetseg.data.formats.validate import DatasetError
from unetseg.training.callbacks import Performance, UnpaddedDistributedEval
from unetseg.training.checkpointing import AtomicCheckpointIO, remove_stale_temporaries, resolve_resume
from unetseg.training.loggers import RunLogging, SaveConfigToLoggers, WandbLogger
from unetseg.training.module import SegmentationModule

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE_CONFIG = "unet_skip.yaml"
CONFIG_FLAGS = ("-c", "--config")
# Set in os.environ by Lightning during a run (launcher, process group, seeding): restored by ``main``.
RUN_ENV = (
    "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
    "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
)
RESUME_HELP = (
    "Continue a run where it stopped (epoch, optimizer, scheduler, CSV log and W&B run): 'last' (the run of "
    "this config name with the newest checkpoint), 'auto' (the run folder named by --logging.version if it "
    "has a checkpoint, else start it; for requeued cluster jobs), a run folder (runs/NAME/version_N) or a "
    ".ckpt file."
)


def config_dirs() -> list[Path]:
    """Folders searched for a bare config name: ``./configs`` first, then the repository's ``configs/``."""
    dirs = [Path.cwd() / "configs", REPO_CONFIGS]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def resolve_config(name: str) -> str:
    """Path of a config given as a path or as a name in ``configs/`` (``unet_add`` or ``unet_add.yaml``)."""
    candidates = [Path(name)]
    for folder in config_dirs():
        candidates += [folder / name, folder / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return str(path)
    available = sorted({p.name for d in config_dirs() for p in d.rglob("*.yaml")})
    searched = ", ".join(str(d) for d in config_dirs()) or "(no configs/ folder found)"
    raise FileNotFoundError(f"config {name!r} not found as a path nor in {searched}; available: {available}")


def _resolve_config_args(args: list[str]) -> list[str]:
    """Rewrite ``--config NAME`` / ``--config=NAME`` so that bare names point into ``configs/``."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in CONFIG_FLAGS:
            out += [arg, resolve_config(next(it, ""))]
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _config_stem(args: list[str]) -> str:
    """Name of the last config file given (the default run name), ``unet_skip`` when none is."""
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a in CONFIG_FLAGS]
    names += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return Path(names[-1]).stem if names else Path(BASE_CONFIG).stem


def _with_atomic_checkpoints(plugins: object) -> list:
    """Trainer plugins plus ``AtomicCheckpointIO`` unless a ``CheckpointIO`` is given."""
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, Sequence) and not isinstance(plugins, str) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class UNetSegCLI(LightningCLI):
    """LightningCLI with the data's classes and channels linked into the model, a ``logging`` group, a
    ``performance`` group (``unetseg.training.callbacks.Performance``) and ``--resume``."""

    resume_checkpoint: Path | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunLogging, "logging")
        parser.add_lightning_class_args(Performance, "performance")
        parser.add_argument("--test", type=bool, default=True, help="Test the best checkpoint after fitting.")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="Checkpoint to resume fitting from."
        )
        parser.add_argument("--resume", type=str | None, default=None, help=RESUME_HELP)
        parser.link_arguments("data.num_classes", "model.net.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.spatial_dims", "model.net.init_args.spatial_dims", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        resume = self._get(self.config_init, "resume")
        if resume and self._get(self.config_init, "ckpt_path"):
            raise ValueError("--resume and --ckpt_path both given: use one (--resume continues the logs too)")
        if trainer_config.get("logger") is None:
            run_logging: RunLogging = self._get(self.config_init, "logging")
            name = run_logging.name or getattr(self, "default_run_name", "unetseg")
            point = None
            if resume:
                point = resolve_resume(resume, run_logging.save_dir, name, run_logging.version)
            if point is not None and point.run_dir is not None:
                run_logging.save_dir = str(point.run_dir.parent.parent)
                run_logging.name = point.run_dir.parent.name
                run_logging.version = point.run_dir.name
                remove_stale_temporaries(point.run_dir / "checkpoints")
            self.resume_checkpoint = point.checkpoint if point is not None else None
            loggers = run_logging.build(default_name=name, resume=self.resume_checkpoint is not None)
            kwargs["logger"] = loggers
            # The run folder is the Trainer's root: Lightning's SLURM requeue checkpoints land in it, and a
            # fresh run never picks up another run's hpc_ckpt_N.ckpt from a shared folder.
            kwargs["default_root_dir"] = loggers[0].log_dir
        elif resume:
            if resume in ("last", "auto"):
                raise ValueError(f"--resume {resume} needs the built-in logging: leave trainer.logger unset")
            self.resume_checkpoint = resolve_resume(resume, ".", "", None).checkpoint
        kwargs["plugins"] = _with_atomic_checkpoints(trainer_config.get("plugins"))
        return super().instantiate_trainer(**kwargs)


@dataclass
class RunResult:
    """What one ``main()`` call produced: the fitted objects, final metrics and where files went."""

    trainer: L.Trainer
    model: SegmentationModule
    datamodule: L.LightningDataModule
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    best_model_path: str = ""
    log_dir: str | None = None
    resumed_from: str | None = None


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def _close(trainer: L.Trainer | None) -> None:
    """Finish W&B runs and tear down the process group so the interpreter exits cleanly (DDP on CPU)."""
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_cli(args: list[str]) -> UNetSegCLI:
    """Parse ``args`` and instantiate model, data and trainer; bad keys or values exit with status 2."""
    args = _resolve_config_args(args)
    # The base config is applied first, as an explicit --config (jsonargparse's default_config_files
    # mis-parses callable types such as the optimizer).
    if any(d.joinpath(BASE_CONFIG).is_file() for d in config_dirs()):
        args = ["--config", resolve_config(BASE_CONFIG), *args]
    best = ModelCheckpoint(
        monitor="val/dice",
        mode="max",
        filename="best-epoch{epoch:03d}-dice{val/dice:.4f}",
        auto_insert_metric_name=False,
    )
    # last.ckpt after every validation (every epoch), what --resume continues from. Not save_last=True on
    # the monitored callback: since Lightning 2.6 that refreshes last.ckpt only when a new best is saved.
    last = ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False)
    cli_class = type("UNetSegCLI", (UNetSegCLI,), {"default_run_name": _config_stem(args)})
    try:
        return cli_class(
            SegmentationModule,
            SegmentationDataModule,
            run=False,
            args=args,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [best, last, UnpaddedDistributedEval()]},
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


@contextlib.contextmanager
def _restored_environment(keys: Sequence[str] = RUN_ENV) -> Iterator[None]:
    """Put ``keys`` of ``os.environ`` back as they were, whatever the block set or removed."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(args: list[str] | None = None) -> RunResult:
    """Fit, then test the best checkpoint (``--test false`` skips it); returns objects and metrics.

    Environment variables that Lightning sets for a run (``LOCAL_RANK``, ``MASTER_PORT``, ``PL_GLOBAL_SEED``
    ..., see ``RUN_ENV``) are restored afterwards: a later run in the same process, or a process it starts,
    would otherwise believe it was launched as a DDP worker (and wait forever for the other ranks). So is
    torch's CPU thread count, which Lightning's DDP setup changes.
    """
    threads = torch.get_num_threads()
    with _restored_environment():
        try:
            return _main(sys.argv[1:] if args is None else list(args))
        finally:
            torch.set_num_threads(threads)


def _main(args: list[str]) -> RunResult:
    try:
        cli = build_cli(args)
    except FileNotFoundError as err:  # from resolve_config, before parsing
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    cfg = cli.config
    resumed = str(cli.resume_checkpoint) if cli.resume_checkpoint is not None else None
    try:
        return _fit_and_test(trainer, model, data, cfg, resumed)
    except DatasetError as err:  # found when the data is set up (voxel-level checks): no traceback
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        _close(trainer)


def _fit_and_test(
    trainer: L.Trainer, model: L.LightningModule, data: L.LightningDataModule, cfg: Any, resumed: str | None
) -> RunResult:
    """``fit`` (resuming from ``resumed`` or ``ckpt_path``), then ``test`` of the best checkpoint."""
    trainer.fit(model, datamodule=data, ckpt_path=resumed or cfg.get("ckpt_path"))
    result = RunResult(trainer, model, data, val_metrics=_metrics(trainer.callback_metrics))
    result.resumed_from = resumed
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    result.best_model_path = best
    result.log_dir = trainer.log_dir
    if cfg.get("test", True):
        tested = trainer.test(model, datamodule=data, ckpt_path=best or None)
        result.test_metrics = _metrics(tested[0]) if tested else {}
    return result
