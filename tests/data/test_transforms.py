"""Augmentation: albumentations pipelines (2D) and MONAI transforms (3D) written as YAML lists."""

from __future__ import annotations

import doctest
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml

from tests._datafiles import make_msd
from unetseg.data import SegmentationDataModule, transforms
from unetseg.data.transforms import (
    DEFAULT_AUGMENTATION_2D,
    DEFAULT_AUGMENTATION_3D,
    TRANSFORMS_3D,
    AlbumentationsTransform,
    Compose3D,
    as_transform,
    build_augmentation,
    build_augmentation_3d,
    build_transform,
)

YAML = """
augmentation:
  - HorizontalFlip: {p: 0.5}
  - Affine: {rotate: [-15, 15], scale: [0.9, 1.1], p: 0.5}
  - ElasticTransform: {alpha: 30, sigma: 5, p: 0.3}
  - RandomBrightnessContrast: {brightness_limit: 0.1, contrast_limit: 0.1, p: 0.5}
  - OneOf: {transforms: [{GaussNoise: {}}, {GaussianBlur: null}], p: 0.3}
"""


def _sample(channels: int = 5, size: tuple[int, int] = (32, 40), classes: int = 4, seed: int = 0):
    """A float image (C, H, W) and an int64 label with blocky classes 0..classes-1."""
    rng = np.random.default_rng(seed)
    label = np.zeros(size, np.int64)
    for cls in range(1, classes):
        y, x = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
        label[y : y + 8, x : x + 8] = cls
    image = (rng.normal(0, 1, (channels, *size)) + label[None]).astype(np.float32)
    return image, label


def test_yaml_pipeline_builds_albumentations_compose():
    aug = build_augmentation(yaml.safe_load(YAML)["augmentation"])
    assert isinstance(aug, A.Compose)
    names = [type(t).__name__ for t in aug.transforms]
    assert names == ["HorizontalFlip", "Affine", "ElasticTransform", "RandomBrightnessContrast", "OneOf"]
    assert [type(t).__name__ for t in aug.transforms[-1].transforms] == ["GaussNoise", "GaussianBlur"]
    assert build_augmentation(None) is None and build_augmentation([]) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"HorizontalFlipp": {"p": 0.5}}], r"unknown augmentation 'HorizontalFlipp'.*albumentations"),
        ([{"Affine": {"rotation": 15}}], r"augmentation Affine: unknown argument\(s\) \['rotation'\]"),
        ([{"Affine": {"mask_interpolation": 1}}], "mask_interpolation must be 0"),
        ([{"HorizontalFlip": {}, "VerticalFlip": {}}], "each augmentation must be"),
        ({"HorizontalFlip": {"p": 0.5}}, "must be a list"),
        ([{"Normalize": {"max_pixel_value": "x"}}], "augmentation Normalize: invalid arguments"),
        (
            [{"OneOf": {"transforms": [{"Nope": {}}]}}],
            r"unknown augmentation 'Nope' \(augmentation\[0\]\.OneOf\[0\]\)",
        ),
    ],
)
def test_bad_augmentation_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation(spec)


def test_augmentation_keeps_masks_integer_labels_and_multichannel_images():
    spec = [
        {"Affine": {"rotate": [-30, 30], "scale": [0.8, 1.2], "p": 1.0}},
        {"ElasticTransform": {"alpha": 40, "sigma": 4, "p": 1.0}},
        {"GridDistortion": {"p": 1.0}},
        {"RandomBrightnessContrast": {"p": 1.0}},
    ]
    transform = as_transform(build_augmentation(spec))
    rng = np.random.default_rng(0)
    changed = 0
    for seed in range(10):
        image, label = _sample(seed=seed)
        out_image, out_label = transform(image, label, rng)
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == np.int64
        assert set(np.unique(out_label).tolist()) <= {0, 1, 2, 3}  # nearest-neighbour: no blended labels
        changed += not np.array_equal(out_label, label)
    assert changed >= 8  # the geometric transforms did move the masks


def test_augmentation_with_p_zero_is_the_identity():
    spec = [
        {name: {**kwargs, "p": 0.0}} for entry in DEFAULT_AUGMENTATION_2D for name, kwargs in entry.items()
    ]
    spec.append({"ElasticTransform": {"p": 0.0}})
    transform = as_transform(build_augmentation(spec))
    image, label = _sample(channels=3)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)


def test_flip_moves_image_and_mask_together():
    transform = AlbumentationsTransform(build_augmentation([{"HorizontalFlip": {"p": 1.0}}]))
    image, label = _sample(channels=2)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert np.array_equal(out_image, image[:, :, ::-1]) and np.array_equal(out_label, label[:, ::-1])


def test_albumentations_results_follow_the_generator():
    transform = as_transform(build_augmentation([{"Affine": {"rotate": [-45, 45], "p": 1.0}}]))
    image, label = _sample()
    a = transform(image, label, np.random.default_rng(5))
    b = transform(image, label, np.random.default_rng(5))
    c = transform(image, label, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


# ------------------------------------------------------------------------------------------------------- 3D

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "datasets"
LABELS = {0, 2, 5}  # not consecutive: a label interpolated between two classes would show up as 1, 3 or 4
SPATIAL = {  # every spatial transform, strong enough to always move the cube (prob 1)
    "RandAffined": {"prob": 1.0, "rotate_range": [0.5, 0.5, 0.5], "scale_range": [0.2, 0.2, 0.2]},
    "Rand3DElasticd": {"prob": 1.0, "sigma_range": [4, 6], "magnitude_range": [40, 80]},
    "RandGridDistortiond": {"prob": 1.0, "distort_limit": [-0.3, 0.3]},
    "RandRotated": {"prob": 1.0, "range_x": 0.5, "range_y": 0.5, "range_z": 0.5},
    "RandZoomd": {"prob": 1.0, "min_zoom": 0.7, "max_zoom": 1.3},
    "RandFlipd": {"prob": 1.0},
    "RandAxisFlipd": {"prob": 1.0},
    "RandRotate90d": {"prob": 1.0},
}
INTENSITY = {  # every intensity / artefact transform (image only), prob 1
    "RandAdjustContrastd": {"prob": 1.0, "gamma": [0.5, 2.0]},
    "RandGaussianNoised": {"prob": 1.0, "std": 0.2},
    "RandRicianNoised": {"prob": 1.0, "std": 0.2},
    "RandGaussianSmoothd": {"prob": 1.0},
    "RandGaussianSharpend": {"prob": 1.0},
    "RandScaleIntensityd": {"prob": 1.0, "factors": 0.3},
    "RandShiftIntensityd": {"prob": 1.0, "offsets": 0.3},
    "RandStdShiftIntensityd": {"prob": 1.0, "factors": 0.5},
    "RandScaleIntensityFixedMeand": {"prob": 1.0, "factors": 0.3},
    "RandBiasFieldd": {"prob": 1.0, "coeff_range": [0.2, 0.3]},
    "RandHistogramShiftd": {"prob": 1.0},
    "RandSimulateLowResolutiond": {"prob": 1.0, "zoom_range": [0.3, 0.5]},
}


def _cube(shape=(2, 24, 24, 16), seed=0):
    """Bright off-centre cube (label 2, core 5) in a dark noisy volume (C, X, Y, Z); channel 1 = 10 + 2 x."""
    label = np.zeros(shape[1:], np.int64)
    label[4:14, 5:15, 3:11] = 2
    label[7:11, 8:12, 5:9] = 5
    noise = np.random.default_rng(seed).normal(0, 0.02, shape).astype(np.float32)
    bright = (label > 0).astype(np.float32)
    image = np.stack([bright, 10 + 2 * bright])[: shape[0]] + noise
    return image.astype(np.float32), label


def _with(spec: list[dict], **override) -> list[dict]:
    """``spec`` with ``override`` set in every entry's arguments."""
    return [{name: {**kwargs, **override}} for entry in spec for name, kwargs in entry.items()]


def test_every_registered_transform_is_tested():
    assert set(SPATIAL) | set(INTENSITY) == set(TRANSFORMS_3D) and not set(SPATIAL) & set(INTENSITY)


def _outputs(name: str, kwargs: dict):
    """``(image, label, out_image, out_label)`` of ``name`` on ``_cube()`` for three seeds; shapes checked."""
    transform = build_augmentation_3d([{name: kwargs}])
    image, label = _cube()
    for seed in range(3):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == np.int64 and np.isfinite(out_image).all()
        yield image, label, out_image, out_label


@pytest.mark.parametrize("name", list(SPATIAL))
def test_spatial_transforms_move_image_and_label_together(name):
    for image, label, out_image, out_label in _outputs(name, SPATIAL[name]):
        assert set(np.unique(out_label).tolist()) <= LABELS  # nearest neighbour: no interpolated classes
        assert not np.array_equal(out_label, label) and not np.allclose(out_image, image)
        inside, outside = out_image[0][out_label > 0], out_image[0][out_label == 0]
        assert inside.size > 0.5 * (label > 0).sum()
        assert inside.mean() > 0.8 and outside.mean() < 0.1  # the bright cube is where its label went
        assert np.mean(inside > 0.5) > 0.9


@pytest.mark.parametrize("name", list(INTENSITY))
def test_intensity_transforms_change_the_image_only(name):
    for image, label, out_image, out_label in _outputs(name, INTENSITY[name]):
        assert not np.allclose(out_image, image, atol=1e-3) and np.array_equal(out_label, label)


def test_spatial_transforms_interpolate_the_image_bilinear_and_the_label_nearest():
    for name, kwargs in SPATIAL.items():
        (transform,) = build_augmentation_3d([{name: kwargs}]).transforms
        if TRANSFORMS_3D[name][1] is not None:
            assert tuple(transform.mode) == TRANSFORMS_3D[name][1], name
            assert TRANSFORMS_3D[name][1][1].startswith("nearest"), name
    (zoom,) = build_augmentation_3d([{"RandZoomd": {"mode": "area"}}]).transforms
    assert tuple(zoom.mode) == ("area", "nearest-exact")  # ``mode`` in the YAML is the image's


def test_flip_matches_numpy_flip_exactly():
    image, label = _cube()
    out_image, out_label = build_augmentation_3d([{"RandFlipd": {"prob": 1.0, "spatial_axis": [0, 2]}}])(
        image, label, np.random.default_rng(0)
    )
    assert np.array_equal(out_image, image[:, ::-1, :, ::-1])
    assert np.array_equal(out_label, label[::-1, :, ::-1])


def test_prob_zero_is_the_identity_and_inputs_are_never_modified():
    image, label = _cube()
    spec = [{name: kwargs} for name, kwargs in {**SPATIAL, **INTENSITY}.items()]
    same = build_augmentation_3d(_with(spec, prob=0.0))(image, label, np.random.default_rng(0))
    assert np.array_equal(same[0], image) and np.array_equal(same[1], label)
    image_copy, label_copy = image.copy(), label.copy()
    image.flags.writeable = label.flags.writeable = False  # like the memory-mapped disk cache
    out_image, out_label = build_augmentation_3d(spec)(image, label, np.random.default_rng(0))
    assert np.array_equal(image, image_copy) and np.array_equal(label, label_copy)
    assert out_image.shape == image.shape and set(np.unique(out_label).tolist()) <= LABELS


def test_default_pipeline_follows_the_generator_and_works_without_label():
    aug = build_augmentation_3d(DEFAULT_AUGMENTATION_3D)
    assert isinstance(aug, Compose3D) and aug.names == [next(iter(e)) for e in DEFAULT_AUGMENTATION_3D]
    always = build_augmentation_3d(_with(DEFAULT_AUGMENTATION_3D, prob=1.0))
    image, label = _cube()
    for transform in (aug, always):
        a = transform(image, label, np.random.default_rng(5))
        b = transform(image, label, np.random.default_rng(5))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        others = [transform(image, label, np.random.default_rng(s))[0] for s in range(6, 10)]
        assert not any(np.array_equal(a[0], other) for other in others)
    out_image, out_label = always(image, None, np.random.default_rng(0))
    assert out_label is None and out_image.shape == image.shape and not np.allclose(out_image, image)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"Affine": {}}], r"unknown 3D augmentation 'Affine' \(augm.*\); expected one of \[.*'RandAffined'"),
        (
            [{"RandFlipd": {}}, {"RandAffined": {"rotation": 0.5}}],
            r"RandAffined: unknown argument\(s\) \['rotation'\]; RandAffined takes \[.*'rotate_range'",
        ),
        ([{"RandAffined": {"keys": ["image"]}}], r"RandAffined \(augmentation\[0\]\): \['keys'\] are set by"),
        ([{"RandAffined": {"mode": ["bilinear", "bilinear"]}}], "mode is the image's interpolation"),
        ([{"Rand3DElasticd": {"prob": 0.1}}], r"Rand3DElasticd \(augm.*\): invalid arg.*sigma_range"),
        ([{"RandGaussianNoised": {"prob": "often"}}], r"RandGaussianNoised \(augm.*\): invalid arg"),
        ([{"RandFlipd": {}, "RandAxisFlipd": {}}], "each augmentation must be"),
        ({"RandFlipd": {"prob": 0.5}}, "must be a list"),
    ],
)
def test_bad_3d_augmentation_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation_3d(spec)


def test_shape_changes_and_2d_inputs_are_errors_naming_the_transform():
    image, label = _cube()  # 24 x 24 x 16: a 90-degree turn in the (0, 2) plane changes the shape
    turn = build_augmentation_3d([{"RandRotate90d": {"prob": 1.0, "max_k": 1, "spatial_axes": [0, 2]}}])
    with pytest.raises(ValueError, match=r"augmentation RandRotate90d changed the patch shape"):
        turn(image, label, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"3D augmentation expects an image \(C, X, Y, Z\)"):
        turn(image[:, :, :, 0], label[:, :, 0], np.random.default_rng(0))


@pytest.mark.parametrize("config", ["heart3d.yaml", "hippocampus3d.yaml"])
def test_3d_dataset_configs_use_the_default_list(config):
    augmentation = yaml.safe_load((CONFIGS / config).read_text())["data"]["augmentation"]
    assert augmentation == DEFAULT_AUGMENTATION_3D
    assert isinstance(build_transform(augmentation, 3), Compose3D)


def test_3d_patches_with_augmentation_through_a_dataloader_with_two_workers(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=4, shape=(20, 20, 12))

    def batches(seed: int, augmentation: list | None = DEFAULT_AUGMENTATION_3D) -> list[dict]:
        dm = SegmentationDataModule(
            root=str(root), spatial_dims=3, patch_size=(12, 12, 8), batch_size=2, samples_per_case=4,
            num_workers=2, num_folds=2, seed=seed, augmentation=augmentation,
        )
        dm.setup("fit")
        return list(dm.train_dataloader())

    first = batches(0)
    assert len(first) >= 4  # both workers delivered
    for batch in first:
        assert batch["image"].shape == (2, 1, 12, 12, 8) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (2, 12, 12, 8) and set(batch["label"].unique().tolist()) <= {0, 1, 2}
        assert torch.isfinite(batch["image"]).all()
    again, other, plain = batches(0), batches(1), batches(0, augmentation=None)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) for a, b in zip(
        first, again, strict=True))
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0]["image"][0], plain[0]["image"][0])  # same window, augmented


def test_docstring_examples():
    result = doctest.testmod(transforms)
    assert result.failed == 0 and result.attempted > 0


def test_build_transform_picks_the_dimension():
    assert isinstance(build_transform(DEFAULT_AUGMENTATION_2D, 2), AlbumentationsTransform)
    assert isinstance(build_transform(DEFAULT_AUGMENTATION_3D, 3), Compose3D)
    assert build_transform(None, 3) is None
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_transform(None, 4)
