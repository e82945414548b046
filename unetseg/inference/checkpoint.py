"""Checkpoint files without Lightning: the trained net, its class names, inference settings and preprocessing.

A unetseg checkpoint records its net (``hyper_parameters["net"]``: class path and constructor arguments), the
net's weights (``state_dict`` entries prefixed ``net.``), the ``Inferer`` arguments
(``hyper_parameters["inference"]``), the class names and the data's preprocessing (``checkpoint
["preprocessing"]``). ``CheckpointModel.load`` rebuilds all of it from the file alone with ``torch.load
(weights_only=True)``; predict, export and ``SegmentationModule.load_for_inference`` use it. A
deep-supervised net is loaded without its deep-supervision heads (``inference_net``): it returns one tensor.
Folders of checkpoints (cross-validation folds) are expanded by ``checkpoint_files``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unetseg.inference.inferer import Inferer, as_inferer
from unetseg.nets.build import build_net

NET_PREFIX = "net."
# What the models of an ensemble must share: their outputs are averaged class by class on the same input.
ENSEMBLE_KEYS: tuple[str, ...] = ("class_names", "in_channels", "spatial_dims", "preprocessing")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a unetseg checkpoint file; raises ``FileNotFoundError``/``ValueError`` naming the file
    when it is missing, unreadable or not a ``SegmentationModule`` checkpoint that records its net."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoint files
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    config = hparams.get("net") if isinstance(hparams, dict) else None
    if not isinstance(config, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not a unetseg SegmentationModule checkpoint that records its net "
            "(hyper_parameters['net'] with class_path/init_args is missing)"
        )
    return checkpoint


def inference_net(net: nn.Module, copy_first: bool = True) -> nn.Module:
    """``net`` in eval mode without deep-supervision heads, so that it returns one tensor in any mode.

    A net with ``deep_supervision`` on is stripped with its ``strip_deep_supervision()`` (a deep copy unless
    ``copy_first=False``, which strips ``net`` itself); any other net is returned as it is, in eval mode.
    """
    if getattr(net, "deep_supervision", False) and callable(getattr(net, "strip_deep_supervision", None)):
        net = (copy.deepcopy(net) if copy_first else net).strip_deep_supervision()
    return net.eval()


def load_net(checkpoint: dict[str, Any], source: str | Path) -> nn.Module:
    """The net a checkpoint records, with its weights, in eval mode and without deep-supervision heads
    (:func:`inference_net`); raises naming ``source`` when the weights do not fit. Pretrained encoders are
    rebuilt without a download (``encoder_weights=None``): the weights are in the checkpoint."""
    config = checkpoint["hyper_parameters"]["net"]
    init_args = dict(config.get("init_args") or {})
    if init_args.get("encoder_weights"):
        init_args["encoder_weights"] = None
    net = build_net({**config, "init_args": init_args}, f"checkpoint {source}")
    state = {k.replace("._orig_mod.", "."): v for k, v in checkpoint["state_dict"].items()}  # torch.compile
    net_state = {k[len(NET_PREFIX) :]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    try:
        net.load_state_dict(net_state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {source}: the weights do not fit its net {config['class_path']}: {err}"
        ) from err
    return inference_net(net, copy_first=False)


def _class_names(hparams: dict[str, Any], net: nn.Module, source: str | Path) -> list[str]:
    """The recorded class names, else ``background, class_1, ...`` for the net's ``out_channels``."""
    if hparams.get("class_names"):
        return list(hparams["class_names"])
    num_classes = int(getattr(net, "out_channels", 0) or 0)
    if num_classes < 2:
        raise ValueError(f"checkpoint {source} records neither class names nor a net with out_channels >= 2")
    return ["background", *(f"class_{i}" for i in range(1, num_classes))]


class CheckpointModel(nn.Module):
    """A trained net with what its checkpoint records: class names, ``Inferer`` and preprocessing.

    ``forward`` is the net; ``infer`` runs it over whole images as validation did (sliding window, flip TTA).

    >>> model = CheckpointModel.load("runs/unet_skip/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> model.infer(torch.rand(1, model.in_channels, 64, 64)).shape  # (N, K, *spatial)  # doctest: +SKIP
    torch.Size([1, 4, 64, 64])
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        inference: Inferer | None = None,
        preprocessing: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        path: str | Path = "",
    ) -> None:
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.inference = inference
        self.preprocessing: dict[str, Any] = dict(preprocessing or {})
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.path = str(path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CheckpointModel:
        """The model of the checkpoint file ``path``, in eval mode (errors name the file)."""
        checkpoint = read_checkpoint(path, map_location)
        hparams = dict(checkpoint["hyper_parameters"])
        net = load_net(checkpoint, path)
        init_args = hparams["net"].get("init_args") or {}
        if init_args.get("deep_supervision") and not getattr(net, "deep_supervision", True):
            # the record of the net as loaded: stripped of its heads, it rebuilds without them
            hparams["net"] = {**hparams["net"], "init_args": {**init_args, "deep_supervision": False}}
        inference = as_inferer(hparams.get("inference"))
        preprocessing = checkpoint.get("preprocessing")
        return cls(net, _class_names(hparams, net, path), inference, preprocessing, hparams, path).eval()

    def _net_arg(self, name: str, default: int) -> int:
        """A net attribute, else its recorded constructor argument, else ``default``."""
        init_args = (self.hparams.get("net") or {}).get("init_args") or {}
        return int(getattr(self.net, name, init_args.get(name, default)))

    @property
    def spatial_dims(self) -> int:
        return self._net_arg("spatial_dims", 2)

    @property
    def in_channels(self) -> int:
        return self._net_arg("in_channels", 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def infer(self, image: Tensor) -> Tensor:
        """Logits ``(N, K, *spatial)`` of images ``(N, C, *spatial)`` with the recorded ``inference``."""
        return self.net(image) if self.inference is None else self.inference(self.net, image)


def _folder_checkpoints(folder: Path) -> list[Path]:
    """Per folder below ``folder`` with ``.ckpt`` files: its ``best*.ckpt``, else ``last.ckpt``, else all."""
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*.ckpt")):
        if path.is_file():
            by_folder.setdefault(path.parent, []).append(path)
    if not by_folder:
        raise FileNotFoundError(f"no checkpoint (.ckpt) in {folder} or its subfolders")
    chosen: list[Path] = []
    for files in by_folder.values():
        best = [f for f in files if f.name.startswith("best")]
        chosen += best or [f for f in files if f.name == "last.ckpt"] or files
    return chosen


def checkpoint_files(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """The checkpoint files of files and folders, in order. A folder gives, for every folder below it that
    holds ``.ckpt`` files, its ``best*.ckpt``, else its ``last.ckpt``, else all of them: one model per run of
    a cross-validation (``fold_*/version_0/checkpoints/best*.ckpt``) or a flat folder of ``*.ckpt``."""
    sources = [sources] if isinstance(sources, str | Path) else list(sources)
    if not sources:
        raise ValueError("no checkpoint given")
    files: list[Path] = []
    for source in map(Path, sources):
        files += _folder_checkpoints(source) if source.is_dir() else [source]
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            raise ValueError(f"checkpoint {path} is given twice (it would count double in the ensemble)")
        seen.add(path.resolve())
    return files


def check_ensemble(models: Sequence[CheckpointModel]) -> None:
    """Raise naming two checkpoints that differ in classes, input channels, spatial dims or preprocessing."""
    first = models[0]
    for model in models[1:]:
        for key in ENSEMBLE_KEYS:
            a, b = getattr(first, key), getattr(model, key)
            if a != b:
                raise ValueError(
                    f"checkpoints {first.path} and {model.path} disagree on {key}: {a!r} vs {b!r} "
                    f"(the models of an ensemble must share {', '.join(ENSEMBLE_KEYS)})"
                )
