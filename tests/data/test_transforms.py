"""Augmentation: albumentations pipelines from YAML (2D) and the own 3D transforms."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import yaml

from unetseg.data.transforms import (
    DEFAULT_AUGMENTATION_2D,
    DEFAULT_AUGMENTATION_3D,
    AlbumentationsTransform,
    Compose3D,
    RandomFlip,
    RandomIntensity,
    RandomRot90,
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


def _volume(shape=(1, 6, 8, 10)):
    """Image whose voxels encode their label (image = 10 * label + channel) and its int64 label."""
    label = np.random.default_rng(0).integers(0, 4, shape[1:]).astype(np.int64)
    image = (10.0 * label[None] + np.arange(shape[0]).reshape(-1, 1, 1, 1)).astype(np.float32)
    return image, label


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_random_flip_flips_the_chosen_axis(axis):
    image, label = _volume()
    out_image, out_label = RandomFlip(axes=[axis], p=1.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(out_image, np.flip(image, axis + 1)) and np.array_equal(
        out_label, np.flip(label, axis)
    )


def test_rot90_keeps_shape_labels_and_image_label_alignment():
    image, label = _volume(shape=(2, 6, 8, 8))
    rotated = 0
    for seed in range(30):
        out_image, out_label = RandomRot90(p=1.0)(image, label, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert out_label.dtype == np.int64
        assert np.array_equal(np.sort(out_label, axis=None), np.sort(label, axis=None))  # a permutation
        assert np.array_equal(out_image[0], 10.0 * out_label) and np.array_equal(
            out_image[1], 10.0 * out_label + 1
        )
        rotated += not np.array_equal(out_label, label)
    assert rotated >= 25


def test_intensity_jitter_is_affine_per_channel_and_leaves_label():
    image, label = _volume(shape=(2, 4, 4, 4))
    image = image + np.random.default_rng(1).normal(0, 1, image.shape).astype(np.float32)
    out_image, out_label = RandomIntensity(scale=(0.5, 1.5), shift=(-1, 1), p=1.0)(
        image, label, np.random.default_rng(0)
    )
    assert out_label is label
    for c in range(2):
        slope, intercept = np.polyfit(image[c].ravel(), out_image[c].ravel(), 1)
        assert 0.5 <= slope <= 1.5 and -1 <= intercept <= 1
        assert np.allclose(out_image[c], slope * image[c] + intercept, atol=1e-4)
        assert not np.allclose(out_image[c], image[c])


def test_3d_pipeline_from_yaml_names_and_errors():
    aug = build_augmentation_3d(DEFAULT_AUGMENTATION_3D)
    assert isinstance(aug, Compose3D)
    assert [type(t).__name__ for t in aug.transforms] == ["RandomFlip", "RandomRot90", "RandomIntensity"]
    image, label = _volume(shape=(1, 8, 8, 8))
    out_image, out_label = aug(image, label, np.random.default_rng(0))
    assert out_label.dtype == np.int64 and set(np.unique(out_label)) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"unknown 3D augmentation 'Affine'.*RandomFlip"):
        build_augmentation_3d([{"Affine": {}}])
    with pytest.raises(ValueError, match=r"RandomFlip: unknown argument\(s\) \['axis'\]"):
        build_augmentation_3d([{"RandomFlip": {"axis": 0}}])
    no_op = build_augmentation_3d(
        [{"RandomFlip": {"p": 0}}, {"RandomRot90": {"p": 0}}, {"RandomIntensity": {"p": 0}}]
    )
    same = no_op(image, label, np.random.default_rng(0))
    assert np.array_equal(same[0], image) and np.array_equal(same[1], label)


def test_build_transform_picks_the_dimension():
    assert isinstance(build_transform(DEFAULT_AUGMENTATION_2D, 2), AlbumentationsTransform)
    assert isinstance(build_transform(DEFAULT_AUGMENTATION_3D, 3), Compose3D)
    assert build_transform(None, 3) is None
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_transform(None, 4)
