"""benchmarks/data_loading.py: its quick mode runs and records consistent figures; its dataset is valid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import data_loading
from unetseg.data.formats import detect_layout, read_label, validate

QUICK_SHAPES = {  # scenario -> training batch shape, from the quick plan's sizes (batch 4 in 2D, 2 in 3D)
    "synthetic-2d": [4, 1, 32, 32],
    "synthetic-3d": [2, 1, 16, 16, 16],
    "nifti-2d-slices-none": [4, 1, 24, 24],
    "nifti-3d-patches-none": [2, 1, 16, 16, 8],
    "nifti-2d-slices-memory": [4, 1, 24, 24],
    "nifti-3d-patches-memory": [2, 1, 16, 16, 8],
}


def test_benchmark_dataset_is_a_valid_msd_dataset_with_every_class(tmp_path):
    root = data_loading.write_nifti_dataset(tmp_path / "ds", n_cases=2, shape=(20, 16, 8))
    spec = validate(detect_layout(root), check_data=True)
    assert spec.layout == "msd" and spec.class_names == list(data_loading.CLASSES)
    assert spec.default_normalization == ["zscore"] and len(spec.cases_train) == 2
    for case in spec.cases_train:
        assert set(np.unique(read_label(case, spec)).tolist()) == {0, 1, 2}


def test_quick_mode_writes_consistent_results(tmp_path):
    data_loading.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "data_loading.quick.json").read_text())
    assert payload["benchmark"] == "data_loading" and payload["quick"] is True
    results = payload["results"]
    models = results["models"]
    assert {k: (m["in_channels"], m["out_channels"]) for k, m in models.items()} == {
        "synthetic-2d": (1, 4), "synthetic-3d": (1, 4), "nifti-2d": (1, 3), "nifti-3d": (1, 3)
    }
    scenarios = {s["name"]: s for s in results["scenarios"]}
    assert set(scenarios) == set(QUICK_SHAPES)
    for name, scenario in scenarios.items():
        model = models[scenario["model"]]
        assert model["batch_shape"] == QUICK_SHAPES[name]
        assert model["samples_per_s"] == pytest.approx(QUICK_SHAPES[name][0] / model["step"]["median_s"])
        assert [e["workers"] for e in scenario["loader"]] == [0, 1]
        for entry in scenario["loader"]:
            assert entry["batch_shape"] == QUICK_SHAPES[name]
            assert entry["samples"] == 2 * QUICK_SHAPES[name][0]  # 2 timed batches
            assert entry["samples_per_s"] == pytest.approx(entry["samples"] / entry["seconds"])
            assert entry["loader_vs_model"] == pytest.approx(entry["samples_per_s"] / model["samples_per_s"])
        assert scenario["data"]["augmentation"] == "default"  # training augmentation is on
