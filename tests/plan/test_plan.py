"""The dataset plan: fingerprint of real MRI files, planning rules, the YAML overlay and its command line."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests._datafiles import make_msd
from unetseg.data.formats import detect_layout, validate
from unetseg.plan import Fingerprint, dataset_fingerprint, make_plan
from unetseg.plan.__main__ import main as plan_main
from unetseg.plan.overlay import plan_dataset

real_mri = pytest.importorskip("benchmarks.real_mri")
pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    """A cut-out of the MNI152 template (real MRI): 6 slabs, background/csf/gm/wm/ventricles."""
    return real_mri.build_cutout(tmp_path_factory.mktemp("mri") / "mri")


def test_fingerprint_counts_classes_slices_and_intensities_of_the_files(mri):
    spec = validate(detect_layout(mri))
    fp = dataset_fingerprint(spec)
    labels = [np.asarray(nib.load(c.label).dataobj).astype(int) for c in spec.cases_train]
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=5)
    assert fp.class_voxels == counts.tolist()
    assert fp.class_cases == [sum(int((lab == k).any()) for lab in labels) for k in range(5)]
    # slices along Z containing the ventricles (class 4), counted directly
    assert fp.class_slices[2][4] == sum(int((lab[:, :, z] == 4).any()) for lab in labels for z in range(3))
    assert fp.num_slices[2] == 3 * len(labels)
    assert fp.median_shape == labels[0].shape and fp.median_spacing == (3.0, 3.0, 3.0)
    images = [np.asarray(nib.load(c.images[0]).dataobj, dtype=np.float32) for c in spec.cases_train]
    foreground = np.concatenate([im[lab > 0] for im, lab in zip(images, labels, strict=True)])
    assert fp.intensity[0]["p99_5"] <= foreground.max() and fp.intensity[0]["p00_5"] >= foreground.min()
    assert abs(fp.intensity[0]["median"] - np.median(foreground)) < 0.05 * foreground.std()
    assert math.isclose(sum(fp.foreground_fraction()), 1.0)
    zero = [float((im == 0).mean()) for im in images]  # one channel: the voxels that are exactly 0
    assert fp.zero_fractions == pytest.approx(zero)
    assert fp.median_zero_fraction == pytest.approx(np.median(zero))


def _fp(shape, spacing, n=4, slices=None, names=("background", "a", "b"), channels=("MRI",), voxels=None):
    """A synthetic fingerprint with ``n`` cases of one shape and spacing."""
    k = len(names)
    slices = slices or [[shape[a] * n] * k for a in range(len(shape))]
    return Fingerprint(
        list(names),
        list(channels),
        len(shape),
        [tuple(shape)] * n,
        [tuple(spacing)] * n,
        intensity=[{"mean": 40.0, "std": 90.0, "p00_5": -900.0, "median": 35.0, "p99_5": 250.0}]
        * len(channels),
        class_voxels=voxels or [1000] * k,
        class_cases=[n] * k,
        class_slices=slices,
        num_slices=[shape[a] * n for a in range(len(shape))],
        bytes_per_case=4 * math.prod(shape),
    )


@pytest.mark.parametrize(
    ("shape", "spacing", "gpu", "dims", "axis"),
    [
        ((256, 256, 40), (0.8, 0.8, 5.0), True, 2, 2),  # anisotropic: 2D across the coarse axis even on GPU
        ((40, 256, 256), (5.0, 0.8, 0.8), False, 2, 0),
        ((96, 96, 96), (1.0, 1.0, 1.0), True, 3, None),  # isotropic on GPU: 3D
        ((96, 96, 96), (1.0, 1.0, 1.0), False, 2, 2),  # isotropic on CPU: 2D (steps per second)
    ],
)
def test_plan_picks_dimensionality_and_slice_axis(shape, spacing, gpu, dims, axis):
    plan = make_plan(_fp(shape, spacing), gpu=gpu)
    assert plan.value("data.spatial_dims") == dims
    if axis is None:
        with pytest.raises(KeyError, match="data.slice_axis"):
            plan.value("data.slice_axis")
    else:
        assert plan.value("data.slice_axis") == axis


@pytest.mark.parametrize(
    ("shape", "gpu"), [((75, 93, 6), False), ((320, 320, 30), True), ((48, 61, 9), False)]
)
def test_depth_gives_a_4_to_8_px_bottleneck_and_the_batch_fits_the_budget(shape, gpu):
    from unetseg.plan.rules import PIXELS_PER_BATCH

    plan = make_plan(_fp(shape, (1.0, 1.0, 4.0)), gpu=gpu)
    channels = plan.value("model.net.init_args.channels")
    patch = plan.value("data.patch_size") or shape[:2]
    smallest = min(patch) / 2 ** (len(channels) - 1)
    assert 4 <= smallest < 8 or len(channels) == 7
    batch = plan.value("data.batch_size")
    assert 2 <= batch and batch * math.prod(patch) <= 1.5 * PIXELS_PER_BATCH[gpu]
    assert channels == sorted(channels) and channels[0] in (16, 32)


def test_rare_class_raises_oversampling_and_ct_gets_a_window():
    common = _fp((64, 64, 20), (1.0, 1.0, 1.0), slices=[[64 * 4] * 3, [64 * 4] * 3, [80, 80, 70]])
    rare = _fp((64, 64, 20), (1.0, 1.0, 1.0), slices=[[64 * 4] * 3, [64 * 4] * 3, [80, 80, 9]])
    assert make_plan(common).value("data.oversample") == 0.33
    assert make_plan(rare).value("data.oversample") == 0.5
    ct = make_plan(_fp((64, 64, 20), (1.0, 1.0, 1.0), channels=("CT",)))
    assert ct.value("data.normalization") == {
        "name": "ct",
        "window": [-900.0, 250.0],
        "mode": "zscore",
        "mean": 40.0,
        "std": 90.0,
    }
    assert make_plan(common).value("data.normalization") == "zscore"


def _zero_padded_copy(root, out, pad=12):
    """The MSD dataset at ``root`` copied to ``out`` with ``pad`` voxels of zeros around X and Y."""
    shutil.copytree(root, out)
    for path in [*(out / "imagesTr").glob("*.nii.gz"), *(out / "labelsTr").glob("*.nii.gz")]:
        img = nib.load(path)
        data = np.pad(np.asarray(img.dataobj), [(pad, pad), (pad, pad), (0, 0)])
        nib.save(nib.Nifti1Image(data, img.affine), path)
    return out


def test_a_zero_background_is_z_scored_over_the_non_zero_voxels(mri, tmp_path):
    # the real-MRI cut-out is skull-stripped but cut tight (about 12% background); with a margin of
    # background around it, as in a whole scan, most voxels are exactly 0
    tight = dataset_fingerprint(validate(detect_layout(mri)))
    assert tight.median_zero_fraction < 0.25
    assert make_plan(tight).value("data.normalization") == "zscore"
    fp = dataset_fingerprint(validate(detect_layout(_zero_padded_copy(mri, tmp_path / "padded"))))
    assert fp.median_zero_fraction >= 0.25
    plan = make_plan(fp)
    assert plan.value("data.normalization") == {"name": "zscore", "nonzero": True, "background": "scale"}
    assert "non-zero voxels" in next(c.reason for c in plan.choices if c.key == "data.normalization")
    fp.zero_fractions = [0.3, 0.2, 0.1]  # the median case decides, as in nnU-Net's crop-size rule
    assert make_plan(fp).value("data.normalization") == "zscore"
    ct = make_plan(Fingerprint(**{**fp.to_dict(), "channel_names": ["CT"]}))
    assert ct.value("data.normalization")["name"] == "ct"  # CT keeps its window, background or not


def test_spacings_that_differ_are_resampled_to_the_median():
    fp = _fp((64, 64, 20), (1.0, 1.0, 1.0))
    assert "data.target_spacing" not in [c.key for c in make_plan(fp).choices]
    fp.spacings = [(1.0, 1.0, 1.0), (0.5, 0.5, 1.0), (0.8, 0.8, 1.0)]
    fp.shapes = fp.shapes[:3]
    assert make_plan(fp).value("data.target_spacing") == [0.8, 0.8, 1.0]


def test_overlay_is_yaml_with_a_reason_for_every_value(mri, tmp_path):
    path = plan_dataset(mri, tmp_path / "plan.yaml", split_file=str(mri / "splits.json"), gpu=False)
    text = path.read_text()
    overlay = yaml.safe_load(text)
    assert overlay["data"]["spatial_dims"] == 2 and overlay["data"]["slice_axis"] == 2
    fp = dataset_fingerprint(validate(detect_layout(mri)))
    rare = min(fp.class_slice_fraction(2)[1:]) < 0.3  # the cut-out is centred on the ventricles
    assert overlay["data"]["oversample"] == (0.5 if rare else 0.33)
    values = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    leaves = [line for line in values if not line.rstrip().endswith(":")]
    assert leaves and all("  # " in line for line in leaves), leaves


def test_plan_command_writes_the_overlay_and_rejects_a_bad_folder(mri, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert plan_main(["--data.root", str(mri), "--output", str(out), "--gpu", "no"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(out.read_text())
    assert plan_main(["--data.root", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "missing" in capsys.readouterr().err


def test_plan_refuses_cases_without_labels(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=2)
    spec = validate(detect_layout(root))
    (spec.cases_train[0].label).unlink()
    with pytest.raises(Exception, match="label"):
        dataset_fingerprint(validate(detect_layout(root)))


def test_config_auto_plans_trains_and_keeps_the_plan_next_to_the_config(mri, tmp_path, capsys):
    from unetseg.training.cli import main

    common = ["--logging.save_dir", str(tmp_path / "runs"), "--logging.wandb", "false", "--test", "false"]
    result = main(
        [
            "--config",
            "auto",
            "--data.root",
            str(mri),
            "--data.split_file",
            str(mri / "splits.json"),
            "--trainer.max_steps",
            "2",
            *common,
        ]
    )
    run_dir = tmp_path / "runs" / "auto" / "version_0"
    assert result.steps == 2 and (run_dir / "config.yaml").is_file()
    planned = yaml.safe_load((run_dir / "plan.yaml").read_text())
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert used["data"]["oversample"] == planned["data"]["oversample"]
    assert used["model"]["net"]["init_args"]["channels"] == planned["model"]["net"]["init_args"]["channels"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "auto", *common])
    assert exit_info.value.code == 2
    assert "--config auto plans from a dataset: give --data.root" in capsys.readouterr().err


def test_data_root_without_a_config_is_planned_and_an_explicit_base_config_is_not(mri, tmp_path):
    from unetseg.training.cli import main

    common = [
        "--data.root",
        str(mri),
        "--data.split_file",
        str(mri / "splits.json"),
        "--trainer.max_steps",
        "1",
        "--logging.save_dir",
        str(tmp_path / "runs"),
        "--logging.wandb",
        "false",
        "--test",
        "false",
    ]
    main(common)
    planned_dir = tmp_path / "runs" / "auto" / "version_0"
    planned = yaml.safe_load((planned_dir / "plan.yaml").read_text())
    used = yaml.safe_load((planned_dir / "config.yaml").read_text())
    assert used["data"]["batch_size"] == planned["data"]["batch_size"]
    assert used["model"]["net"]["init_args"]["channels"] == planned["model"]["net"]["init_args"]["channels"]
    # a --KEY VALUE still overrides the plan: it comes after the planned overlay
    main([*common, "--data.batch_size", "3", "--logging.version", "override"])
    overridden = yaml.safe_load((tmp_path / "runs" / "auto" / "override" / "config.yaml").read_text())
    assert overridden["data"]["batch_size"] == 3 != planned["data"]["batch_size"]
    main(["--config", "unet_skip", *common])
    base_dir = tmp_path / "runs" / "unet_skip" / "version_0"
    base = yaml.safe_load((base_dir / "config.yaml").read_text())
    assert not (base_dir / "plan.yaml").exists()
    assert base["data"]["batch_size"] == 16 != planned["data"]["batch_size"]


def test_the_rules_docstring_examples_hold():
    import doctest

    from unetseg.plan import rules

    result = doctest.testmod(rules)
    assert result.attempted >= 4 and result.failed == 0


def test_cpu_plans_keep_the_first_two_levels_at_the_base_width_and_mirrored_plans_use_flip_tta():
    fp = _fp((80, 96, 40), (1.0, 1.0, 1.0))
    cpu, gpu = make_plan(fp, gpu=False), make_plan(fp, gpu=True)
    cpu_channels = cpu.value("model.net.init_args.channels")
    assert cpu_channels[0] == cpu_channels[1] and cpu_channels[2] == 2 * cpu_channels[1]
    gpu_channels = gpu.value("model.net.init_args.channels")
    assert all(b == min(2 * a, 320) for a, b in zip(gpu_channels, gpu_channels[1:], strict=False))
    assert cpu.value("data.augmentation") and cpu.value("model.inference.flip_tta") is True
    assert cpu.overlay()["model"]["inference"] == {"flip_tta": True}
