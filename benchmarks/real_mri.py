"""An open real-MRI segmentation dataset, built offline from the MNI152 template shipped in the nilearn wheel.

Provenance
----------
``nilearn`` (``pip install nilearn``, the ``mri`` extra) ships in ``nilearn/datasets/data/`` the 1 mm MNI
ICBM152 2009 nonlinear *symmetric* template (Fonov et al., NeuroImage 54:313-327, 2011 and NeuroImage
47:S102, 2009; Collins et al., IPMI 1999) as three uint8 volumes of 197 x 233 x 189 voxels, RAS+ axes, affine
``diag(1, 1, 1)`` + ``(-98, -134, -72)`` mm (MNI space):

* ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``: the T1-weighted average, skull-stripped (0 outside the
  brain) and rescaled to 0-255;
* ``mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz``: grey / white matter probability maps (x 255).

The file names and nilearn's source URL (``mni_icbm152_nlin_sym_09a_nifti.zip``) say release **2009a**
symmetric (nilearn's own description says "asymmetrical ... release a"; TemplateFlow's default
MNI152NLin2009c is a different release). No CSF map and no brain mask ship in the wheel: the CSF probability
is ``1 - p_gm - p_wm`` and the brain mask is the non-zero support of the skull-stripped T1. nilearn lists the
licence as "unknown"; the MNI distributes the ICBM152 2009 templates under a permissive licence whose
copyright notice (``Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University``) is kept in ``dataset.json``. One subject-free average brain: a
stand-in for real MRI in tests and benchmarks, not a population.

How the dataset is derived (:func:`derive_volume`, deterministic: same inputs, same bytes)
------------------------------------------------------------------------------------------
1. Downsample by block averaging (``spacing`` mm must be an integer number of 1 mm voxels): the T1, the GM and
   WM maps and the brain indicator ``T1 > 0`` are averaged over ``spacing``-cubed blocks (trailing
   voxels that do not fill a block, all outside the brain, are dropped).
2. Brain = block fraction of ``T1 > 0`` >= 0.5. Inside it each voxel takes the most probable tissue among
   CSF (``1 - p_gm - p_wm``, clipped to [0, 1]), grey matter and white matter; outside it is background.
3. Rare class, the **lateral ventricles**: the CSF voxels are split into 6-connected components; a component
   that touches a non-brain voxel (or the volume border) is external / sulcal CSF; the largest enclosed one is
   the lateral ventricles (both sides, joined through the foramina of Monro; ~18.5 mL at every spacing
   1-3 mm, centroid on the midline at MNI (0, -15, 15) mm). It must lie within 10 mm of the midline, or
   :class:`RuntimeError`. Other CSF (sulci, cisterns, temporal horns, small enclosed pockets) stays ``csf``.
4. Crop to the brain's bounding box (the T1 is skull-stripped, so head = brain) with ``margin`` background
   voxels in-plane and none along Z; cut along Z (axial) into slabs of ``slab`` slices (the last one shorter
   when the Z extent is not a multiple), one case each: ``imagesTr/mni_000.nii.gz`` (float32 T1) and
   ``labelsTr/mni_000.nii.gz`` (uint8), named from inferior to superior.
5. Affines: the template's, composed with the block averaging (voxel size ``spacing``, the block centre at
   ``(spacing - 1) / 2`` template voxels) and the crop / slab offset, so world (MNI) coordinates stay right.
6. ``splits.json`` assigns whole slabs, interleaved along Z so that every split spans the brain: slab ``i``
   is test if ``i % 5 == 2``, val if ``i % 5 == 3``, train otherwise (``{"train", "val", "test"}`` of case
   ids, the format of ``data.split_file``, see ``unetseg/data/splits.py``). All slabs are listed under
   ``training`` in ``dataset.json`` (``test`` is empty): the split file holds the test slabs out.

Labels: ``0 background, 1 csf, 2 grey_matter, 3 white_matter, 4 ventricles``.

Measured statistics (``python -m benchmarks.real_mri build DIR``, defaults: 2 mm, slabs of 6, margin 1)
----------------------------------------------------------------------------------------------------------
Volume 75 x 93 x 78 voxels (X, Y, Z) cut into 13 cases of 75 x 93 x 6: 8 train, 2 val, 3 test slabs.
Foreground (brain) 237,458 voxels (43.6 % of the voxels). Per class, share of the foreground voxels and share
of the 78 axial slices that contain it:

=============  ===========  ==============
class          foreground   axial slices
=============  ===========  ==============
csf             7.89 %      100.0 %
grey_matter    57.91 %       97.4 %
white_matter   33.23 %       93.6 %
ventricles      0.97 %       20.5 %
=============  ===========  ==============

The ventricles (16 slices) are in every split: train ``mni_005`` (1 slice) and ``mni_006`` (6), val
``mni_008`` (3), test ``mni_007`` (6). Background is in every slice (the in-plane margin).

Command line::

    python -m benchmarks.real_mri build /tmp/real_mri [--spacing 2] [--slab 6] [--margin 1] [--force]
    python -m benchmarks.real_mri stats /tmp/real_mri [--json]
    python -m benchmarks.real_mri cutout /tmp/real_mri_small [--force]

In Python, :func:`build_cutout` writes a small real-MRI fixture (a few 32 x 40 slabs around the ventricles at
3 mm, in well under a second once the template is loaded) for tests.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

CLASS_NAMES: tuple[str, ...] = ("background", "csf", "grey_matter", "white_matter", "ventricles")
BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER, VENTRICLES = range(5)
TEMPLATE_FILES: dict[str, str] = {
    key: f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz" for key in ("t1", "gm", "wm")
}
CASE_PREFIX = "mni"
SPLIT_FILE = "splits.json"
TEST_EVERY = 5  # slab i is test if i % TEST_EVERY == SPLIT_OFFSET, val if it is the next one
SPLIT_OFFSET = 2
MAX_MIDLINE_MM = 10.0
LICENCE = (
    "MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University (permissive licence, keep this notice)"
)
REFERENCE = (
    "Fonov et al., NeuroImage 54(1):313-327, 2011; Fonov et al., NeuroImage 47:S102, 2009; "
    "template file from the nilearn wheel (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted)"
)


class NilearnMissingError(ModuleNotFoundError):
    """nilearn, which ships the MNI152 template, is not installed."""


@dataclass(frozen=True)
class Template:
    """The 1 mm template: T1 and GM / WM probability maps (uint8, read-only) and their affine."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    sform_code: int
    folder: Path


@dataclass(frozen=True)
class Volume:
    """One derived volume: T1 image (float32), labels (uint8) and the affine of voxel ``(0, 0, 0)``."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def template_folder() -> Path:
    """``nilearn/datasets/data`` of the installed nilearn (found without importing nilearn, which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise NilearnMissingError(
            "the real-MRI dataset is built from the MNI152 template shipped with nilearn, which is not "
            "installed: pip install nilearn (the 'mri' extra: pip install 'unetseg[mri]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn is installed but {folder} lacks the MNI152 template files {missing}"
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the 1 mm template once per process (arrays are read-only, shared between calls)."""
    folder = template_folder()
    images = {key: nib.load(folder / name) for key, name in TEMPLATE_FILES.items()}
    arrays = {}
    for key, img in images.items():
        array = np.asarray(img.dataobj, dtype=np.uint8)
        array.flags.writeable = False
        arrays[key] = array
        if not np.allclose(img.affine, images["t1"].affine) or array.shape != arrays["t1"].shape:
            raise ValueError(f"{TEMPLATE_FILES[key]}: grid differs from the T1 template's")
    affine = images["t1"].affine.copy()
    affine.flags.writeable = False
    sform_code = int(images["t1"].header["sform_code"]) or 2
    return Template(arrays["t1"], arrays["gm"], arrays["wm"], affine, sform_code, folder)


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping ``factor``-cubed blocks (float64); trailing partial blocks are dropped."""
    if factor == 1:
        return array.astype(np.float64)
    n = [s // factor for s in array.shape]
    trimmed = array[: n[0] * factor, : n[1] * factor, : n[2] * factor].astype(np.float64)
    return trimmed.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))


def scaled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of the ``factor``-times block-averaged grid: voxel ``i`` is the centre of its block."""
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return affine @ scale


def shifted_affine(affine: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """The affine of a crop whose voxel ``(0, 0, 0)`` is voxel ``offset`` of ``affine``'s grid."""
    shift = np.eye(4)
    shift[:3, 3] = offset
    return affine @ shift


def find_ventricles(csf: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Mask of the lateral ventricles: the largest 6-connected CSF component touching no non-brain voxel.

    Raises ``RuntimeError`` when there is no enclosed CSF component or its centroid is off the midline.
    """
    components, count = ndimage.label(csf)
    outside = np.pad(~brain, 1, constant_values=True)
    touching = ndimage.binary_dilation(outside)[1:-1, 1:-1, 1:-1] & csf
    external = set(np.unique(components[touching]).tolist())
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    enclosed = [i for i in range(1, count + 1) if i not in external]
    if not enclosed:
        raise RuntimeError("no enclosed CSF component: cannot find the lateral ventricles")
    best = max(enclosed, key=lambda i: (sizes[i], -i))
    mask = components == best
    centroid = affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0]
    if abs(centroid[0]) > MAX_MIDLINE_MM:
        raise RuntimeError(
            f"largest enclosed CSF component ({sizes[best]} voxels) has its centroid at x = "
            f"{centroid[0]:.1f} mm, more than {MAX_MIDLINE_MM} mm off the midline: not the lateral ventricles"
        )
    return mask


def derive_volume(spacing: int = 2) -> Volume:
    """The whole template at ``spacing`` mm (integer): block-averaged T1 and derived labels (uncropped)."""
    if int(spacing) != spacing or spacing < 1:
        raise ValueError(f"spacing must be a positive integer number of mm (block averaging), got {spacing}")
    spacing = int(spacing)
    tpl = load_template()
    brain = block_mean(tpl.t1 > 0, spacing) >= 0.5
    p_gm = block_mean(tpl.gm, spacing) / 255.0
    p_wm = block_mean(tpl.wm, spacing) / 255.0
    p_csf = np.clip(1.0 - p_gm - p_wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([p_csf, p_gm, p_wm]), axis=0).astype(np.uint8) + CSF
    label = np.where(brain, tissue, BACKGROUND).astype(np.uint8)
    affine = scaled_affine(tpl.affine, spacing)
    label[find_ventricles(label == CSF, brain, affine)] = VENTRICLES
    image = block_mean(tpl.t1, spacing).astype(np.float32)
    return Volume(image, label, affine)


def brain_box(label: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of ``label > 0``, widened by ``margin`` voxels in-plane (X, Y) only, within the volume."""
    idx = np.argwhere(label > 0)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    pad = (margin, margin, 0)
    return tuple(
        slice(max(0, int(lo[a]) - pad[a]), min(label.shape[a], int(hi[a]) + pad[a])) for a in range(3)
    )  # type: ignore[return-value]


def interleaved_split(case_ids: Sequence[str], every: int = TEST_EVERY, offset: int = SPLIT_OFFSET) -> dict:
    """``{"train", "val", "test"}``: case ``i`` is test if ``i % every == offset``, val if it is the next."""
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, case_id in enumerate(case_ids):
        phase = (i - offset) % every
        key = "test" if phase == 0 else "val" if phase == 1 else "train"
        split[key].append(case_id)
    return split


def _prepare_root(root: Path, force: bool) -> None:
    """Create ``root``; an existing dataset there is an error unless ``force`` (then only its files go)."""
    ours = [root / "dataset.json", root / SPLIT_FILE, root / "imagesTr", root / "labelsTr"]
    if any(p.exists() for p in ours):
        if not force:
            raise FileExistsError(f"{root} already holds a dataset; pass --force (force=True) to rebuild it")
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)


def _save_nifti(array: np.ndarray, affine: np.ndarray, sform_code: int, path: Path) -> None:
    """Write ``array`` with ``affine`` as both qform and sform (mm units); gzip output is deterministic."""
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=sform_code)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_msd(
    root: Path,
    volume: Volume,
    box: tuple[slice, slice, slice],
    slab: int,
    description: str,
    force: bool = False,
    split: dict[str, list[str]] | None = None,
) -> Path:
    """Write the crop ``box`` of ``volume`` as MSD cases of ``slab`` axial slices, ``dataset.json`` and
    ``splits.json`` (``split``, default :func:`interleaved_split`). Returns ``root``."""
    if slab < 1:
        raise ValueError(f"slab must be >= 1 slice, got {slab}")
    root = Path(root)
    _prepare_root(root, force)
    image, label = volume.image[box], volume.label[box]
    crop_affine = shifted_affine(volume.affine, [s.start for s in box])
    sform_code = load_template().sform_code
    ids, training = [], []
    for n, z0 in enumerate(range(0, label.shape[2], slab)):
        case_id = f"{CASE_PREFIX}_{n:03d}"
        affine = shifted_affine(crop_affine, (0, 0, z0))
        _save_nifti(
            np.ascontiguousarray(image[:, :, z0 : z0 + slab]),
            affine,
            sform_code,
            root / "imagesTr" / f"{case_id}.nii.gz",
        )
        _save_nifti(
            np.ascontiguousarray(label[:, :, z0 : z0 + slab]),
            affine,
            sform_code,
            root / "labelsTr" / f"{case_id}.nii.gz",
        )
        ids.append(case_id)
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    dataset = {
        "name": "MNI152-2009-tissue",
        "description": description,
        "reference": REFERENCE,
        "licence": LICENCE,
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    split = interleaved_split(ids) if split is None else split
    (root / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")
    return root


def build_dataset(
    root: str | Path, spacing: int = 2, slab: int = 6, margin: int = 1, force: bool = False
) -> Path:
    """Write the full dataset (module docstring) to ``root``: the brain at ``spacing`` mm in axial slabs.

    >>> root = build_dataset("/tmp/real_mri")  # doctest: +SKIP
    """
    volume = derive_volume(spacing)
    box = brain_box(volume.label, margin)
    description = (
        f"MNI ICBM152 2009 nonlinear symmetric template (from the nilearn wheel) block-averaged to {spacing} "
        "mm, "
        f"cropped to the brain (+{margin} voxels in-plane), cut into axial slabs of {slab} slices; labels "
        "from the GM/WM probability maps (CSF = 1 - GM - WM), ventricles = largest enclosed CSF component"
    )
    return write_msd(Path(root), volume, box, slab, description, force)


def build_cutout(
    root: str | Path,
    size: tuple[int, int] = (32, 40),
    n_cases: int = 6,
    slices: int = 3,
    spacing: int = 3,
    force: bool = False,
) -> Path:
    """Write a small real-MRI MSD dataset for tests to ``root`` and return ``root``.

    ``n_cases`` cases of ``size[0] x size[1] x slices`` voxels (X, Y, Z) at ``spacing`` mm (integer), cut from
    the template (same labels and affines as :func:`build_dataset`): axial slabs stacked along Z, centred on
    the lateral ventricles in Y and Z; in X the window starts 2 voxels left of the brain so that background,
    cortex, white matter, CSF and the left ventricle are all in view. ``splits.json`` as for the full dataset
    (6 cases: train ``mni_000, 001, 004, 005``, val ``mni_003``, test ``mni_002``). Every class, the
    ventricles included, is in the training cases (checked: ``ValueError`` otherwise). Deterministic; about
    a second for the first call in a process (reading the template), then ~0.2 s.

    >>> root = build_cutout(tmp_path / "mri")  # doctest: +SKIP
    >>> spec = validate(detect_layout(root))  # doctest: +SKIP
    """
    nx, ny = (int(s) for s in size)
    if nx < 8 or ny < 8 or n_cases < 1 or slices < 1:
        raise ValueError(f"need size >= (8, 8), n_cases >= 1, slices >= 1; got {size}, {n_cases}, {slices}")
    volume = derive_volume(spacing)
    label = volume.label
    vent = np.argwhere(label == VENTRICLES)
    centre = np.round((vent.min(axis=0) + vent.max(axis=0)) / 2).astype(int)
    depth = n_cases * slices
    brain_x0 = int(np.argwhere(label > 0)[:, 0].min())
    starts = (brain_x0 - 2, centre[1] - ny // 2, centre[2] - depth // 2)
    lengths = (nx, ny, depth)
    box = []
    for axis, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        if length > label.shape[axis]:
            raise ValueError(f"cut-out of {lengths} voxels exceeds the {label.shape} volume at {spacing} mm")
        start = min(max(0, start), label.shape[axis] - length)
        box.append(slice(start, start + length))
    ids = [f"{CASE_PREFIX}_{n:03d}" for n in range(n_cases)]
    split = interleaved_split(ids)
    train_z = [
        z for i, cid in enumerate(ids) if cid in split["train"] for z in range(i * slices, (i + 1) * slices)
    ]
    present = np.unique(label[tuple(box)][:, :, train_z])
    if len(present) != len(CLASS_NAMES):
        raise ValueError(
            f"cut-out {size} x {n_cases} x {slices} at {spacing} mm: training cases lack classes "
            f"{sorted(set(CLASS_NAMES) - {CLASS_NAMES[i] for i in present})}; enlarge it"
        )
    description = (
        f"Cut-out ({nx} x {ny} x {slices} voxels per case, {n_cases} cases) around the lateral ventricles of "
        f"the MNI ICBM152 2009 nonlinear symmetric template (from the nilearn wheel) at {spacing} mm; "
        "test fixture"
    )
    return write_msd(Path(root), volume, tuple(box), slices, description, force, split)  # type: ignore[arg-type]


def dataset_stats(root: str | Path, split_file: str | Path | None = None) -> dict[str, Any]:
    """Class statistics of an MSD dataset with uint8 labels (the ones built here, or any other).

    Per class: share of the foreground (``label > 0``) voxels (for the background: of all voxels), share of
    all axial (last-axis) slices that contain it, and the number of slices containing it per split
    (``splits.json`` in ``root`` unless ``split_file``).
    """
    root = Path(root)
    data = json.loads((root / "dataset.json").read_text())
    names = [name for _, name in sorted((int(k), v) for k, v in data["labels"].items())]
    split_path = Path(split_file) if split_file else root / SPLIT_FILE
    split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    where = {cid: key for key, ids in split.items() for cid in ids}
    voxels = np.zeros(len(names), dtype=np.int64)
    slices = np.zeros(len(names), dtype=np.int64)
    per_split: dict[str, list[int]] = {key: [0] * len(names) for key in split}
    shapes, zooms, n_slices, cases = set(), set(), 0, {key: 0 for key in split}
    for entry in data["training"]:
        img = nib.load(root / entry["label"])
        label = np.asarray(img.dataobj)
        case_id = Path(entry["label"]).name.removesuffix(".nii.gz")
        shapes.add(tuple(int(s) for s in label.shape))
        zooms.add(tuple(round(float(z), 4) for z in img.header.get_zooms()[:3]))
        voxels += np.bincount(label.ravel().astype(np.int64), minlength=len(names))[: len(names)]
        n_slices += label.shape[-1]
        key = where.get(case_id)
        if key is not None:
            cases[key] += 1
        for c in range(len(names)):
            n = int((label == c).any(axis=tuple(range(label.ndim - 1))).sum())
            slices[c] += n
            if key is not None:
                per_split[key][c] += n
    foreground = int(voxels[1:].sum())
    return {
        "root": str(root),
        "cases": len(data["training"]),
        "cases_per_split": cases,
        "case_shapes": sorted(shapes),
        "spacing_mm": sorted(zooms),
        "axial_slices": n_slices,
        "voxels": int(voxels.sum()),
        "foreground_voxels": foreground,
        "classes": {
            name: {
                "voxels": int(voxels[c]),
                "fraction_of_foreground": float(voxels[c] / foreground) if c and foreground else None,
                "fraction_of_all_voxels": float(voxels[c] / voxels.sum()),
                "slice_fraction": float(slices[c] / n_slices),
                "slices_per_split": {key: counts[c] for key, counts in per_split.items()},
            }
            for c, name in enumerate(names)
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`dataset_stats`."""
    lines = [
        f"{stats['root']}: {stats['cases']} cases {stats['cases_per_split']}, shapes {stats['case_shapes']}, "
        f"spacing {stats['spacing_mm']} mm, {stats['axial_slices']} axial slices, "
        f"foreground {stats['foreground_voxels']} of {stats['voxels']} voxels",
        f"{'class':<14} {'% foreground':>12} {'% slices':>9}  slices per split",
    ]
    for name, c in stats["classes"].items():
        frac = c["fraction_of_foreground"]
        shown = f"{100 * frac:11.2f}%" if frac is not None else f"{'-':>12}"
        lines.append(f"{name:<14} {shown} {100 * c['slice_fraction']:8.1f}%  {c['slices_per_split']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``build DIR`` / ``cutout DIR`` / ``stats DIR``: write the dataset (or the cut-out), summarise it."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_mri", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the full dataset (MSD layout + splits.json)")
    build.add_argument("root", type=Path)
    build.add_argument("--spacing", type=int, default=2, help="mm, integer (block averaging); default 2")
    build.add_argument("--slab", type=int, default=6, help="axial slices per case; default 6")
    build.add_argument("--margin", type=int, default=1, help="background voxels around the brain in-plane")
    build.add_argument("--force", action="store_true", help="replace an existing dataset in ROOT")
    cut = sub.add_parser("cutout", help="write the small test cut-out")
    cut.add_argument("root", type=Path)
    cut.add_argument("--force", action="store_true")
    stats = sub.add_parser("stats", help="summarise an existing dataset")
    stats.add_argument("root", type=Path)
    for p in (build, cut, stats):
        p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build_dataset(args.root, args.spacing, args.slab, args.margin, args.force)
        elif args.command == "cutout":
            build_cutout(args.root, force=args.force)
    except (NilearnMissingError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = dataset_stats(args.root)
    print(json.dumps(result, indent=2) if args.json else format_stats(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
