"""Command line: ``python train.py --config unet_skip.yaml`` fits a model, then tests its best checkpoint.

Configuration is LightningCLI (jsonargparse): the YAML mirrors the constructors of ``SegmentationModule``,
``SegmentationDataModule``, the net (``model.net``) and Lightning's ``Trainer``, plus a ``logging`` group
(``RunLogging``). ``configs/unet_skip.yaml`` is the base config: every ``--config`` file is applied on top of
it, so variants are overlays of a few lines. A bare config name is looked up in ``./configs`` and in the
repository's ``configs/``; any value can be overridden, e.g. ``--model.net.init_args.long_skip add``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from unetseg.data import SegmentationDataModule
from unetseg.loggers import RunLogging, SaveConfigToLoggers, WandbLogger
from unetseg.module import SegmentationModule

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIG = "unet_skip.yaml"
CONFIG_FLAGS = ("-c", "--config")


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


class UNetSegCLI(LightningCLI):
    """LightningCLI with the data's classes and channels linked into the model and a ``logging`` group."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunLogging, "logging")
        parser.add_argument("--test", type=bool, default=True, help="Test the best checkpoint after fitting.")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="Checkpoint to resume fitting from."
        )
        parser.link_arguments("data.num_classes", "model.net.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.spatial_dims", "model.net.init_args.spatial_dims", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        if self._get(self.config_init, "trainer", default={}).get("logger") is None:
            run_logging: RunLogging = self._get(self.config_init, "logging")
            kwargs["logger"] = run_logging.build(default_name=getattr(self, "default_run_name", "unetseg"))
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
    checkpoint = ModelCheckpoint(
        monitor="val/dice",
        mode="max",
        save_last=True,
        filename="best-epoch{epoch:03d}-dice{val/dice:.4f}",
        auto_insert_metric_name=False,
    )
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
            trainer_defaults={"callbacks": [checkpoint]},
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def main(args: list[str] | None = None) -> RunResult:
    """Fit, then test the best checkpoint (``--test false`` skips it); returns objects and metrics."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        cli = build_cli(args)
    except FileNotFoundError as err:  # from resolve_config, before parsing
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    cfg = cli.config
    try:
        trainer.fit(model, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
        result = RunResult(trainer, model, data, val_metrics=_metrics(trainer.callback_metrics))
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        result.best_model_path = best
        result.log_dir = trainer.log_dir
        if cfg.get("test", True):
            tested = trainer.test(model, datamodule=data, ckpt_path=best or None)
            result.test_metrics = _metrics(tested[0]) if tested else {}
        return result
    finally:
        _close(trainer)
