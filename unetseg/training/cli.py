"""Command line: ``unetseg-train --config unet_skip.yaml`` (or ``python train.py ...``) fits a model, then
tests its best checkpoint.

Configuration is LightningCLI (jsonargparse): the YAML mirrors the constructors of ``SegmentationModule``,
``SegmentationDataModule``, the net (``model.net``) and Lightning's ``Trainer``, plus a ``logging`` group
(``RunLogging``). ``configs/unet_skip.yaml`` is the base config: it is applied first, exactly once, and every
``--config`` file on top of it in the order given, so variants are overlays of a few lines. A bare config
name is looked up in ``./configs``, then in the configs shipped with unetseg (see :func:`resolve_config`);
any value can be overridden, e.g. ``--model.net.init_args.long_skip add``. ``--config auto`` plans the dataset
of ``--data.root`` (``unetseg.plan``); ``--data.root DIR`` without any ``--config`` does the same, and
``--config unet_skip`` trains the base recipe on it unplanned.

Scale-out options (see ``docs/cluster.md``): ``--trainer.precision bf16-mixed``, ``--performance.memory_format
channels_last``, ``--performance.compile true``, ``--trainer.devices N --trainer.strategy ddp``,
``--trainer.num_nodes M``, ``--trainer.max_time DD:HH:MM:SS`` (a time budget: the learning-rate schedule
spans it), and ``--resume last|auto|RUN_FOLDER|CKPT`` to continue a run where it stopped (epoch, optimizer,
scheduler, CSV log, W&B run). Lightning's SLURM requeue checkpoints (``hpc_ckpt_N.ckpt``) go into the run
folder, which is the Trainer's ``default_root_dir``.

Failures a user can cause end with one line on stderr and no traceback: exit status 2 for a bad config, key,
value, dataset or checkpoint (checked before the run folder is made, or the run folder this call made is
removed when nothing was saved in it), 143 for SIGTERM (``last.ckpt`` saved first, see
``unetseg.training.checkpointing.SigtermCheckpoint``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from argparse import Action, ArgumentError
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from unetseg.data import SegmentationDataModule
from unetseg.data.formats.validate import DatasetError
from unetseg.training.callbacks import Performance, UnpaddedDistributedEval
from unetseg.training.checkpointing import (
    AtomicCheckpointIO,
    ResumedTopK,
    SigtermCheckpoint,
    newest_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
)
from unetseg.training.loggers import RunLogging, SaveConfigToLoggers, WandbLogger, remove_failed_run
from unetseg.training.module import NonFiniteLossError, SegmentationModule


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
    "--data.root DIR without any --config plans the dataset (as --config auto). "
    "The net's own keys (--model.net.init_args.*): --model.net.help unetseg.UNet."
)
USAGE = "%(prog)s [--config NAME ...] [--KEY VALUE ...] [--print_config] [--resume last|auto|FOLDER|CKPT]"
# Set in os.environ by Lightning during a run (launcher, process group, seeding): restored by ``main``.
RUN_ENV = (
    "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
    "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
)
# Trainer keys checked before any run folder is made: the smallest valid value and what the key counts.
TRAINER_MINIMUMS: dict[str, tuple[int, str]] = {
    "max_epochs": (-1, "a number of epochs >= 0, or -1 for no limit"),
    "min_epochs": (0, "a number of epochs >= 0"),
    "max_steps": (-1, "a number of optimizer steps >= 0, or -1 for no limit"),
    "min_steps": (0, "a number of optimizer steps >= 0"),
    "accumulate_grad_batches": (1, "a number of batches >= 1"),
    "check_val_every_n_epoch": (1, "a number of epochs >= 1"),
}
# Errors of a run caused by its input (data, a diverging configuration): one line, exit status 2.
RUN_INPUT_ERRORS = (DatasetError, NonFiniteLossError)
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
    atexit.register(shutil.rmtree, folder, True)  # the run keeps its copy, plan.yaml (_save_plan)
    return str(plan_dataset(root, folder / f"{AUTO_CONFIG}.yaml", _option(args, "--data.split_file")))


def _config_args(args: list[str]) -> tuple[list[str], str]:
    """``args`` with each ``--config`` resolved to a file and the base config first, exactly once (naming it
    again does nothing); also the run's default name: the last ``--config`` given, else the base's.
    ``--config auto`` plans the dataset (:func:`plan_config`) unless a config file of that name exists; so
    does ``--data.root DIR`` without any ``--config`` (a dataset and no recipe: plan one, as nnU-Net does)."""
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
        check_yaml(path)
        if base is None or Path(path).resolve() != Path(base).resolve():
            out += ["--config", path]
    if not names and _option(args, "--data.root"):
        names.append(AUTO_CONFIG)
        at = 2 if base else 0  # right after the base, before every --KEY VALUE
        out[at:at] = ["--config", plan_config(args)]
    return out, Path(names[-1] if names else BASE_CONFIG).stem


def check_yaml(path: str | Path) -> None:
    """Raise ``ValueError`` naming the file, line and column of a YAML syntax error in the config ``path``."""
    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tab = " (indent with spaces, not tabs)" if "\\t" in (err.problem or "") else ""
        raise ValueError(f"config {path}{where}: YAML syntax error: {err.problem or err}{tab}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"config {path}: YAML syntax error: {err}") from err


def _flat_keys(node: yaml.Node | None, prefix: str = "") -> Iterator[tuple[str, int]]:
    """The dotted keys of a composed YAML mapping (``model.net.init_args.long_skip``, parents first), each
    with its line number."""
    for key, value in node.value if isinstance(node, yaml.MappingNode) else []:
        yield f"{prefix}{key.value}", key.start_mark.line + 1
        yield from _flat_keys(value, f"{prefix}{key.value}.")


def _where_set(message: str, args: list[str]) -> str:
    """Where the key of a jsonargparse ``message`` was set: `` (given on the command line)``, `` (set in
    FILE, line N)`` for the last ``--config`` file of ``args`` that sets it, or ``""`` when unknown."""
    quoted = re.findall(r"""["']([A-Za-z_][\w.]*)["']""", message)
    option = re.search(r"Option '(\w+)'", message)
    if not quoted:
        return ""

    def sets(flat: str) -> bool:
        under = flat == quoted[0] or flat.startswith(f"{quoted[0]}.")
        return under and (option is None or option.group(1) in flat.split("."))

    if any(sets(a[2:].split("=", 1)[0]) for a in args if a.startswith("--")):
        return " (given on the command line)"
    files = [value for flag, value in zip(args[:-1], args[1:], strict=True) if flag in CONFIG_FLAGS]
    for path in reversed(files):
        with contextlib.suppress(OSError, yaml.YAMLError):
            for flat, line in _flat_keys(yaml.compose(Path(path).read_text())):
                if sets(flat):
                    return f" (set in {path}, line {line})"
    return ""


def _with_atomic_checkpoints(plugins: object) -> list:
    """Trainer plugins plus ``AtomicCheckpointIO`` unless a ``CheckpointIO`` is given."""
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, Sequence) and not isinstance(plugins, str) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _checkpoint_callbacks() -> list[Callback]:
    """The best checkpoint by ``val/dice``, ``last.ckpt`` after every validation (what --resume reads) and on
    SIGTERM, and the clean-up of the best checkpoints on resume (``ResumedTopK``)."""
    best = ModelCheckpoint(
        monitor="val/dice",
        mode="max",
        filename="best-epoch{epoch:03d}-dice{val/dice:.4f}",
        auto_insert_metric_name=False,
    )
    # Not save_last=True on the monitored callback: since Lightning 2.6 that refreshes last.ckpt only when a
    # new best is saved.
    last = ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False)
    return [best, last, SigtermCheckpoint(filename="last"), ResumedTopK()]


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
    builtin_logging = False  # whether the run logs with ``RunLogging`` (the run folder is the CLI's)
    run_dir: Path | None = None  # the run folder when this call creates it (removed if the run saves nothing)
    new_parents: tuple[Path, ...] = ()  # folders above it that this call creates

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
        check_trainer(trainer_config)
        resume = self.config_init.get("resume")
        self.builtin_logging = trainer_config.get("logger") is None
        if self.builtin_logging:
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
        save_dir = Path(os.path.abspath(run_logging.save_dir))
        parents = (save_dir, save_dir / (run_logging.name or name), save_dir / "wandb")
        self.new_parents = tuple(p for p in parents if not p.exists())
        loggers = run_logging.build(default_name=name, resume=self.resume_checkpoint is not None)
        self.run_dir = None if Path(loggers[0].log_dir).exists() else Path(loggers[0].log_dir)
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


def check_trainer(config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming a ``trainer`` key whose value is below its range (``TRAINER_MINIMUMS``)."""
    for key, (smallest, valid) in TRAINER_MINIMUMS.items():
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < smallest:
            raise ValueError(f"trainer.{key}={value} is out of range: give {valid}")


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
            parser_kwargs={"description": DESCRIPTION, "usage": USAGE, "formatter_class": HelpFormatter,
                           "exit_on_error": False},
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [*_checkpoint_callbacks(), UnpaddedDistributedEval()]},
        )
    except ArgumentError as err:
        _exit_2(f"{err}{_where_set(str(err), args)}", err)
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        _exit_2(str(err), err)


def _exit_2(message: str, cause: BaseException) -> NoReturn:
    """Print ``message`` as one line ``unetseg: error: ...`` on stderr and exit with status 2."""
    line = " ".join(message.split())  # jsonargparse's messages span lines
    print(f"unetseg: error: {line}", file=sys.stderr)
    raise SystemExit(2) from cause


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
    finished = False
    try:
        _save_plan(cli)
        result = _fit_and_test(cli)
        finished = True
        return result
    except RUN_INPUT_ERRORS as err:  # bad data found at setup (voxel-level checks), a diverging run
        _end_progress_bar(cli.trainer)
        _exit_2(str(err), err)
    except SIGTERMException as err:  # a scheduler's preemption or time limit: not a success
        _end_progress_bar(cli.trainer)
        print(_sigterm_line(cli), file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from err
    finally:
        _close(cli.trainer)
        if not finished and cli.run_dir is not None and cli.trainer.is_global_zero:
            remove_failed_run(cli.run_dir, cli.new_parents, cli.trainer.loggers)


def _end_progress_bar(trainer: L.Trainer) -> None:
    """End the line of a progress bar that an exception left open, so that the next message starts a line."""
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled:
        print(file=sys.stderr)


def _sigterm_line(cli: UNetSegCLI) -> str:
    """The line printed when SIGTERM stopped the run: where, what was saved and how to continue."""
    trainer = cli.trainer
    where = f"unetseg: stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}"
    saved = next((c.saved for c in trainer.callbacks if isinstance(c, SigtermCheckpoint) and c.saved), None)
    kept = saved or newest_checkpoint(trainer.default_root_dir)
    resume = "--resume last" if cli.builtin_logging else f"--resume {kept or 'CKPT'}"
    if saved is not None:
        return f"{where}; saved {saved}: to continue, run the same command with {resume}"
    if kept is None:
        return f"{where}, before any checkpoint was saved: nothing to resume, start the run again"
    if trainer.state.fn == "test":
        return f"{where}, while testing (the fit had finished): to test, run the same command with {resume}"
    return f"{where} (no new checkpoint; {kept} is kept): to continue, run the same command with {resume}"


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
