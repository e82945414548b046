"""Command line: ``unetseg-train --config unet_skip.yaml`` (or ``python train.py ...``) fits a model, then
tests its best checkpoint.

Configuration is LightningCLI (jsonargparse): the YAML mirrors the constructors of ``SegmentationModule``,
``SegmentationDataModule``, the net (``model.net``) and Lightning's ``Trainer``, plus a ``logging`` group
(``RunLogging``). ``configs/unet_skip.yaml`` is the base config: it is applied first, exactly once, and every
``--config`` file on top of it in the order given, so variants are overlays of a few lines. A bare config
name is looked up in ``./configs``, then in the configs shipped with unetseg (see :func:`resolve_config`);
any value can be overridden, e.g. ``--model.net.init_args.long_skip add``.

Scale-out options (see ``docs/cluster.md``): ``--trainer.precision bf16-mixed``, ``--performance.memory_format
channels_last``, ``--performance.compile true``, ``--trainer.devices N --trainer.strategy ddp``,
``--trainer.num_nodes M``, ``--trainer.max_time DD:HH:MM:SS`` (a time budget: the learning-rate schedule
spans it), and ``--resume last|auto|RUN_FOLDER|CKPT`` to continue a run where it stopped (epoch, optimizer,
scheduler, CSV log, W&B run). Lightning's SLURM requeue checkpoints (``hpc_ckpt_N.ckpt``) go into the run
folder, which is the Trainer's ``default_root_dir``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from argparse import Action
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from unetseg.data import SegmentationDataModule
from unetseg.data.formats.validate import DatasetError
from unetseg.training.callbacks import Performance, UnpaddedDistributedEval
from unetseg.training.checkpointing import AtomicCheckpointIO, remove_stale_temporaries, resolve_resume
from unetseg.training.loggers import RunLogging, SaveConfigToLoggers, WandbLogger
from unetseg.training.module import SegmentationModule


def _shipped_configs() -> Path:
    """``unetseg/configs`` of an installed wheel, else the checkout's ``configs/`` (source tree, editable)."""
    package = Path(__file__).resolve().parents[1]
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


# The repository's configs/: copied into the wheel as unetseg/configs (setup.py), read in place in a checkout.
REPO_CONFIGS = _shipped_configs()
AUTO_CONFIG = "auto"  # --config auto: plan the dataset (unetseg.plan)
BASE_CONFIG = "unet_skip.yaml"
CONFIG_FLAGS = ("-c", "--config")
# Listed by --help for model.net in place of every imported torch.nn.Module subclass (about 1,000).
NET_CLASSES = ("unetseg.UNet", "unetseg.nets.EncoderUNet")
DESCRIPTION = (
    "Fit a segmentation net, then test its best checkpoint. The base config unet_skip.yaml comes first, then "
    "each --config NAME (from ./configs or the configs shipped with unetseg) and each --KEY VALUE in order. "
    "The net's own keys (--model.net.init_args.*): --model.net.help unetseg.UNet."
)
USAGE = "%(prog)s [--config NAME ...] [--KEY VALUE ...] [--print_config] [--resume last|auto|FOLDER|CKPT]"
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
    """Folders searched for a bare config name: ``./configs`` first, then the configs shipped with unetseg."""
    dirs = [Path.cwd() / "configs", REPO_CONFIGS]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def resolve_config(name: str) -> str:
    """Path of a config given as a path or by name, in ``./configs`` then the shipped configs: ``unet_add``,
    ``unet_add.yaml``, ``cluster/ddp`` or, when no other config in that folder's tree has the name, ``ddp``.

    Raises ``FileNotFoundError`` listing the available configs, or ``ValueError`` listing the candidates of an
    ambiguous name.
    """
    if Path(name).is_file():
        return name
    for folder in config_dirs():
        for path in (folder / name, folder / f"{name}.yaml"):
            if path.is_file():
                return str(path)
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name in (name, f"{name}.yaml"))
        if len(found) > 1:
            candidates = [p.relative_to(folder).as_posix() for p in found]
            raise ValueError(f"config {name!r} is ambiguous in {folder}: give one of {candidates}")
        if found:
            return str(found[0])
    available = sorted({p.relative_to(d).as_posix() for d in config_dirs() for p in d.rglob("*.yaml")})
    searched = ", ".join(str(d) for d in config_dirs()) or "(no configs/ folder found)"
    raise FileNotFoundError(f"config {name!r} not found as a path nor in {searched}; available: {available}")


def _option(args: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag VALUE`` or ``--flag=VALUE``) in ``args``, else ``None``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def plan_config(args: list[str]) -> str:
    """``--config auto``: plan the dataset of ``--data.root`` (the training cases of ``--data.split_file``
    when given) into a YAML overlay, returned as a path (``auto.yaml`` in a new temporary folder)."""
    from unetseg.plan.overlay import plan_dataset

    root = _option(args, "--data.root")
    if not root:
        raise ValueError("--config auto plans from a dataset: give --data.root DIR (and --data.split_file)")
    folder = Path(tempfile.mkdtemp(prefix="unetseg-plan-"))
    return str(plan_dataset(root, folder / f"{AUTO_CONFIG}.yaml", _option(args, "--data.split_file")))


def _config_args(args: list[str]) -> tuple[list[str], str]:
    """``args`` with each ``--config`` resolved to a file and the base config first, exactly once (naming it
    again does nothing); also the run's default name: the last ``--config`` given, else the base's.
    ``--config auto`` plans the dataset (:func:`plan_config`) unless a config file of that name exists."""
    base = next((str(d / BASE_CONFIG) for d in config_dirs() if (d / BASE_CONFIG).is_file()), None)
    out: list[str] = ["--config", base] if base else []
    names: list[str] = []
    it = iter(args)
    for arg in it:
        flag, equals, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            out.append(arg)
            continue
        names.append(value if equals else next(it, ""))
        auto = names[-1] == AUTO_CONFIG and not any(d.joinpath(f"{AUTO_CONFIG}.yaml").is_file()
                                                    for d in config_dirs())
        path = plan_config(args) if auto else resolve_config(names[-1])
        if base is None or Path(path).resolve() != Path(base).resolve():
            out += ["--config", path]
    return out, Path(names[-1] if names else BASE_CONFIG).stem


def _with_atomic_checkpoints(plugins: object) -> list:
    """Trainer plugins plus ``AtomicCheckpointIO`` unless a ``CheckpointIO`` is given."""
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, Sequence) and not isinstance(plugins, str) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _checkpoint_callbacks() -> list[ModelCheckpoint]:
    """The best checkpoint by ``val/dice``, and ``last.ckpt`` after every validation (what --resume reads)."""
    best = ModelCheckpoint(
        monitor="val/dice",
        mode="max",
        filename="best-epoch{epoch:03d}-dice{val/dice:.4f}",
        auto_insert_metric_name=False,
    )
    # Not save_last=True on the monitored callback: since Lightning 2.6 that refreshes last.ckpt only when a
    # new best is saved.
    return [best, ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False)]


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with ``--model.net``'s list of known classes (every imported ``torch.nn.Module``
    subclass, about 1,000) cut to the nets of unetseg."""

    def _get_help_string(self, action: Action) -> str:  # argparse's hook for the text of one option
        text = super()._get_help_string(action)
        if action.dest != "model.net":
            return text
        nets = f"nets: {', '.join(NET_CLASSES)} or any torch.nn.Module class path"
        return re.sub(r"known subclasses: [^)]*", f"{nets}; --model.net.help CLASS lists its keys", text)


class UNetSegCLI(LightningCLI):
    """LightningCLI with the data's classes and channels linked into the model, a ``logging`` group, a
    ``performance`` group (``unetseg.training.callbacks.Performance``) and ``--resume``.

    ``run_name`` names the run folder unless ``--logging.name`` does.
    """

    resume_checkpoint: Path | None = None

    def __init__(self, *args: Any, run_name: str = "unetseg", **kwargs: Any) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunLogging, "logging")
        parser.add_lightning_class_args(Performance, "performance")
        parser.add_argument("--test", type=bool, default=True, help="Test the best checkpoint after fitting.")
        parser.add_argument("--resume", type=str | None, default=None, help=RESUME_HELP)
        parser.link_arguments("data.num_classes", "model.net.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.spatial_dims", "model.net.init_args.spatial_dims", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # ``main`` always passes the arguments (its own or sys.argv's), so Lightning's warning about ``args``
        # given beside a non-empty sys.argv would fire on every run: parse without it.
        self.config = parser.parse_args(args)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self.config_init.get("trainer") or {}
        resume = self.config_init.get("resume")
        if trainer_config.get("logger") is None:
            kwargs.update(self._run_folder(self.config_init["logging"], resume))
        elif resume:
            if resume in ("last", "auto"):
                raise ValueError(f"--resume {resume} needs the built-in logging: leave trainer.logger unset")
            self.resume_checkpoint = resolve_resume(resume, ".", "", None).checkpoint
        kwargs["plugins"] = _with_atomic_checkpoints(trainer_config.get("plugins"))
        return super().instantiate_trainer(**kwargs)

    def _run_folder(self, run_logging: RunLogging, resume: str | None) -> dict[str, Any]:
        """The Trainer's loggers and root folder for the built-in logging; the resumed run's folder if any."""
        name = run_logging.name or self.run_name
        point = resolve_resume(resume, run_logging.save_dir, name, run_logging.version) if resume else None
        if point is not None and point.run_dir is not None:
            run_logging.save_dir = str(point.run_dir.parent.parent)
            run_logging.name = point.run_dir.parent.name
            run_logging.version = point.run_dir.name
            remove_stale_temporaries(point.run_dir / "checkpoints")
        self.resume_checkpoint = point.checkpoint if point is not None else None
        loggers = run_logging.build(default_name=name, resume=self.resume_checkpoint is not None)
        # The run folder is the Trainer's root: Lightning's SLURM requeue checkpoints land in it, and a fresh
        # run never picks up another run's hpc_ckpt_N.ckpt from a shared folder.
        return {"logger": loggers, "default_root_dir": loggers[0].log_dir}


@dataclass
class RunResult:
    """What one ``main()`` call produced: the fitted objects, final metrics and where files went.

    ``steps``: the optimizer steps of the fit (Lightning's ``global_step``, counting those before a resume);
    ``fit_seconds``: the wall time of ``Trainer.fit`` in this call.
    """

    trainer: L.Trainer
    model: SegmentationModule
    datamodule: L.LightningDataModule
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    best_model_path: str = ""
    log_dir: str | None = None
    resumed_from: str | None = None
    steps: int = 0
    fit_seconds: float = 0.0


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def _close(trainer: L.Trainer | None) -> None:
    """Finish W&B runs and tear down the process group so the interpreter exits cleanly (DDP on CPU)."""
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger):
            logger.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_cli(args: list[str]) -> UNetSegCLI:
    """Parse ``args``, instantiate model, data and trainer; bad configs, keys or values exit with status 2."""
    try:
        args, run_name = _config_args(args)
        return UNetSegCLI(
            SegmentationModule,
            SegmentationDataModule,
            run=False,
            args=args,
            run_name=run_name,
            auto_configure_optimizers=False,
            parser_kwargs={"description": DESCRIPTION, "usage": USAGE, "formatter_class": HelpFormatter},
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [*_checkpoint_callbacks(), UnpaddedDistributedEval()]},
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


def run() -> int:
    """Console entry point ``unetseg-train``: :func:`main` on ``sys.argv``; exit status 0 when it finishes."""
    main()
    return 0


def _save_plan(cli: UNetSegCLI) -> None:
    """Copy a ``--config auto`` plan next to the run's ``config.yaml`` (rank 0)."""
    plans = [c for c in cli.config.get("config") or [] if Path(str(c)).name == f"{AUTO_CONFIG}.yaml"]
    if plans and cli.trainer.is_global_zero and cli.trainer.log_dir:
        Path(cli.trainer.log_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(plans[-1]), Path(cli.trainer.log_dir) / "plan.yaml")


def _main(args: list[str]) -> RunResult:
    cli = build_cli(args)
    _save_plan(cli)
    try:
        return _fit_and_test(cli)
    except DatasetError as err:  # found when the data is set up (voxel-level checks): no traceback
        print(f"unetseg: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        _close(cli.trainer)


def _fit_and_test(cli: UNetSegCLI) -> RunResult:
    """``fit`` (resuming from ``cli.resume_checkpoint``), a one-line summary, then ``test`` of the best
    checkpoint."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    resumed = str(cli.resume_checkpoint) if cli.resume_checkpoint is not None else None
    start = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=resumed)
    result = RunResult(trainer, model, data, val_metrics=_metrics(trainer.callback_metrics))
    result.resumed_from, result.log_dir = resumed, trainer.log_dir
    result.steps, result.fit_seconds = trainer.global_step, time.perf_counter() - start
    if trainer.is_global_zero:
        steps = f"to step {result.steps}" if resumed else f"{result.steps} step{'s' * (result.steps != 1)}"
        resume = f", resumed from {resumed}" if resumed else ""
        print(f"unetseg: trained {steps} in {result.fit_seconds:.1f} s{resume}", file=sys.stderr)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    result.best_model_path = best
    if cli.config.get("test", True):
        tested = trainer.test(model, datamodule=data, ckpt_path=best or None)
        result.test_metrics = _metrics(tested[0]) if tested else {}
    return result
