"""Largest-component postprocessing: decided on out-of-fold predictions, saved as JSON, applied by predict."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from unetseg.inference.checkpoint import CheckpointModel
from unetseg.inference.postprocess import (
    Postprocessing,
    apply_postprocessing,
    decide_postprocessing,
    largest_component,
    largest_foreground_component,
)
from unetseg.inference.predict import main as predict_main

NAMES = ["background", "a", "b"]


def _components(binary: np.ndarray) -> list[set[tuple[int, ...]]]:
    """Connected components by flood fill over all 3**ndim - 1 neighbours, in C order of their first voxel
    (an independent reference for scipy's labelling)."""
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=binary.ndim) if any(o)]
    seen: set[tuple[int, ...]] = set()
    components = []
    for start in zip(*np.nonzero(binary), strict=True):
        start = tuple(int(i) for i in start)
        if start in seen:
            continue
        seen.add(start)
        component, stack = {start}, [start]
        while stack:
            point = stack.pop()
            for offset in offsets:
                q = tuple(p + o for p, o in zip(point, offset, strict=True))
                inside = all(0 <= c < s for c, s in zip(q, binary.shape, strict=True))
                if inside and binary[q] and q not in seen:
                    seen.add(q)
                    component.add(q)
                    stack.append(q)
        components.append(component)
    return components


def _reference_largest(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``mask`` with ``region`` outside its largest flood-fill component (first one on ties) set to 0."""
    components = _components(region)
    out = mask.copy()
    if components:
        largest = max(components, key=len)  # max keeps the first of equal sizes
        for component in components:
            if component is not largest:
                out[tuple(np.array(sorted(component)).T)] = 0
    return out


@pytest.mark.parametrize("shape", [(30, 34), (9, 10, 11)], ids=["2d", "3d"])
def test_largest_component_matches_a_flood_fill_reference(shape):
    rng = np.random.default_rng(0)
    mask = rng.choice(3, size=shape, p=[0.6, 0.25, 0.15]).astype(np.uint8)
    expected = mask
    for k in (1, 2):
        assert len(_components(mask == k)) > 1  # there is something to remove
        expected = _reference_largest(expected, expected == k)
    kept = largest_component(mask, [1, 2])
    np.testing.assert_array_equal(kept, expected)
    assert kept.dtype == mask.dtype and not np.array_equal(kept, mask)
    np.testing.assert_array_equal(largest_foreground_component(mask), _reference_largest(mask, mask > 0))
    assert all(len(_components(kept == k)) == 1 for k in (1, 2))


@pytest.mark.parametrize("ndim", [2, 3])
def test_full_connectivity_joins_corners_and_a_gap_separates(ndim):
    mask = np.zeros((8,) * ndim, np.uint8)
    mask[(slice(1, 4),) * ndim] = 1  # a block of 3**ndim voxels
    mask[(4,) * ndim] = 1  # touches the block's corner only: the same component (8/26 neighbours)
    np.testing.assert_array_equal(largest_component(mask, [1]), mask)
    mask[(4,) * ndim] = 0
    mask[(6,) * ndim] = 1  # one voxel of gap: a component of its own, removed
    expected = mask.copy()
    expected[(6,) * ndim] = 0
    np.testing.assert_array_equal(largest_component(mask, [1]), expected)
    np.testing.assert_array_equal(largest_foreground_component(mask), expected)


def test_leading_axes_are_independent_images():
    batch = np.zeros((2, 10, 10), np.uint8)
    batch[0, 1:5, 1:5], batch[0, 8, 8] = 1, 1  # image 0: a block and a stray voxel
    batch[1, 8, 8] = 1  # image 1: only that voxel, its own largest component
    kept = largest_component(batch, [1], spatial_dims=2)
    np.testing.assert_array_equal(kept, np.stack([largest_component(b, [1]) for b in batch]))
    assert kept[0, 8, 8] == 0 and kept[1, 8, 8] == 1
    assert largest_component(batch, [1])[1, 8, 8] == 0  # as one volume the voxel is a small component
    with pytest.raises(ValueError, match=r"spatial_dims=4 for a mask of shape \(2, 10, 10\): use 1 to 3"):
        largest_component(batch, [1], spatial_dims=4)
    with pytest.raises(ValueError, match=r"class 0: .* indices >= 1"):
        largest_component(batch, [0])


SEPARATE = ((2, 8, 2, 8, 1), (2, 7, 20, 25, 2))  # a 6x6 square of a, a 5x5 square of b far from it
TOUCHING = ((4, 12, 4, 10, 1), (4, 12, 10, 14, 2))  # one structure: a (8x6) left of b (8x4), touching


def _pair(boxes: tuple[tuple[int, int, int, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, label)``: a 32x32 label of ``(row0, row1, col0, col1, class)`` boxes, and its copy."""
    label = np.zeros((32, 32), np.uint8)
    for r0, r1, c0, c1, k in boxes:
        label[r0:r1, c0:c1] = k
    return label.copy(), label


def test_spurious_blob_far_away_is_removed_for_its_class_only():
    prediction, label = _pair(SEPARATE)
    prediction[26:29, 26:29] = 1  # 9 false positive voxels of a, far from the true square
    pp = decide_postprocessing([(prediction, label)], NAMES)
    # the union's largest component is a's square: b would vanish, so the foreground step is rejected
    assert not pp.foreground_lcc and pp.classes == [1]
    assert pp.dice_before == pytest.approx({"a": 72 / 81, "b": 1.0})
    assert pp.dice_after == {"a": 1.0, "b": 1.0}
    np.testing.assert_array_equal(apply_postprocessing(prediction, pp), label)
    assert str(pp) == "largest component of a (1)"
    too_small = decide_postprocessing([(prediction, label)], NAMES, min_gain=0.2)  # gain 1 - 72/81 = 0.11
    assert too_small.classes == [] and too_small.dice_after == too_small.dice_before


def test_a_class_with_two_true_components_keeps_them():
    def pairs():  # a generator: read once
        prediction, label = _pair(SEPARATE)
        label[12:14, 20:23] = prediction[12:14, 20:23] = 2  # b's second true component (6 voxels), found
        yield prediction, label
        prediction, label = _pair(SEPARATE)
        prediction[20:22, 28:30] = 2  # 4 false positive voxels of b
        yield prediction, label

    pp = decide_postprocessing(pairs(), NAMES)
    # b over both cases: TP 25 + 6 + 25, FP 4 -> 112/116; its largest component only: TP 50, FN 6 -> 100/106
    assert not pp.foreground_lcc and pp.classes == []
    assert pp.dice_before == pytest.approx({"a": 1.0, "b": 112 / 116}) and pp.dice_after == pp.dice_before
    assert str(pp) == "none (no step improved the cross-validation Dice)"


def test_foreground_union_step_is_kept_when_every_class_gains():
    prediction, label = _pair(TOUCHING)
    prediction[24:26, 24:26] = 1  # stray a
    prediction[24:26, 4:6] = 2  # stray b
    pp = decide_postprocessing([(prediction, label)], NAMES)
    assert pp.foreground_lcc and pp.classes == []  # after the union step no class has a stray part left
    assert pp.dice_before == pytest.approx({"a": 96 / 100, "b": 64 / 68})
    assert pp.dice_after == {"a": 1.0, "b": 1.0}
    np.testing.assert_array_equal(apply_postprocessing(prediction, pp), label)
    assert str(pp) == "largest component of the foreground"


def test_foreground_union_step_is_rejected_when_one_class_loses_though_the_mean_gains():
    prediction, label = _pair(TOUCHING)
    prediction[20:25, 20:26] = 1  # 30 stray voxels of a
    label[28:30, 2:4] = prediction[28:30, 2:4] = 2  # a true, found, second component of b (4 voxels)
    pp = decide_postprocessing([(prediction, label)], NAMES)
    # union step: a 96/126 -> 1, b 1 -> 64/68: the mean rises, but b drops (nnU-Net keeps it out)
    assert not pp.foreground_lcc and pp.classes == [1]
    assert pp.dice_before == pytest.approx({"a": 96 / 126, "b": 1.0})
    assert pp.dice_after == {"a": 1.0, "b": 1.0}
    np.testing.assert_array_equal(apply_postprocessing(prediction, pp), label)


@pytest.mark.parametrize(("stray", "removed"), [((6, 6, 6), False), ((8, 8, 8), True)], ids=["corner", "gap"])
def test_3d_decision_uses_26_connectivity(stray, removed):
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    prediction = label.copy()
    prediction[stray] = 1  # (6, 6, 6) touches the cube's corner voxel (5, 5, 5): not removable
    pp = decide_postprocessing([(prediction, label)], ["background", "organ"])
    assert pp.foreground_lcc is removed and pp.classes == []
    assert pp.dice_before == pytest.approx({"organ": 128 / 129})
    assert pp.dice_after == pytest.approx({"organ": 1.0 if removed else 128 / 129})


def test_json_round_trip_and_bad_files(tmp_path):
    prediction, label = _pair(SEPARATE)
    prediction[26:29, 26:29] = 1
    pp = decide_postprocessing([(prediction, label)], [*NAMES, "absent"], min_gain=0.01)
    assert pp.dice_before["absent"] is None and 3 not in pp.classes  # undefined: never chosen
    path = pp.to_json(tmp_path / "cv" / "postprocessing.json")
    data = json.loads(path.read_text())
    assert data == {
        "foreground_lcc": False,
        "classes": [1],
        "class_names": ["background", "a", "b", "absent"],
        "dice_before": {"a": 72 / 81, "b": 1.0, "absent": None},
        "dice_after": {"a": 1.0, "b": 1.0, "absent": None},
        "min_gain": 0.01,
    }
    assert Postprocessing.from_json(path) == pp
    bad = tmp_path / "bad.json"
    for content, message in [
        ("{not json", "is not valid JSON"),
        ('{"foreground_lcc": true, "extra": 1}', r"expected an object with the keys .*got \['extra'"),
        ('{"classes": [1]}', "foreground_lcc required"),
        ('{"foreground_lcc": true, "classes": [0]}', r"classes \[0\]: must be distinct class indices >= 1"),
        ('{"foreground_lcc": "yes"}', "foreground_lcc must be true or false"),
        ('{"foreground_lcc": true, "dice_after": {"a": "high"}}', "dice_after must map class names"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))}.*{message}"):
            Postprocessing.from_json(bad)
    with pytest.raises(FileNotFoundError, match="postprocessing file not found: .*missing.json"):
        Postprocessing.from_json(tmp_path / "missing.json")
    with pytest.raises(
        ValueError, match=r"x.json was decided for the classes \['background', 'a', 'b', 'absent'\]"
    ):
        pp.check(NAMES, "x.json")
    with pytest.raises(ValueError, match=r"x.json: classes \[2\] out of range"):
        Postprocessing(classes=[2]).check(["background", "a"], "x.json")


def test_bad_pairs_are_named():
    good = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"pair 1: prediction shape \(4, 5\) != label shape \(4, 4\)"):
        decide_postprocessing([(good, good), (np.zeros((4, 5), np.uint8), good)], NAMES)
    with pytest.raises(ValueError, match=r"pair 0: the label has values in \[0, 3\]; the 3 classes are 0..2"):
        decide_postprocessing([(good, good + 3 * np.eye(4, dtype=np.uint8))], NAMES)
    with pytest.raises(ValueError, match="pair 0: the prediction has dtype float32"):
        decide_postprocessing([(good.astype(np.float32), good)], NAMES)
    with pytest.raises(ValueError, match="at least one"):
        decide_postprocessing([], NAMES)
    with pytest.raises(ValueError, match="need distinct names"):
        decide_postprocessing([(good, good)], ["background"])


# predict on real files, with the session's checkpoints


def _predict(*args: str) -> None:
    assert predict_main(list(args)) == 0, args


def _unbiased_copy(ckpt: str, path: Path) -> str:
    """A copy of ``ckpt`` with its head's bias zeroed: the 2-step debug model predicts one class everywhere
    (its bias wins), without the bias its argmax follows the image and leaves stray components to remove."""
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["net.head.bias"].zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return str(path)


def _fragmented_class(mask: np.ndarray) -> int:
    """A foreground class with more than one (fully connected) component in ``mask``."""
    for k in range(1, int(mask.max()) + 1):
        if len(_components(mask == k)) > 1:
            return k
    raise AssertionError(f"no class of the prediction has two components: {np.unique(mask)}")


def test_predict_applies_the_postprocessing_json_next_to_the_checkpoint(ckpt_2d, tmp_path, capsys):
    model = tmp_path / "model"
    _unbiased_copy(ckpt_2d, model / "last.ckpt")
    pixels = (np.random.default_rng(5).random((48, 40)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    ckpt, scan = str(model / "last.ckpt"), str(tmp_path / "scan.png")
    _predict("--ckpt", ckpt, "--input", scan, "--output", str(tmp_path / "raw"))
    raw = np.asarray(Image.open(tmp_path / "raw" / "scan.png"))  # no postprocessing.json yet: the argmax
    k = _fragmented_class(raw)
    names = CheckpointModel.load(ckpt).class_names
    pp = Postprocessing(classes=[k], class_names=names)
    pp.to_json(model / "postprocessing.json")
    capsys.readouterr()
    _predict("--ckpt", ckpt, "--input", scan, "--output", str(tmp_path / "pp"))
    err = capsys.readouterr().err
    assert (
        f"postprocessing from {model / 'postprocessing.json'}: largest component of {names[k]} ({k})" in err
    )
    with Image.open(tmp_path / "pp" / "scan.png") as image:
        assert image.mode == "P"
        mask = np.asarray(image)
    assert len(_components(mask == k)) == 1
    np.testing.assert_array_equal(mask, apply_postprocessing(raw, pp))
    np.testing.assert_array_equal(mask, _reference_largest(raw, raw == k))
    _predict("--ckpt", ckpt, "--input", scan, "--output", str(tmp_path / "off"), "--postprocessing", "none")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "off" / "scan.png")), raw)
    assert "postprocessing" not in capsys.readouterr().err


def test_predict_finds_the_cross_validation_postprocessing_of_an_ensemble(ckpt_2d, tmp_path, capsys):
    cv = tmp_path / "cv"
    files = []
    for fold in ("fold_0", "fold_1"):
        files.append(cv / fold / "version_0" / "checkpoints" / "best.ckpt")
        _unbiased_copy(ckpt_2d, files[-1])
    data = np.random.default_rng(6).normal(size=(40, 36, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "vol.nii.gz"))
    vol = str(tmp_path / "vol.nii.gz")
    _predict("--ckpt", str(cv), "--input", vol, "--output", str(tmp_path / "raw"))
    raw = np.asarray(nib.load(str(tmp_path / "raw" / "vol.nii.gz")).dataobj)
    assert len(_components(raw > 0)) > 1
    Postprocessing(foreground_lcc=True).to_json(cv / "postprocessing.json")
    for name, ckpt in (("folder", [str(cv)]), ("files", [str(f) for f in files])):  # cv: their common parent
        capsys.readouterr()
        _predict("--ckpt", *ckpt, "--input", vol, "--output", str(tmp_path / name))
        assert f"postprocessing from {cv / 'postprocessing.json'}: largest component of the foreground" in (
            capsys.readouterr().err
        )
        mask = np.asarray(nib.load(str(tmp_path / name / "vol.nii.gz")).dataobj)
        assert len(_components(mask > 0)) == 1  # one 26-connected component over the whole volume
        np.testing.assert_array_equal(mask, largest_foreground_component(raw))


def test_predict_postprocessing_option_and_mismatched_classes(ckpt_2d, tmp_path, capsys):
    Image.fromarray((np.random.default_rng(7).random((24, 24)) * 255).astype(np.uint8)).save(
        tmp_path / "x.png"
    )
    ckpt = _unbiased_copy(ckpt_2d, tmp_path / "model.ckpt")
    args = ["--ckpt", ckpt, "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o")]
    other = Postprocessing(classes=[1], class_names=["background", "liver"]).to_json(tmp_path / "other.json")
    assert predict_main([*args, "--postprocessing", str(other)]) == 2
    assert re.search(
        rf"{re.escape(str(other))} was decided for the classes \['background', 'liver'\]",
        capsys.readouterr().err,
    )
    assert predict_main([*args, "--postprocessing", str(tmp_path / "nope.json")]) == 2
    assert "postprocessing file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    given = Postprocessing(foreground_lcc=True).to_json(tmp_path / "given.json")
    _predict(*args, "--postprocessing", str(given))
    _predict(*args, "--postprocessing", "none", "--output", str(tmp_path / "raw"))
    raw = np.asarray(Image.open(tmp_path / "raw" / "x.png"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "o" / "x.png")), largest_foreground_component(raw)
    )
