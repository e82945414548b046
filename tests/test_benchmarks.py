"""Benchmarks (framework overhead, models, precision/FLOPs, memory): quick modes run and write sound JSON.

These are not timing assertions: the figures must be present, finite, positive and consistent with each
other (a ratio equals the times it came from, a GFLOP/s equals FLOPs over time, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import _common, flops, framework_overhead, gradflow_overhead, memory, models, report
from unetseg.analysis.gradflow import layer_groups
from unetseg.nets import UNet
from unetseg.training.module import SegmentationModule

# Keys holding times, ratios, rates or sizes: always > 0. Differences (overhead, growth) may be <= 0.
POSITIVE = {
    "median_s", "q1_s", "q3_s", "min_s", "median", "q1", "q3", "gflop_per_s", "gflop_per_step",
    "images_per_s", "params", "peak_rss_mib", "baseline_rss_mib", "end_rss_mib", "first_call_s",
    "inner_median", "epoch_end_median", "fraction_of_peak", "fraction_of_bf16_peak",
}  # fmt: skip


def positives(tree: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number under a ``POSITIVE`` key, with its path."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in POSITIVE and isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append((f"{path}.{key}", value))
            found += positives(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += positives(value, f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory) -> Path:
    """Every benchmark's quick mode, run once, its JSON in one folder (memory: one scale, one subprocess)."""
    out = tmp_path_factory.mktemp("bench")
    for module, extra in (
        (framework_overhead, []),
        (models, []),
        (flops, []),
        (memory, ["--scales", "1"]),
        (gradflow_overhead, []),
    ):
        module.main(["--quick", *extra, "--out", str(out)])
    return out


def load(out: Path, name: str) -> dict[str, Any]:
    """The quick result file of benchmark ``name``, checked for the common keys and sound numbers."""
    payload = json.loads((out / f"{name}.quick.json").read_text())
    assert payload["benchmark"] == name and payload["quick"] is True
    assert payload["command"].startswith(f"python -m benchmarks.{name} --quick")
    machine = payload["machine"]
    for key in ("cpu", "logical_cores", "torch", "lightning", "monai", "date", "torch_threads"):
        assert machine[key], key
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    numbers = positives(payload["results"])
    assert numbers, "no figures recorded"
    bad = [(p, v) for p, v in numbers if not (math.isfinite(v) and v > 0)]
    assert not bad, bad
    return payload["results"]


def test_framework_overhead_quick(quick_dir):
    r = load(quick_dir, "framework_overhead")
    config = r["config"]
    steps, epochs = config["steps_per_epoch"], config["timed_epochs"]
    assert {"ModelCheckpoint", "TQDMProgressBar"} <= set(config["callbacks"])
    csv, wandb = config["loggers"]  # as the CLI sets them up (class names may be unetseg subclasses)
    assert csv.endswith("CSVLogger") and wandb.endswith("WandbLogger")
    assert config["checkpoint_mib"] > 0  # the trainer did save its checkpoint
    assert r["ratios"]["step_trainer_vs_plain"]["n"] == steps * epochs
    assert r["ratios"]["trainer_vs_plain"]["n"] == r["epoch_times"]["trainer"]["n"] == epochs
    kinds = r["step_kinds_vs_plain"]
    assert set(kinds) <= {"other", "logging", "epoch_end"} and kinds["epoch_end"]["n"] == epochs
    assert sum(v["n"] for v in kinds.values()) == steps * epochs
    for name in ("trainer", "plain", "plain_metrics"):
        assert r["epoch_times"][name]["median_s"] >= r["step_times"][name]["min_s"]
    ratio = r["ratios"]["trainer_vs_plain"]["median"]
    assert r["target"]["met"] == (ratio <= framework_overhead.TARGET_RATIO)
    assert math.isfinite(r["overhead_ms_per_step"]) and math.isfinite(r["epoch_end_ms"])
    parts = r["components_ms"]
    assert {"argmax(1)", "max(1).indices", "DiceScore.update", "MulticlassF1Score.update"} <= set(parts)
    assert all(v > 0 for v in parts.values()) and parts["trainer.save_checkpoint"] > 0


def test_models_quick(quick_dir):
    r = load(quick_dir, "models")
    assert r["smp"] == "available" or r["smp"].startswith("unavailable: ")
    if os.environ.get("UNETSEG_REQUIRE_SMP"):  # CI installs the [smp] extra
        assert r["smp"] == "available"
    table = r["frameworks"]["models"]
    expected = {"unetseg", "monai_basicunet", "unetseg_instance", "monai_basicunet_default", "monai_unet"}
    assert expected <= set(table) and ("smp_unet" in table) == (r["smp"] == "available")
    # the matched pair is the same network: equal parameters and FLOPs
    assert table["unetseg"]["params"] == table["monai_basicunet"]["params"]
    assert table["unetseg"]["gflop_per_step"] == pytest.approx(table["monai_basicunet"]["gflop_per_step"])
    for entry in table.values():
        for precision in models.PRECISIONS:
            stats = entry[precision]
            assert stats["gflop_per_s"] == pytest.approx(entry["gflop_per_step"] / stats["median_s"])
    pair = r["target"]["time_per_flop"]["unetseg_vs_monai_basicunet"]
    assert set(pair) == set(models.PRECISIONS)
    assert r["target"]["met"] == all(v["q1"] <= 1.0 for v in pair.values())
    skips = r["skips"]["models"]
    assert set(skips) == {"concat", "add", "none", "concat_residual", "add_residual", "none_residual"}
    # merges have no parameters; concat widens the decoder blocks' input, so it costs parameters and FLOPs
    assert skips["add"]["params"] == skips["none"]["params"] < skips["concat"]["params"]
    assert skips["add"]["gflop_per_step"] < skips["concat"]["gflop_per_step"]
    assert skips["concat"]["params"] < skips["concat_residual"]["params"]


def test_flops_quick(quick_dir):
    r = load(quick_dir, "flops")
    assert r["variants"] == ["fp32", "bf16", "bf16_cl"]  # no compile in quick mode
    peak = r["peak"]
    for dtype in ("bf16", "fp32"):
        layouts = peak[dtype]["layouts"]
        assert peak[dtype]["gflop_per_s"] == max(v["gflop_per_s"] for v in layouts.values())
    (res,) = r["sizes"].values()
    assert set(res["ratios_vs_fp32"]) == {"bf16", "bf16_cl"}
    for name, v in res["variants"].items():
        assert v["images_per_s"] == pytest.approx(res["batch"] / v["median_s"])
        assert v["gflop_per_s"] == pytest.approx(res["gflop_per_step"] / v["median_s"])
        dtype = "fp32" if name == "fp32" else "bf16"
        assert v["fraction_of_peak"] == pytest.approx(v["gflop_per_s"] / peak[dtype]["gflop_per_s"])


def test_gradflow_overhead_quick(quick_dir):
    r = load(quick_dir, "gradflow_overhead")
    groups = len(layer_groups(SegmentationModule(UNet(channels=(16, 32, 64, 128), out_channels=4))))
    cost = r["record_cost"]
    # every call of the hooks recorded one entry per layer group of the real module
    assert cost["groups"] == cost["records_per_call"] == groups
    assert cost["ratio"]["n"] == cost["record"]["n"] == cost["train_step"]["n"]
    runs = r["end_to_end"]
    assert set(runs) == set(gradflow_overhead.SETTINGS)
    # the timed fits really ran with the callback: k=1 records every step, k=10 steps 0, 10, ...
    steps = r["steps"]
    assert runs["without"]["records_per_fit"] == 0
    assert runs["every_1"]["records_per_fit"] == steps * groups
    assert runs["every_10"]["records_per_fit"] == math.ceil(steps / 10) * groups
    assert runs["without"]["ratio_vs_without"]["median"] == 1.0
    for entry in runs.values():
        assert entry["ratio_vs_without"]["n"] == entry["cpu_s_per_step"]["n"] == r["repeats"]


def test_memory_quick_one_scale(quick_dir):
    r = load(quick_dir, "memory")
    (run,) = r["runs"]
    assert (run["source"], run["cache"], run["scale"]) == ("nifti", "memory", 1)
    assert run["growth_mib"] == pytest.approx(run["peak_rss_mib"] - run["baseline_rss_mib"])
    assert run["peak_rss_mib"] >= run["baseline_rss_mib"]
    # 2 folds: half of the cases train, one sample per slice along axis 2
    assert run["samples"] == run["cases"] // 2 * r["volume_shape"][2]


def test_report_renders_every_section_and_keeps_the_others(quick_dir, tmp_path):
    readme = tmp_path / "README.md"
    hand = "# Benchmarks\n\n## Data loading\n\nWritten by hand: stays.\n"
    readme.write_text(hand)
    report.main(["--quick", "--results", str(quick_dir), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(hand)
    for name in [*report.SECTIONS, "gpu"]:
        assert (
            text.count(f"<!-- report:{name}:begin -->") == 1
            and text.count(f"<!-- report:{name}:end -->") == 1
        )
    overhead = load(quick_dir, "framework_overhead")["ratios"]["trainer_vs_plain"]
    assert f"| {overhead['median']:.3f} (IQR {overhead['q1']:.3f}-{overhead['q3']:.3f}) |" in text
    assert "python -m benchmarks.models --quick" in text  # the command that produced the figures
    if not (quick_dir / "flops_cuda.quick.json").exists():
        assert "No GPU was available in this session" in text
    report.main(["--quick", "--results", str(quick_dir), "--readme", str(readme)])
    assert readme.read_text() == text  # regenerating replaces the sections in place


def test_cuda_request_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        flops.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])


@pytest.mark.slow
def test_memory_quick_every_source_over_two_scales(tmp_path):
    caches = ["none", "memory", "disk", "synthetic"]
    memory.main(["--quick", "--caches", *caches, "--out", str(tmp_path)])
    r = load(tmp_path, "memory")
    assert set(r["growth_vs_1x"]) == {"nifti/none", "nifti/memory", "nifti/disk", "synthetic/-"}
    for by_scale in r["growth_vs_1x"].values():
        assert list(by_scale) == ["1x", "4x"] and by_scale["1x"]["minus_1x_mib"] == 0


@pytest.mark.slow
def test_flops_quick_with_compile(tmp_path):
    flops.main(["--quick", "--compile", "--out", str(tmp_path)])
    r = load(tmp_path, "flops")
    assert r["variants"][-1] == "bf16_cl_compile"
    (res,) = r["sizes"].values()
    assert res["variants"]["bf16_cl_compile"]["first_call_s"] > res["variants"]["bf16_cl_compile"]["median_s"]


# ------------------------------------------------------------------------------------------ _common helpers


def test_interleave_alternates_the_order_and_times_every_call():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = _common.interleave(fns, reps=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")  # warm-up, then alternating
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_ratio_summary_is_the_median_of_per_repetition_ratios():
    # ratios 2, 0.5, 1, 4, 1 -> sorted 0.5 1 1 2 4: median 1 (the ratio of medians would be 3/2)
    r = _common.ratio_summary([2.0, 1.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 1.0, 5.0])
    assert r["median"] == 1.0 and r["n"] == 5 and r["q1"] <= 1.0 <= r["q3"]
    with pytest.raises(ValueError, match="equal"):
        _common.ratio_summary([1.0], [1.0, 2.0])


def test_write_result_rejects_non_finite_figures(tmp_path):
    args = argparse.Namespace(quick=True, out=tmp_path, argv=["--quick"])
    with pytest.raises(ValueError, match=r"results\.a\[1\]"):
        _common.write_result("x", args, {}, {"a": [1.0, float("nan")]})
    path = _common.write_result("x", args, {"cpu": "c"}, {"a": [1.0]})
    payload = json.loads(path.read_text())
    assert path.name == "x.quick.json" and payload["command"] == "python -m benchmarks.x --quick"
    assert payload["results"] == {"a": [1.0]} and "load_average_end" in payload["machine"]


# ------------------------------------------------------------ the faster pieces the overhead benchmark led to


@pytest.mark.parametrize(("num_classes", "shape"), [(2, (3, 17, 9)), (4, (2, 8, 6, 5))])
def test_dice_metric_equals_torchmetrics_dice_score(num_classes, shape):
    from torchmetrics.segmentation import DiceScore

    from unetseg.metrics import segmentation_metrics

    reference = DiceScore(
        num_classes=num_classes,
        include_background=True,
        average="none",
        input_format="index",
        aggregation_level="global",
    )
    ours = segmentation_metrics(num_classes)["dice"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the last class never occurs: NaN in both
        target = torch.randint(0, num_classes - 1, shape, generator=gen)
        pred = torch.randint(0, num_classes - 1, shape, generator=gen)
        reference.update(pred, target)
        ours.update(pred, target)
    expected, got = reference.compute().float(), ours.compute()
    assert got.shape == (num_classes,) and got[-1].isnan() and expected[-1].isnan()
    assert torch.allclose(got, expected, equal_nan=True)


def test_max_indices_equal_argmax_with_ties():
    logits = torch.randint(0, 3, (2, 4, 5, 6)).float()  # many ties between channels
    assert torch.equal(logits.max(1).indices, logits.argmax(1))
