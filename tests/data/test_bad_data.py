"""Bad data through the real CLI: exit status 2 and one line naming the file and the fix, or a warning."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._datafiles import make_folder2d, make_msd, volume_image, write_nifti, write_raster
from tests.data.test_datamodule_real import FEW_STEPS, REPO, SMALL
from unetseg.data.formats import detect_layout, validate
from unetseg.data.formats.layout import InvalidDatasetError, MissingDatasetFileError
from unetseg.training.cli import main


def _error_line(stderr: str) -> str:
    """The CLI's one-line error (``unetseg: error: ...``); there must be exactly one and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("unetseg: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _cli_error(root: Path, run_args: list[str], capsys) -> str:
    """Run the CLI on ``root``; it must exit with status 2; return its error line."""
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "debug", "--data.root", str(root), "--data.num_folds", "2", *FEW_STEPS, *run_args])
    assert exit_.value.code == 2
    return _error_line(capsys.readouterr().err)


def test_empty_images_folder_beside_masks_exits_2_naming_both_folders(tmp_path):
    root = make_folder2d(tmp_path / "polyps", n=3)
    for image in (root / "images").iterdir():
        image.unlink()
    with pytest.raises(MissingDatasetFileError):
        detect_layout(root)
    command = [sys.executable, "train.py", "--config", "debug", "--data.root", str(root),
               "--trainer.default_root_dir", str(tmp_path), "--logging.save_dir", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    line = _error_line(done.stderr)
    assert f"no images in {root / 'images'} but 3 mask(s) in {root / 'masks'} (e.g. img000.png)" in line
    assert "put each image in images/ under its mask's name" in line


def test_stray_mask_value_without_dataset_json_lists_the_absent_labels(tmp_path, run_args, capsys):
    root = make_folder2d(tmp_path / "cells", n=4, mask_scale=1, rgb=False)  # masks 0/1
    mask = root / "masks" / "img002.png"
    stray = np.array(Image.open(mask))
    stray[0, 0] = 7
    write_raster(mask, stray)
    line = _cli_error(root, run_args, capsys)
    assert "the masks hold the values [0, 1, 7], so labels [2, 3, 4, 5, 6] never occur" in line
    assert f"7 in {mask}" in line
    json_line = '{"labels": {"0": "background", "1": "class_1"}}'
    assert f"{root / 'dataset.json'} with the line {json_line}" in line
    # the suggested dataset.json makes the stray value an error naming the mask
    (root / "dataset.json").write_text(json_line)
    line = _cli_error(root, run_args, capsys)
    assert f"label {mask} has values [7] outside the declared labels 0..1" in line


def _blank_case(root: Path, with_foreground: bool) -> Path:
    """Make case_002's image all zeros; its label keeps its foreground or is emptied."""
    image = write_nifti(root / "imagesTr" / "case_002.nii.gz", np.zeros(SMALL, np.float32))
    if not with_foreground:
        write_nifti(root / "labelsTr" / "case_002.nii.gz", np.zeros(SMALL, np.uint8))
    return image


def test_blank_image_with_a_labelled_structure_exits_2(tmp_path, run_args, capsys):
    root = make_msd(tmp_path / "msd", n_cases=4, shape=SMALL)
    image = _blank_case(root, with_foreground=True)
    line = _cli_error(root, run_args, capsys)
    assert f"image {image} (channel 0: every voxel 0) is constant but its label" in line
    assert "data.skip_bad_cases: true" in line
    with pytest.raises(InvalidDatasetError, match="is constant"):
        validate(detect_layout(root))


def test_blank_image_with_an_empty_label_trains_with_a_warning_naming_it(tmp_path, run_args, caplog):
    root = make_msd(tmp_path / "msd", n_cases=4, shape=SMALL)
    image = _blank_case(root, with_foreground=False)
    other = root / "imagesTr" / "case_001.nii.gz"
    write_nifti(other, volume_image(np.zeros(SMALL, np.uint8), seed=1))  # noisy, not constant: no warning
    with caplog.at_level(logging.WARNING):
        result = main(["--config", "debug", "--data.root", str(root), "--data.num_folds", "2", *FEW_STEPS,
                       *run_args])
    assert result.trainer.global_step == 2
    warnings = [r.getMessage() for r in caplog.records if "is constant" in r.getMessage()]
    assert warnings == [f"image {image} (channel 0: every voxel 0) is constant: it carries no information; "
                        "check the file"]
