"""Postprocessing decided on cross-validation, as nnU-Net does: keep only the largest connected component.

A predicted mask of class indices can be cleaned by removing every connected component but the largest, either
of the union of all foreground classes (``foreground_lcc``) or of single classes (``classes``); the removed
voxels become background (0). Components use full connectivity: 8 neighbours in 2D, 26 in 3D (faces, edges and
corners), as nnU-Net. Whether each step helps is measured on the out-of-fold predictions of a
cross-validation by :func:`decide_postprocessing`, which returns a :class:`Postprocessing`; it is saved as
``postprocessing.json`` and ``python -m unetseg.inference.predict`` applies it after the argmax
(:func:`apply_postprocessing`).

Pure numpy/scipy: no torch, no Lightning.

>>> mask = np.array([[1, 1, 0, 0, 1], [1, 1, 0, 2, 0]])
>>> largest_component(mask, [1]).tolist()  # the lone 1 on the right goes, the diagonal 2 stays
[[1, 1, 0, 0, 0], [1, 1, 0, 2, 0]]
>>> largest_foreground_component(mask).tolist()  # the 1 and the 2 touch diagonally: one component of 2 voxels
[[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

POSTPROCESSING_FILE = "postprocessing.json"


def _spatial_dims(mask: np.ndarray, spatial_dims: int | None) -> int:
    """``spatial_dims`` checked against ``mask`` (``None``: all of its axes)."""
    if spatial_dims is None:
        return mask.ndim
    if not 1 <= spatial_dims <= mask.ndim:
        raise ValueError(
            f"spatial_dims={spatial_dims} for a mask of shape {mask.shape}: use 1 to {mask.ndim}"
        )
    return spatial_dims


def _largest(region: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The boolean ``region`` reduced to its largest fully connected component, per image over its
    last ``spatial_dims`` axes (leading axes index independent images). Ties go to the first in C order."""
    structure = ndimage.generate_binary_structure(spatial_dims, spatial_dims)
    images = region.reshape(-1, *region.shape[region.ndim - spatial_dims :])
    kept = np.zeros_like(images)
    for index, image in enumerate(images):
        labels, count = ndimage.label(image, structure)
        if count <= 1:
            kept[index] = image
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        kept[index] = labels == sizes.argmax()
    return kept.reshape(region.shape)


def _keep_largest(mask: np.ndarray, region: np.ndarray, spatial_dims: int) -> np.ndarray:
    """``mask`` with the voxels of ``region`` outside its largest component set to 0: a copy, or ``mask``
    itself when there is nothing to remove."""
    removed = region & ~_largest(region, spatial_dims)
    if not removed.any():
        return mask
    out = mask.copy()
    out[removed] = 0
    return out


def largest_component(
    mask: np.ndarray, classes: Iterable[int], spatial_dims: int | None = None
) -> np.ndarray:
    """A copy of the index mask ``mask`` where every class in ``classes`` keeps only its largest connected
    component (full connectivity: 8 neighbours in 2D, 26 in 3D); the other voxels of that class become 0.

    ``spatial_dims`` (default: all axes) counts the trailing axes that form one image; leading axes index
    independent images (a batch ``(N, H, W)`` with ``spatial_dims=2``).

    >>> largest_component(np.array([[2, 0, 2, 2], [1, 0, 1, 1]]), [1, 2]).tolist()
    [[0, 0, 2, 2], [0, 0, 1, 1]]
    """
    mask = np.asarray(mask)
    dims = _spatial_dims(mask, spatial_dims)
    out = mask.copy()
    for k in classes:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(
                f"class {k!r}: the classes whose largest component is kept are indices >= 1 (0 is "
                "the background)"
            )
        out = _keep_largest(out, out == k, dims)
    return out


def largest_foreground_component(mask: np.ndarray, spatial_dims: int | None = None) -> np.ndarray:
    """A copy of the index mask ``mask`` where the union of all foreground classes (``mask > 0``) keeps only
    its largest connected component (full connectivity); classes inside it are unchanged, the rest becomes 0.
    ``spatial_dims`` as in :func:`largest_component`."""
    mask = np.asarray(mask)
    return _keep_largest(mask.copy(), mask > 0, _spatial_dims(mask, spatial_dims))


def _check_dice(values: Any, key: str, source: str) -> dict[str, float | None]:
    """A ``{class name: Dice or None}`` mapping read from ``source``."""
    ok = isinstance(values, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) or v is None for v in values.values()
    )
    if not ok:
        raise ValueError(f"{source}: {key} must map class names to a Dice (a number, or null when undefined)")
    return {str(name): None if value is None else float(value) for name, value in values.items()}


@dataclass
class Postprocessing:
    """Which largest-component steps to apply to a predicted index mask, and their cross-validation Dice.

    ``foreground_lcc``: keep only the largest component of the union of all foreground classes (applied
    first); ``classes``: then, for each of these class indices, keep only its largest component.
    ``class_names`` (background first) are those of the model it was decided for; ``dice_before`` and
    ``dice_after`` the out-of-fold Dice per foreground class without and with it (``None``: undefined, the
    class is absent from every label and prediction); ``min_gain`` the gain a class step had to exceed.

    >>> pp = Postprocessing(foreground_lcc=False, classes=[1], class_names=["background", "liver"])
    >>> apply_postprocessing(np.array([[1, 0, 1, 1]]), pp).tolist()
    [[0, 0, 1, 1]]
    >>> pp.to_json("runs/cv/postprocessing.json")  # doctest: +SKIP
    >>> Postprocessing.from_json("runs/cv/postprocessing.json") == pp  # doctest: +SKIP
    True
    """

    foreground_lcc: bool = False
    classes: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    dice_before: dict[str, float | None] = field(default_factory=dict)
    dice_after: dict[str, float | None] = field(default_factory=dict)
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.foreground_lcc, bool):
            raise ValueError(f"foreground_lcc must be true or false, got {self.foreground_lcc!r}")
        bad = [k for k in self.classes if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad or len(set(self.classes)) != len(self.classes):
            raise ValueError(
                f"classes {self.classes!r}: must be distinct class indices >= 1 (0 is the background)"
            )
        if self.class_names and max(self.classes, default=0) >= len(self.class_names):
            raise ValueError(f"classes {self.classes} out of range for class_names {self.class_names}")

    def __str__(self) -> str:
        steps = ["largest component of the foreground"] if self.foreground_lcc else []
        names = self.class_names
        steps += [f"largest component of {names[k] if names else 'class'} ({k})" for k in self.classes]
        return "; ".join(steps) if steps else "none (no step improved the cross-validation Dice)"

    def check(self, class_names: Sequence[str], source: str | Path) -> None:
        """Raise naming ``source`` when this postprocessing was decided for other classes than ``class_names``
        (a model's, background first)."""
        if self.class_names and list(self.class_names) != list(class_names):
            raise ValueError(
                f"{source} was decided for the classes {self.class_names}, the model has {list(class_names)}"
            )
        if max(self.classes, default=0) >= len(class_names):
            raise ValueError(
                f"{source}: classes {self.classes} out of range for the model's {list(class_names)}"
            )

    def to_json(self, path: str | Path) -> Path:
        """Write this as JSON to ``path`` (folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Postprocessing:
        """Read a file written by :meth:`to_json`; raises naming the file when missing or bad."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"postprocessing file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        known = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) - set(known) or "foreground_lcc" not in data:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path}: expected an object with the keys {known} (foreground_lcc required), got {found}"
            )
        for key in ("dice_before", "dice_after"):
            data[key] = _check_dice(data.get(key, {}), key, str(path))
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def apply_postprocessing(
    mask: np.ndarray, postprocessing: Postprocessing, spatial_dims: int | None = None
) -> np.ndarray:
    """``mask`` (class indices, 2D or 3D) after ``postprocessing``: the largest foreground component if
    ``foreground_lcc``, then the largest component of each of its ``classes``. Returns a new array."""
    if postprocessing.foreground_lcc:
        mask = largest_foreground_component(mask, spatial_dims)
    return largest_component(mask, postprocessing.classes, spatial_dims)


def class_counts(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` int64: true positives, false positives and false negatives per class."""
    confusion = np.bincount(
        label.ravel().astype(np.int64) * num_classes + prediction.ravel(), minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    tp = np.diag(confusion)
    return np.stack([tp, confusion.sum(0) - tp, confusion.sum(1) - tp], axis=1)


def pooled_dice(counts: np.ndarray) -> np.ndarray:
    """Dice per class of ``(K, 3)`` counts (summed over cases: the Dice over all their voxels); NaN where a
    class is in neither prediction nor label."""
    tp, fp, fn = counts.T.astype(np.float64)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.full_like(tp, np.nan), where=denominator > 0)


def _check_pair(prediction: Any, label: Any, num_classes: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A (prediction, label) pair as integer arrays of one shape with values in ``[0, num_classes)``."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    if prediction.shape != label.shape:
        raise ValueError(f"pair {index}: prediction shape {prediction.shape} != label shape {label.shape}")
    for name, array in (("prediction", prediction), ("label", label)):
        if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
            raise ValueError(
                f"pair {index}: the {name} has dtype {array.dtype}; expected class indices (integers)"
            )
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            raise ValueError(
                f"pair {index}: the {name} has values in [{array.min()}, {array.max()}]; the {num_classes} "
                f"classes are 0..{num_classes - 1}"
            )
    return prediction.astype(np.int64), label


def _candidate_counts(pairs: Iterable[tuple[Any, Any]], num_classes: int) -> dict[str, np.ndarray]:
    """Counts ``(K, 3)`` summed over ``pairs`` for the raw masks (``raw``), the largest foreground component
    (``fg``), and row by row for class ``k``'s largest component on top of each (``raw_class``,
    ``fg_class``): a class's step changes only that class's voxels, so one pass measures every decision."""
    totals = {key: np.zeros((num_classes, 3), np.int64) for key in ("raw", "fg", "raw_class", "fg_class")}
    count = 0
    for count, (prediction, label) in enumerate(pairs, start=1):
        prediction, label = _check_pair(prediction, label, num_classes, count - 1)
        for key, mask in (("raw", prediction), ("fg", largest_foreground_component(prediction))):
            counts = class_counts(mask, label, num_classes)
            totals[key] += counts
            for k in range(1, num_classes):
                kept = _keep_largest(mask, mask == k, mask.ndim)
                totals[f"{key}_class"][k] += (
                    counts[k] if kept is mask else class_counts(kept, label, num_classes)[k]
                )
    if count == 0:
        raise ValueError("decide_postprocessing needs at least one (prediction, label) pair")
    return totals


def _foreground_improves(before: np.ndarray, after: np.ndarray, min_gain: float) -> bool:
    """nnU-Net's rule for the foreground step: the mean foreground Dice rises by more than ``min_gain`` and no
    class gets worse (``before``/``after``: Dice per foreground class, NaN where undefined)."""
    defined = ~np.isnan(before)
    if not defined.any():
        return False
    gain = after[defined].mean() - before[defined].mean()
    return bool(gain > min_gain and not (after[defined] < before[defined]).any())


def _named(dice: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """``{class name: Dice}`` of the foreground classes, ``None`` where undefined (NaN)."""
    return {names[k]: None if np.isnan(dice[k]) else float(dice[k]) for k in range(1, len(names))}


def decide_postprocessing(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], class_names: Sequence[str], min_gain: float = 0.0
) -> Postprocessing:
    """Choose the largest-component steps that improve the Dice of out-of-fold predictions, as nnU-Net does.

    ``pairs``: ``(prediction, label)`` index arrays of one case each (2D or 3D, the same shape), e.g. every
    case's prediction by the fold that did not train on it; read once, so a generator keeps one case in
    memory. ``class_names``: all classes, background first. Dice per class is global over all pairs (true
    and false positives and false negatives summed), as ``test/dice``.

    1. Largest component of the union of the foreground: kept when the mean foreground Dice rises by more than
       ``min_gain`` and no class's Dice drops.
    2. Then, on top of step 1's outcome, per foreground class ``k``: largest component of ``k``, kept when
       ``k``'s Dice rises by more than ``min_gain``.

    >>> label = np.zeros((8, 8), np.int64); label[1:4, 1:4] = 1
    >>> prediction = label.copy(); prediction[6, 6] = 1  # a spurious voxel far away
    >>> pp = decide_postprocessing([(prediction, label)], ["background", "organ"])
    >>> pp.foreground_lcc, pp.classes, pp.dice_before["organ"], pp.dice_after["organ"]
    (True, [], 0.9473684210526315, 1.0)
    """
    names = [str(name) for name in class_names]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"class_names {names}: need distinct names, background first, and a foreground class"
        )
    totals = _candidate_counts(pairs, len(names))
    raw = pooled_dice(totals["raw"])
    foreground_lcc = _foreground_improves(raw[1:], pooled_dice(totals["fg"])[1:], min_gain)
    base = "fg" if foreground_lcc else "raw"
    before, with_lcc = pooled_dice(totals[base]), pooled_dice(totals[f"{base}_class"])
    classes = [k for k in range(1, len(names)) if with_lcc[k] - before[k] > min_gain]  # NaN: never chosen
    after = np.where(np.isin(np.arange(len(names)), classes), with_lcc, before)
    return Postprocessing(
        foreground_lcc, classes, names, _named(raw, names), _named(after, names), float(min_gain)
    )
