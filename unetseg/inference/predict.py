"""Segment new images: ``python -m unetseg.inference.predict --ckpt X --input DIR_OR_FILE --output DIR``.

The model, its inference settings (sliding window, TTA) and the training preprocessing (normalization,
resampling, resizing) come from the checkpoint alone. Every input case gives one mask of class indices
(uint8): NIfTI inputs a ``<case>.nii.gz`` with the input's affine and header geometry, 2D raster inputs
(PNG, JPEG, TIFF, ...) a ``<case>.png`` of the same size. A folder is processed case by case with a progress
bar; nnU-Net style channel files (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``) are stacked as channels.
A case that fails (unreadable file, wrong channel count, ...) is reported naming its file and skipped; the
exit status is 1 if any case failed, 2 for a bad checkpoint or arguments, else 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unetseg.data.formats.io import (
    NIFTI_ENDINGS,
    SUPPORTED_ENDINGS,
    case_id_from_path,
    file_ending,
    read_array,
)
from unetseg.data.normalize import ChannelNormalizer, build_normalization
from unetseg.inference.inferer import Inferer
from unetseg.training.module import SegmentationModule

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    """One case to segment: its id (output name) and its files, one per channel group, in channel order."""

    case_id: str
    files: list[Path]

    @property
    def is_nifti(self) -> bool:
        return file_ending(self.files[0]) in NIFTI_ENDINGS


def find_cases(path: str | Path) -> list[InputCase]:
    """The cases of a file or folder; in a folder where every file name ends in ``_NNNN`` (nnU-Net channel
    files), files sharing the part before it form one case. Raises naming the path if there is nothing."""
    path = Path(path)
    if path.is_file():
        file_ending(path)  # raises for unsupported types, naming the file
        return [InputCase(case_id_from_path(path), [path])]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = []
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            try:
                file_ending(f)
            except ValueError:
                continue
            files.append(f)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(SUPPORTED_ENDINGS)}) in {path}")
    matches = [CHANNEL_SUFFIX.match(case_id_from_path(f)) for f in files]
    if all(matches):
        cases: dict[str, list[Path]] = {}
        channels = sorted((m["channel"], m["case"], f) for f, m in zip(files, matches, strict=True) if m)
        for _, case_id, f in channels:
            cases.setdefault(case_id, []).append(f)
        return [InputCase(case_id, cases[case_id]) for case_id in sorted(cases)]
    return [InputCase(case_id_from_path(f), [f]) for f in files]


def _resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    return resolved


class Predictor:
    """A checkpoint's model with its training preprocessing, applied to image arrays and files.

    >>> predictor = Predictor.from_checkpoint("last.ckpt", device="auto")  # doctest: +SKIP
    >>> mask = predictor.predict_array(image)  # image (C, *spatial) raw intensities -> (*spatial) uint8
    """

    def __init__(
        self,
        module: SegmentationModule,
        normalizer: ChannelNormalizer,
        device: torch.device,
        source: str = "",
    ) -> None:
        self.module = module.to(device).eval()
        self.normalizer = normalizer
        self.device = device
        self.source = source
        net_args = (module.hparams.get("net") or {}).get("init_args", {})
        self.spatial_dims = int(getattr(module.net, "spatial_dims", net_args.get("spatial_dims", 2)))
        self.in_channels = int(getattr(module.net, "in_channels", net_args.get("in_channels", 1)))
        pre = module.preprocessing
        self.target_spacing = pre.get("target_spacing")
        self.resize = pre.get("resize")
        self.slice_axis = int(pre.get("slice_axis", 2))
        self.batch_size = 8  # slices per forward pass for 2D nets on volumes

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path,
        device: str = "auto",
        normalization: Any = None,
        inference: dict[str, Any] | None = None,
    ) -> Predictor:
        """Load ``ckpt``; ``normalization`` overrides the recorded one, ``inference`` updates the recorded
        ``Inferer`` arguments (``{"roi_size": [128, 128], "flip_tta": True}``)."""
        module = SegmentationModule.load_for_inference(ckpt)
        if inference:
            base = module.inference.config() if module.inference is not None else {}
            module.inference = Inferer(**{**base, **inference})
        config = normalization if normalization is not None else module.preprocessing.get("normalization")
        if config is None:
            raise ValueError(
                f"checkpoint {ckpt} does not record the intensity normalization of its training data; "
                'pass --normalization (e.g. zscore, or \'{"name": "ct", "window": [-160, 240]}\')'
            )
        in_channels = int(getattr(module.net, "in_channels", 1))
        normalizer = build_normalization(config, in_channels=in_channels)
        return cls(module, normalizer, _resolve_device(device), str(ckpt))

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, *spatial)`` of normalized images ``(N, C, *spatial)``, resized as in training."""
        size = image.shape[2:]
        if self.resize is not None and self.spatial_dims == 2 and tuple(size) != tuple(self.resize):
            image = F.interpolate(image, size=list(self.resize), mode="bilinear", align_corners=False)
        logits = self.module.infer(image.to(self.device)).float()
        if logits.shape[2:] != size:
            logits = F.interpolate(logits, size=list(size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict_array(
        self, image: np.ndarray, spacing: Sequence[float] | None = None, name: str = "image"
    ) -> np.ndarray:
        """Mask ``(*spatial)`` uint8 of a raw-intensity image ``(C, *spatial)``; ``spacing`` per axis."""
        if image.ndim < 3 or image.shape[0] != self.in_channels:
            raise ValueError(
                f"{name} has {image.shape[0] if image.ndim >= 3 else 1} channel(s) (shape as (C, *spatial): "
                f"{image.shape}); the model expects {self.in_channels}"
            )
        dims = image.ndim - 1
        if dims not in (self.spatial_dims, 3):
            raise ValueError(f"{name} has {dims} spatial axes; the {self.spatial_dims}D model needs 2 or 3")
        original = image.shape[1:]
        resampled = False
        if self.target_spacing is not None and spacing is not None and len(self.target_spacing) == dims:
            from unetseg.data.volume import resample

            image, _ = resample(image, None, spacing, self.target_spacing)
            resampled = image.shape[1:] != original
        x = torch.from_numpy(self.normalizer(image))
        if dims == self.spatial_dims:
            logits = self._logits(x[None])
        else:  # a 2D net on a volume: slices along slice_axis, batched
            slices = x.movedim(self.slice_axis + 1, 0)  # (S, C, H, W)
            parts = [self._logits(chunk).cpu() for chunk in slices.split(self.batch_size)]
            logits = torch.cat(parts).movedim(0, self.slice_axis + 1)[None].contiguous()  # (1, K, *spatial)
        if resampled:
            mode = "trilinear" if dims == 3 else "bilinear"
            logits = F.interpolate(logits.float(), size=list(original), mode=mode, align_corners=False)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    def read_case(self, case: InputCase) -> tuple[np.ndarray, tuple[float, ...], Any]:
        """``(image (C, *spatial) float32, spacing, reference)``; the reference is the first NIfTI image
        (nibabel) or the raster's ``(H, W)``. Raises naming the file for unreadable or mismatching files.

        NIfTI arrays are ``(X, Y)``, ``(X, Y, Z)`` or ``(X, Y, Z, C)``; rasters ``(H, W)`` or ``(H, W, C)``.
        """
        parts, reference, spacing = [], None, None
        nifti = case.is_nifti
        for path in case.files:
            if (file_ending(path) in NIFTI_ENDINGS) != nifti:
                raise ValueError(f"{path}: case {case.case_id} mixes NIfTI and raster files")
            array = np.asarray(read_array(path), dtype=np.float32)
            if nifti:
                import nibabel as nib

                img = nib.load(str(path))
                spatial = 2 if array.ndim == 2 else 3  # (X, Y), (X, Y, Z) or (X, Y, Z, C)
                file_spacing = tuple(float(z) for z in img.header.get_zooms()[:spatial])
            else:
                if self.spatial_dims == 3:
                    raise ValueError(f"{path}: a 2D image cannot be segmented by a 3D model")
                spatial, file_spacing, img = 2, (1.0, 1.0), array.shape[:2]
            if array.ndim not in (spatial, spatial + 1):
                raise ValueError(
                    f"{path}: shape {array.shape} is not {spatial}D (optionally with channels last)"
                )
            array = array[..., None] if array.ndim == spatial else array
            if parts and array.shape[:-1] != parts[0].shape[:-1]:
                raise ValueError(
                    f"{path}: shape {array.shape[:-1]} differs from {case.files[0]} {parts[0].shape[:-1]}"
                )
            parts.append(array)
            reference = img if reference is None else reference
            spacing = file_spacing if spacing is None else spacing
        image = np.moveaxis(np.concatenate(parts, axis=-1), -1, 0)
        if image.shape[0] != self.in_channels:
            raise ValueError(
                f"{case.files[0]}: {image.shape[0]} channel(s) ({len(case.files)} file(s), shape "
                f"{parts[0].shape[:-1]}); the model expects {self.in_channels}"
            )
        return np.ascontiguousarray(image), tuple(spacing or ()), reference

    def predict_case(self, case: InputCase, output_dir: str | Path) -> Path:
        """Segment one case and write its mask into ``output_dir``; returns the written file."""
        image, spacing, reference = self.read_case(case)
        mask = self.predict_array(image, spacing, name=str(case.files[0]))
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if case.is_nifti:
            import nibabel as nib

            header = reference.header.copy()
            header.set_data_dtype(np.uint8)
            out = type(reference)(mask, reference.affine, header)
            out.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
            out.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
            out.header.set_slope_inter(1.0, 0.0)
            path = output_dir / f"{case.case_id}.nii.gz"
            nib.save(out, str(path))
        else:
            from PIL import Image

            path = output_dir / f"{case.case_id}.png"
            Image.fromarray(mask, mode="L").save(path)
        return path


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
        "--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by unetseg training"
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some cases failed, 2 bad checkpoint/input)."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in (
            ("roi_size", args.roi_size),
            ("overlap", args.overlap),
            ("mode", args.mode),
            ("sw_batch_size", args.sw_batch_size),
            ("flip_tta", args.tta),
        )
        if value is not None
    }
    try:
        predictor = Predictor.from_checkpoint(args.ckpt, args.device, args.normalization, overrides)
        cases = find_cases(args.input)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"unetseg.inference.predict: error: {err}", file=sys.stderr)
        return 2
    failures: list[tuple[str, str]] = []
    written = 0
    for case in tqdm(cases, desc="predict", unit="case", file=sys.stderr):
        try:
            predictor.predict_case(case, args.output)
            written += 1
        except Exception as err:  # one bad case must not stop the others; reported below
            message = str(err) if str(case.files[0]) in str(err) else f"{case.files[0]}: {err}"
            failures.append((case.case_id, f"{type(err).__name__}: {message}"))
            tqdm.write(f"unetseg.inference.predict: failed {case.case_id}: {message}", file=sys.stderr)
    print(f"unetseg.inference.predict: wrote {written} mask(s) to {args.output}", file=sys.stderr)
    if failures:
        print(f"unetseg.inference.predict: {len(failures)} of {len(cases)} case(s) failed:", file=sys.stderr)
        for case_id, message in failures:
            print(f"  {case_id}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
