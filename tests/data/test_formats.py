"""Layout detection (MSD, nnU-Net v2 raw, 2D folders), file reading and validation of bad inputs."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests._datafiles import (
    SHAPE,
    affine,
    make_folder2d,
    make_msd,
    make_nnunet,
    volume_label,
    write_nifti,
    write_raster,
)
from unetseg.data.cases import CaseLoader
from unetseg.data.formats import detect_layout, read_image, read_label, validate
from unetseg.data.formats import io as formats_io

# ----------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("builder", "kwargs", "layout", "classes", "channels", "dims", "n_train", "n_val", "n_test", "mode"),
    [
        (make_msd, {}, "msd", ["background", "a", "b"], 1, 3, 4, 0, 1, "index"),
        (
            make_msd,
            {"modalities": ("FLAIR", "T1w"), "n_test": 0},
            "msd",
            ["background", "a", "b"],
            2,
            3,
            4,
            0,
            0,
            "index",
        ),
        (make_nnunet, {}, "nnunet", ["background", "a", "b"], 2, 3, 4, 0, 1, "index"),
        (
            make_nnunet,
            {"channels": ("CT",), "labels": ("background", "liver"), "n_test": 2},
            "nnunet",
            ["background", "liver"],
            1,
            3,
            4,
            0,
            2,
            "index",
        ),
        (make_folder2d, {}, "folder2d", ["background", "foreground"], 3, 2, 4, 0, 0, "binary255"),
        (
            make_folder2d,
            {"image_ext": ".tif", "mask_ext": ".tif", "rgb": False, "mask_scale": 1, "n_classes": 4},
            "folder2d",
            ["background", "class_1", "class_2", "class_3"],
            1,
            2,
            4,
            0,
            0,
            "index",
        ),
        (
            make_folder2d,
            {"image_ext": ".jpg", "mask_ext": ".jpg"},
            "folder2d",
            ["background", "foreground"],
            3,
            2,
            4,
            0,
            0,
            "threshold",
        ),
        (
            make_folder2d,
            {"subsets": ("train", "val", "test"), "n": 3, "mask_suffix": "_segmentation"},
            "folder2d",
            ["background", "foreground"],
            3,
            2,
            3,
            3,
            3,
            "binary255",
        ),
    ],
    ids=["msd-3d", "msd-4d", "nnunet-2ch", "nnunet-ct", "png-0-255", "tiff-index", "jpg-masks", "subsets"],
)
def test_detect_layout(
    tmp_path, builder, kwargs, layout, classes, channels, dims, n_train, n_val, n_test, mode
):
    spec = validate(detect_layout(builder(tmp_path / "ds", **kwargs)))
    assert spec.layout == layout
    assert spec.class_names == classes
    assert spec.num_classes == len(classes)
    assert spec.in_channels == channels == len(spec.channel_names) == len(spec.default_normalization)
    assert spec.spatial_dims == dims
    assert (len(spec.cases_train), len(spec.cases_val), len(spec.cases_test)) == (n_train, n_val, n_test)
    assert spec.label_mode == mode
    ids = [c.case_id for c in spec.all_cases]
    assert len(ids) == len(set(ids))


def test_msd_4d_channels_map_to_input_channels_in_order(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "ds", modalities=("FLAIR", "T1w", "T2w")))
    image, header = read_image(spec.cases_train[0], spec)
    assert image.shape == (3, *SHAPE) and image.dtype == np.float32
    background = volume_label() == 0
    # make_msd writes channel c with intensity base 100 * (c + 1) on the background
    assert np.allclose([image[c][background].mean() for c in range(3)], [100, 200, 300], atol=1)
    assert np.allclose(header.affine, affine())


def test_nnunet_channel_files_are_stacked_in_channel_order(tmp_path):
    spec = detect_layout(make_nnunet(tmp_path / "ds", channels=("T2", "ADC")))
    case = spec.cases_train[1]
    assert [p.name for p in case.images] == ["pt001_0000.nii.gz", "pt001_0001.nii.gz"]
    image, _ = read_image(case, spec)
    assert image.shape == (2, *SHAPE)
    assert image[0].mean() < image[1].mean()  # channel 1 has twice the base intensity
    label = read_label(case, spec)
    assert label.dtype == np.int64 and np.array_equal(label, volume_label())
    assert spec.cases_test[0].label is not None and spec.cases_test[0].label.name == "pt004.nii.gz"


def test_msd_without_labels_ts_gives_unlabelled_test_cases_and_test_labels_when_present(tmp_path):
    spec = detect_layout(make_msd(tmp_path / "a", n_test=2))
    assert [c.label for c in spec.cases_test] == [None, None]
    spec = detect_layout(make_msd(tmp_path / "b", n_test=2, labels_ts=True))
    assert all(c.label is not None and c.label.is_file() for c in spec.cases_test)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {0, 1}),  # 0/255 PNG masks
        ({"image_ext": ".jpg", "mask_ext": ".jpg"}, {0, 1}),  # lossy JPEG masks, thresholded
        ({"mask_scale": 1, "n_classes": 3}, {0, 1, 2}),  # label indices
    ],
    ids=["binary255", "jpeg", "index"],
)
def test_folder2d_masks_become_class_indices(tmp_path, kwargs, expected):
    spec = detect_layout(make_folder2d(tmp_path / "ds", **kwargs))
    labels = [read_label(c, spec) for c in spec.cases_train]
    assert all(lbl.dtype == np.int64 for lbl in labels)
    assert set(np.unique(np.concatenate([lbl.ravel() for lbl in labels])).tolist()) == expected
    image, _ = read_image(spec.cases_train[0], spec)
    assert image.shape == (3, 20, 24)


def test_folder2d_rgb_stored_grey_masks_and_declared_labels(tmp_path):
    root = make_folder2d(tmp_path / "ds", n=2)
    for mask in (root / "masks").iterdir():  # grey stored as RGB, as in Kvasir-SEG
        grey = np.asarray(Image.open(mask))
        write_raster(mask, np.stack([grey] * 3, axis=-1))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "polyp"}}))
    spec = validate(detect_layout(root))
    assert spec.class_names == ["background", "polyp"] and spec.label_mode == "binary255"
    assert set(np.unique(read_label(spec.cases_train[0], spec)).tolist()) == {0, 1}


def test_detection_reads_no_voxel_data(tmp_path, monkeypatch):
    roots = [make_msd(tmp_path / "msd"), make_nnunet(tmp_path / "nnunet")]

    def forbidden(*args, **kwargs):
        raise AssertionError("voxel data read during detection")

    monkeypatch.setattr(formats_io, "read_array", forbidden)
    for root in roots:
        spec = validate(detect_layout(root), check_data=False)
        assert len(spec.cases_train) == 4


# ----------------------------------------------------------------------------------------------- bad input


def _truncate(path: Path) -> None:
    """Keep the first half of a gzip file's bytes (the header survives, the data do not)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_json(root: Path, **changes) -> None:
    """Edit ``dataset.json`` keys (``None`` deletes)."""
    data = json.loads((root / "dataset.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (root / "dataset.json").write_text(json.dumps(data))


def _bad_msd_label(root: Path, value: float, dtype=np.float32) -> Path:
    """Overwrite case_001's label with one voxel set to ``value``."""
    label = volume_label().astype(dtype)
    label[0, 0, 0] = value
    return write_nifti(root / "labelsTr" / "case_001.nii.gz", label)


BAD_INPUTS = {
    # name: (builder, mutate(root), exception, substrings that the message must contain (formatted with root))
    "missing-root": (None, None, FileNotFoundError, ["does not exist", "{root}"]),
    "empty-root": ("empty", None, ValueError, ["empty", "{root}"]),
    "no-dataset-json": (
        make_msd,
        lambda r: (r / "dataset.json").unlink(),
        FileNotFoundError,
        ["dataset.json", "{root}/dataset.json"],
    ),
    "unparsable-json": (
        make_msd,
        lambda r: (r / "dataset.json").write_text('{"labels": {"0": "bg",}'),
        ValueError,
        ["{root}/dataset.json", "not valid JSON", "line 1"],
    ),
    "unknown-flavour": (
        make_msd,
        lambda r: (r / "dataset.json").write_text('{"foo": 1}'),
        ValueError,
        ["channel_names", "training", "foo"],
    ),
    "msd-missing-labels": (
        make_msd,
        lambda r: _rewrite_json(r, labels=None),
        ValueError,
        ["'labels'", "Medical Segmentation Decathlon", "{root}/dataset.json"],
    ),
    "msd-missing-modality": (
        make_msd,
        lambda r: _rewrite_json(r, modality=None),
        ValueError,
        ["'modality'", "MSD"],
    ),
    "nnunet-missing-file-ending": (
        make_nnunet,
        lambda r: _rewrite_json(r, file_ending=None),
        ValueError,
        ["'file_ending'", "nnU-Net v2"],
    ),
    "nnunet-region-labels": (
        make_nnunet,
        lambda r: _rewrite_json(r, labels={"background": 0, "a": [1, 2]}),
        ValueError,
        ["region-based", "'a'"],
    ),
    "msd-label-gaps": (
        make_msd,
        lambda r: _rewrite_json(r, labels={"0": "bg", "2": "b"}),
        ValueError,
        ["'labels'", "without gaps", "[0, 2]"],
    ),
    "image-without-label": (
        make_msd,
        lambda r: (r / "labelsTr" / "case_002.nii.gz").unlink(),
        FileNotFoundError,
        ["{root}/imagesTr/case_002.nii.gz", "has no label", "{root}/labelsTr/case_002.nii.gz"],
    ),
    "label-without-image": (
        make_nnunet,
        lambda r: write_nifti(r / "labelsTr" / "pt777.nii.gz", volume_label()),
        FileNotFoundError,
        ["{root}/labelsTr/pt777.nii.gz", "has no image", "{root}/imagesTr/pt777_0000.nii.gz"],
    ),
    "missing-channel-file": (
        make_nnunet,
        lambda r: (r / "imagesTr" / "pt001_0001.nii.gz").unlink(),
        FileNotFoundError,
        ["{root}/imagesTr/pt001_0001.nii.gz"],
    ),
    "png-image-without-mask": (
        make_folder2d,
        lambda r: (r / "masks" / "img002.png").unlink(),
        FileNotFoundError,
        ["{root}/images/img002.png", "has no mask", "{root}/masks"],
    ),
    "png-mask-without-image": (
        make_folder2d,
        lambda r: (r / "images" / "img001.png").unlink(),
        FileNotFoundError,
        ["{root}/masks/img001.png", "has no image"],
    ),
    "shape-mismatch": (
        make_msd,
        lambda r: write_nifti(r / "labelsTr" / "case_003.nii.gz", volume_label((16, 12, 9))),
        ValueError,
        [
            "{root}/imagesTr/case_003.nii.gz",
            "{root}/labelsTr/case_003.nii.gz",
            "(16, 12, 10)",
            "(16, 12, 9)",
            "disagree",
        ],
    ),
    "affine-mismatch": (
        make_msd,
        lambda r: write_nifti(
            r / "labelsTr" / "case_000.nii.gz", volume_label(), affine(spacing=(1.0, 1.0, 3.0))
        ),
        ValueError,
        ["{root}/imagesTr/case_000.nii.gz", "{root}/labelsTr/case_000.nii.gz", "affine", "disagree"],
    ),
    "channel-count": (
        make_msd,
        lambda r: _rewrite_json(r, modality={"0": "T1", "1": "T2"}),
        ValueError,
        ["{root}/imagesTr/case_000.nii.gz", "1 channel", "expected 2"],
    ),
    "label-value-outside": (
        make_msd,
        lambda r: _bad_msd_label(r, 5, np.uint8),
        ValueError,
        ["{root}/labelsTr/case_001.nii.gz", "[5]", "outside the declared labels"],
    ),
    "non-integer-label": (
        make_msd,
        lambda r: _bad_msd_label(r, 0.5),
        ValueError,
        ["{root}/labelsTr/case_001.nii.gz", "not integer-valued", "0.5"],
    ),
    "truncated-nifti": (
        make_msd,
        lambda r: _truncate(r / "imagesTr" / "case_002.nii.gz"),
        ValueError,
        ["cannot read", "{root}/imagesTr/case_002.nii.gz"],
    ),
    "garbage-nifti": (
        make_nnunet,
        lambda r: (r / "labelsTr" / "pt002.nii.gz").write_bytes(b"not a nifti"),
        ValueError,
        ["cannot read", "{root}/labelsTr/pt002.nii.gz"],
    ),
    "truncated-png": (
        make_folder2d,
        lambda r: _truncate(r / "images" / "img003.png"),
        ValueError,
        ["cannot read", "{root}/images/img003.png"],
    ),
    "mask-values-outside-0-255": (
        make_folder2d,
        lambda r: write_raster(r / "masks" / "img001.png", np.full((20, 24), 7, np.uint8)),
        ValueError,
        ["{root}/masks/img001.png", "[7]", "{root}/masks/img000.png", "0/255"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_file(tmp_path, name):
    builder, mutate, exc, parts = BAD_INPUTS[name]
    root = tmp_path / "ds"
    if builder == "empty":
        root.mkdir()
    elif builder is not None:
        builder(root)
    if mutate is not None:
        mutate(root)
    with pytest.raises(exc) as info:
        validate(detect_layout(root), check_data=True)
    message = str(info.value)
    for part in parts:
        assert part.format(root=root) in message, message


def test_multiple_problems_are_all_listed(tmp_path):
    root = make_msd(tmp_path / "ds")
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    _bad_msd_label(root, 9, np.uint8)
    with pytest.raises(ValueError) as info:
        validate(detect_layout(root))
    message = str(info.value)
    assert "2 problems" in message and "case_000.nii.gz" in message and "case_001.nii.gz" in message
    assert "skip_bad_cases" in message


def test_skip_bad_cases_logs_every_skipped_case(tmp_path, caplog):
    root = make_msd(tmp_path / "ds", n_cases=5)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    _bad_msd_label(root, 0.5)
    with caplog.at_level(logging.WARNING):
        spec = validate(detect_layout(root), skip_bad_cases=True)
    assert [c.case_id for c in spec.cases_train] == ["case_002", "case_003", "case_004"]
    log = caplog.text
    assert "case_000" in log and str(root / "labelsTr" / "case_000.nii.gz") in log
    assert "case_001" in log and "not integer-valued" in log


def test_skip_bad_cases_with_no_case_left_raises(tmp_path):
    root = make_msd(tmp_path / "ds", n_cases=1, n_test=0)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(ValueError, match="no valid training cases"):
        validate(detect_layout(root), skip_bad_cases=True)


def test_without_check_data_bad_values_surface_when_loading_naming_the_file(tmp_path):
    root = make_msd(tmp_path / "ds")
    label_path = _bad_msd_label(root, 4, np.uint8)
    spec = validate(detect_layout(root), check_data=False)  # headers are fine
    case = next(c for c in spec.cases_train if c.case_id == "case_001")
    with pytest.raises(ValueError, match="outside the declared labels") as info:
        CaseLoader(spec).load(case)
    assert str(label_path) in str(info.value)


def test_unsupported_nnunet_file_ending(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    _rewrite_json(root, file_ending=".mha")
    with pytest.raises(ValueError, match=r"file_ending '\.mha' is not supported"):
        detect_layout(root)


def test_nnunet_bad_file_name(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    shutil.copy(root / "imagesTr" / "pt000_0000.nii.gz", root / "imagesTr" / "oops.nii.gz")
    with pytest.raises(ValueError, match="CASE_XXXX") as info:
        detect_layout(root)
    assert str(root / "imagesTr" / "oops.nii.gz") in str(info.value)


def test_truncated_gzip_is_really_truncated(tmp_path):
    """Guard for the truncated-nifti case: the header must stay readable, only the data break."""
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros(SHAPE, np.float32) + np.arange(SHAPE[2]))
    _truncate(path)
    with pytest.raises(EOFError), gzip.open(path) as f:
        f.read()
    assert formats_io.read_header(path).shape == SHAPE


def test_nnunet_v1_msd_style_json_with_channel_files(tmp_path):
    root = make_msd(tmp_path / "v1", modalities=("T2", "ADC"), n_test=0)
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):  # split each 4D image into _0000, _0001 files
        data = np.asarray(nib.load(str(path)).dataobj)
        stem = path.name[: -len(".nii.gz")]
        for c in range(2):
            write_nifti(path.with_name(f"{stem}_{c:04d}.nii.gz"), data[..., c])
        path.unlink()
    spec = validate(detect_layout(root))
    assert spec.layout == "msd" and [p.name for p in spec.cases_train[0].images] == [
        "case_000_0000.nii.gz",
        "case_000_0001.nii.gz",
    ]
    image, _ = read_image(spec.cases_train[0], spec)
    assert image.shape == (2, *SHAPE) and image[0].mean() < image[1].mean()


def test_nnunet_2d_png_dataset_with_rgb_channel_file(tmp_path):
    root = tmp_path / "nn2d"
    for i in range(3):
        label = (np.arange(20)[:, None] + np.zeros((1, 24), int) + i) % 3
        write_raster(root / "imagesTr" / f"road{i}_0000.png", np.stack([label * 80] * 3, -1).astype(np.uint8))
        write_raster(root / "labelsTr" / f"road{i}.png", label.astype(np.uint8))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "R", "1": "G", "2": "B"},
                "labels": {"background": 0, "road": 1, "car": 2},
                "file_ending": ".png",
            }
        )
    )
    spec = validate(detect_layout(root))
    assert (spec.layout, spec.spatial_dims, spec.in_channels, spec.num_classes) == ("nnunet", 2, 3, 3)
    image, _ = read_image(spec.cases_train[1], spec)
    label = read_label(spec.cases_train[1], spec)
    assert image.shape == (3, 20, 24) and label.shape == (20, 24)
    assert np.array_equal(image[0], 80.0 * label)
