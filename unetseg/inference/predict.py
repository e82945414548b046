"""Segment new images: ``python -m unetseg.inference.predict --ckpt X [--ckpt Y ...] --input DIR_OR_FILE
--output DIR``.

The model, its inference settings (sliding window, TTA) and the training preprocessing (normalization,
resampling, resizing) come from the checkpoint alone. Several checkpoints (``--ckpt`` repeated or given a
list, or a folder such as a cross-validation's ``fold_*`` runs) form an ensemble: the softmax probabilities of
the models, each run with its own recorded inference settings, are averaged before the argmax; they must agree
on classes, input channels, spatial dims and preprocessing. Every input case gives one mask of class indices
(uint8): NIfTI inputs a ``<case>.nii.gz`` with the input's affine and header geometry, 2D raster inputs (PNG,
JPEG, TIFF, ...) a palette ``<case>.png`` of the same size (pixel values are class indices, coloured for
viewers). A folder is processed case by case with a progress bar; nnU-Net style channel files
(``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``) are stacked as channels. A case that fails (unreadable file,
wrong channel count, ...) is reported naming its file and skipped; the exit status is 1 if any case failed, 2
for a bad checkpoint or arguments, else 0.

Postprocessing (keep the largest connected component of the foreground and/or of some classes, as decided on
cross-validation: :mod:`unetseg.inference.postprocess`) is applied to every mask after the argmax when a
``postprocessing.json`` is given (``--postprocessing FILE``) or found in a folder given as ``--ckpt`` or in
the folder that holds the checkpoint(s) (their common parent for an ensemble); ``--postprocessing none``
turns it off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unetseg.data.normalize import ChannelNormalizer, build_normalization
from unetseg.inference.cases import InputCase, find_cases, read_case, write_mask
from unetseg.inference.checkpoint import CheckpointModel, check_ensemble, checkpoint_files
from unetseg.inference.inferer import Inferer
from unetseg.inference.postprocess import POSTPROCESSING_FILE, Postprocessing, apply_postprocessing

__all__ = ["InputCase", "Predictor", "build_parser", "find_cases", "main"]


def _resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    return resolved


def _with_inference(model: CheckpointModel, overrides: dict[str, Any]) -> CheckpointModel:
    """``model`` with its recorded ``Inferer`` arguments updated by ``overrides`` (none: unchanged)."""
    if overrides:
        base = model.inference.config() if model.inference is not None else {}
        model.inference = Inferer(**{**base, **overrides})
    return model


class Predictor:
    """A checkpoint's model, or an ensemble of them, with the training preprocessing, applied to images.

    An ensemble averages the softmax probabilities of its models (each with its own inference settings); the
    models must agree on classes, input channels, spatial dims and preprocessing.

    ``image`` is ``(C, *spatial)`` raw intensities; probabilities are ``(K, *spatial)`` float32, the mask
    ``(*spatial)`` uint8 (their argmax over the classes, then ``postprocessing`` if set):

    >>> predictor = Predictor.from_checkpoint(["fold_0/best.ckpt", "fold_1/best.ckpt"])  # doctest: +SKIP
    >>> probabilities = predictor.predict_probabilities(image)  # doctest: +SKIP
    >>> mask = predictor.predict_array(image)  # doctest: +SKIP
    >>> predictor.postprocessing = Postprocessing.from_json("runs/cv/postprocessing.json")  # doctest: +SKIP
    """

    def __init__(
        self,
        models: CheckpointModel | Sequence[CheckpointModel],
        normalizer: ChannelNormalizer,
        device: torch.device,
        source: str = "",
    ) -> None:
        models = [models] if isinstance(models, CheckpointModel) else list(models)
        if not models:
            raise ValueError("a Predictor needs at least one model")
        check_ensemble(models)
        self.models = [model.to(device).eval() for model in models]
        self.normalizer = normalizer
        self.device = device
        self.source = source
        self.spatial_dims = models[0].spatial_dims
        self.in_channels = models[0].in_channels
        pre = models[0].preprocessing
        self.target_spacing = pre.get("target_spacing")
        self.resize = pre.get("resize")
        self.slice_axis = int(pre.get("slice_axis", 2))
        self.batch_size = 8  # slices per forward pass for 2D nets on volumes
        self.postprocessing: Postprocessing | None = None  # applied to every mask after the argmax

    @property
    def module(self) -> CheckpointModel:
        """The first model (the only one unless this is an ensemble)."""
        return self.models[0]

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path | Sequence[str | Path],
        device: str = "auto",
        normalization: Any = None,
        inference: dict[str, Any] | None = None,
    ) -> Predictor:
        """Load ``ckpt``: a checkpoint file, a folder of them or a list of both (an ensemble, see
        :func:`~unetseg.inference.checkpoint.checkpoint_files`). ``normalization`` overrides the recorded one,
        ``inference`` updates every model's recorded ``Inferer`` arguments (``{"roi_size": [128, 128]}``)."""
        resolved = _resolve_device(device)
        paths = checkpoint_files(ckpt)
        models = [_with_inference(CheckpointModel.load(path), inference or {}) for path in paths]
        config = normalization if normalization is not None else models[0].preprocessing.get("normalization")
        if config is None:
            raise ValueError(
                f"checkpoint {paths[0]} does not record the intensity normalization of its training data; "
                'pass --normalization (e.g. zscore, or \'{"name": "ct", "window": [-160, 240]}\')'
            )
        normalizer = build_normalization(config, in_channels=models[0].in_channels)
        return cls(models, normalizer, resolved, ", ".join(map(str, paths)))

    def _logits(self, model: CheckpointModel, image: Tensor) -> Tensor:
        """Logits ``(N, K, *spatial)`` of normalized images ``(N, C, *spatial)``, resized as in training."""
        size = image.shape[2:]
        if self.resize is not None and self.spatial_dims == 2 and tuple(size) != tuple(self.resize):
            image = F.interpolate(image, size=list(self.resize), mode="bilinear", align_corners=False)
        logits = model.infer(image.to(self.device)).float()
        if logits.shape[2:] != size:
            logits = F.interpolate(logits, size=list(size), mode="bilinear", align_corners=False)
        return logits

    def _case_logits(self, model: CheckpointModel, image: Tensor) -> Tensor:
        """Logits ``(1, K, *spatial)`` of a normalized image ``(C, *spatial)``; a 2D model segments a volume
        slice by slice along ``slice_axis``, ``batch_size`` slices per pass, stitched on the CPU."""
        if image.ndim - 1 == self.spatial_dims:
            return self._logits(model, image[None])
        slices = image.movedim(self.slice_axis + 1, 0)  # (S, C, H, W)
        parts = [self._logits(model, chunk).cpu() for chunk in slices.split(self.batch_size)]
        return torch.cat(parts).movedim(0, self.slice_axis + 1)[None].contiguous()

    def _prepare(
        self, image: np.ndarray, spacing: Sequence[float] | None, name: str
    ) -> tuple[Tensor, list[int] | None]:
        """The normalized image ``(C, *spatial)`` on the training spacing; the input's spatial shape when it
        was resampled (the logits go back to it), else ``None``. Raises naming ``name`` for a bad shape."""
        if image.ndim < 3 or image.shape[0] != self.in_channels:
            raise ValueError(
                f"{name} has {image.shape[0] if image.ndim >= 3 else 1} channel(s) (shape as (C, *spatial): "
                f"{image.shape}); the model expects {self.in_channels}"
            )
        dims = image.ndim - 1
        if dims not in (self.spatial_dims, 3):
            raise ValueError(f"{name} has {dims} spatial axes; the {self.spatial_dims}D model needs 2 or 3")
        original = list(image.shape[1:])
        resampled = False
        if self.target_spacing is not None and spacing is not None and len(self.target_spacing) == dims:
            from unetseg.data.cases import resample

            image, _ = resample(image, None, spacing, self.target_spacing)
            resampled = list(image.shape[1:]) != original
        return torch.from_numpy(self.normalizer(image)), original if resampled else None

    @torch.no_grad()
    def predict_probabilities(
        self, image: np.ndarray, spacing: Sequence[float] | None = None, name: str = "image"
    ) -> np.ndarray:
        """Class probabilities ``(K, *spatial)`` float32 of a raw-intensity image ``(C, *spatial)``
        (``spacing`` per axis): the mean over the models of the softmax of their logits, on the input's
        grid."""
        x, original = self._prepare(image, spacing, name)
        total: Tensor | None = None
        for model in self.models:
            logits = self._case_logits(model, x)
            if original is not None:
                mode = "trilinear" if len(original) == 3 else "bilinear"
                logits = F.interpolate(logits, size=original, mode=mode, align_corners=False)
            probabilities = torch.softmax(logits, dim=1)
            total = probabilities if total is None else total + probabilities.to(total.device)
        assert total is not None
        return (total[0] / len(self.models)).cpu().numpy()

    def predict_array(
        self, image: np.ndarray, spacing: Sequence[float] | None = None, name: str = "image"
    ) -> np.ndarray:
        """Mask ``(*spatial)`` uint8 of a raw-intensity image ``(C, *spatial)``: the argmax over the classes
        of :meth:`predict_probabilities`, then ``postprocessing`` (if set) over the whole image or volume."""
        mask = self.predict_probabilities(image, spacing, name).argmax(0).astype(np.uint8)
        return mask if self.postprocessing is None else apply_postprocessing(mask, self.postprocessing)

    def read_case(self, case: InputCase) -> tuple[np.ndarray, tuple[float, ...], Any]:
        """``(image (C, *spatial) float32, spacing, reference)`` of ``case`` (see :func:`read_case`)."""
        return read_case(case, self.spatial_dims, self.in_channels)

    def predict_case(self, case: InputCase, output_dir: str | Path) -> Path:
        """Segment one case and write its mask into ``output_dir``; returns the written file."""
        image, spacing, reference = self.read_case(case)
        mask = self.predict_array(image, spacing, name=str(case.files[0]))
        return write_mask(mask, case, reference, output_dir)


def _json_or_str(value: str) -> Any:
    """A JSON value when ``value`` parses as one, else the string (``zscore``)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetseg.inference.predict",
        description="Segment images with a unetseg checkpoint (model and preprocessing from the checkpoint).",
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        nargs="+",
        action="extend",
        help="checkpoint(s) (.ckpt) written by train.py, or folders of them (one model per run found "
        "below: best*.ckpt, else last.ckpt, else every .ckpt); several form an ensemble (mean probabilities)",
    )
    parser.add_argument("--input", required=True, help="an image file or a folder of them (NIfTI, PNG, ...)")
    parser.add_argument("--output", required=True, help="folder for the masks (created)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--roi-size", type=int, nargs="+", help="sliding-window size (overrides the ckpt)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--mode", choices=["gaussian", "constant"], help="sliding-window blending")
    parser.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip TTA")
    parser.add_argument(
        "--normalization",
        type=_json_or_str,
        help='override the recorded normalization: a name (zscore) or JSON (\'{"name": "ct"}\')',
    )
    parser.add_argument(
        "--postprocessing",
        help=f"a {POSTPROCESSING_FILE} to apply to the masks, or none; default: the {POSTPROCESSING_FILE} in "
        "a folder given as --ckpt or in the checkpoints' (common) folder, if any",
    )
    return parser


def _postprocessing_file(
    option: str | None, sources: Sequence[str], checkpoints: Sequence[str]
) -> Path | None:
    """The postprocessing file to apply: ``option`` (``none``: no file), else the first
    ``postprocessing.json`` in a folder of ``sources`` (``--ckpt``) or in the common parent folder of the
    ``checkpoints`` files."""
    if option is not None:
        return None if option.lower() == "none" else Path(option)
    folders = [Path(source) for source in sources if Path(source).is_dir()]
    folders.append(Path(os.path.commonpath([str(Path(path).resolve().parent) for path in checkpoints])))
    return next((f / POSTPROCESSING_FILE for f in folders if (f / POSTPROCESSING_FILE).is_file()), None)


def _inference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Inferer`` arguments given on the command line."""
    given = {
        "roi_size": args.roi_size,
        "overlap": args.overlap,
        "mode": args.mode,
        "sw_batch_size": args.sw_batch_size,
        "flip_tta": args.tta,
    }
    return {key: value for key, value in given.items() if value is not None}


def _predict_cases(predictor: Predictor, cases: list[InputCase], output: str) -> list[tuple[str, str]]:
    """Segment every case into ``output`` with a progress bar; returns ``(case id, error)`` of the failed."""
    from tqdm import tqdm

    failures: list[tuple[str, str]] = []
    for case in tqdm(cases, desc="predict", unit="case", file=sys.stderr):
        try:
            predictor.predict_case(case, output)
        except Exception as err:  # one bad case must not stop the others; reported below
            message = str(err) if str(case.files[0]) in str(err) else f"{case.files[0]}: {err}"
            failures.append((case.case_id, f"{type(err).__name__}: {message}"))
            tqdm.write(f"unetseg.inference.predict: failed {case.case_id}: {message}", file=sys.stderr)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some cases failed, 2 bad checkpoint/input)."""
    args = build_parser().parse_args(argv)
    try:
        predictor = Predictor.from_checkpoint(
            args.ckpt, args.device, args.normalization, _inference_overrides(args)
        )
        pp_file = _postprocessing_file(args.postprocessing, args.ckpt, [m.path for m in predictor.models])
        if pp_file is not None:
            predictor.postprocessing = Postprocessing.from_json(pp_file)
            predictor.postprocessing.check(predictor.module.class_names, pp_file)
        cases = find_cases(args.input)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"unetseg.inference.predict: error: {err}", file=sys.stderr)
        return 2
    if predictor.postprocessing is not None:
        print(
            f"unetseg.inference.predict: postprocessing from {pp_file}: {predictor.postprocessing}",
            file=sys.stderr,
        )
    if len(predictor.models) > 1:
        ensemble = f"ensemble of {len(predictor.models)} models: {predictor.source}"
        print(f"unetseg.inference.predict: {ensemble}", file=sys.stderr)
    failures = _predict_cases(predictor, cases, args.output)
    written = len(cases) - len(failures)
    print(f"unetseg.inference.predict: wrote {written} mask(s) to {args.output}", file=sys.stderr)
    if failures:
        print(f"unetseg.inference.predict: {len(failures)} of {len(cases)} case(s) failed:", file=sys.stderr)
        for case_id, message in failures:
            print(f"  {case_id}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
