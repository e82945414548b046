"""Data loading: samples/s of the training loader vs samples/s that the model's training step consumes.

The loader side is ``SegmentationDataModule.train_dataloader()`` exactly as training uses it (training
augmentation on: the default 2D albumentations / 3D nnU-Net-like MONAI lists of ``unetseg.data.transforms``)
on the built-in synthetic data and on a NIfTI dataset (MSD layout, MR, 3 classes) that the benchmark writes
into a temporary folder: 2D slices and 3D patches, each with the lazy loader (``cache=none``), the in-memory
and the memory-mapped disk cache, with 0, 1 and 2 worker processes. The full run adds two in-memory 3D cases
that price the augmentation: none, and every transform of the default 3D list on every patch (``prob`` 1).
The first ``1 + workers`` batches are not timed (worker start-up, queue fill); the figure is samples / wall
time over the next batches.

The model side is one training step (forward, ``dice_ce`` loss, backward, AdamW step) of the base config's
net (``configs/unet_skip.yaml``, built by the CLI with the dataset's channels and classes) on a real batch of
the same shape: median over repetitions, samples/s = batch size / step time. The ratio loader / model above 1
means the loader keeps up. Both are measured alone, one after the other: during training, loader workers and
the training step share the CPU cores.

    python -m benchmarks.data_loading --threads 2     # full: ~4 min on 2 cores
    python -m benchmarks.data_loading --quick         # smoke run, seconds (tests call it)
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmarks._common import base_parser, parse, setup, summary, synchronize, write_result

NAME = "data_loading"
CLASSES = ("background", "structure", "core")


def write_nifti_dataset(root: Path, n_cases: int, shape: Sequence[int], seed: int = 0) -> Path:
    """MSD-layout MR dataset: ellipsoid ``structure`` with a ``core``; noisy float32 images, spacing 1x1x2."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    training = []
    for i in range(n_cases):
        centre = np.array(shape) * rng.uniform(0.35, 0.65, 3)
        radii = np.array(shape) * rng.uniform(0.15, 0.3, 3)
        rho = np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
        label = (rho < 1).astype(np.uint8) + (rho < 0.4)
        image = (200 + 150 * label + rng.normal(0, 20, shape)).astype(np.float32)
        aff = np.diag([1.0, 1.0, 2.0, 1.0])
        name = f"case_{i:03d}.nii.gz"
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, aff), str(root / folder / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "BenchmarkMR",
        "modality": {"0": "MRI"},
        "labels": {str(i): n for i, n in enumerate(CLASSES)},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def loader_throughput(data_args: dict[str, Any], workers: int, batches: int) -> dict[str, Any]:
    """Samples/s of the training loader of ``SegmentationDataModule(**data_args, num_workers=workers)``."""
    from unetseg.data import SegmentationDataModule

    dm = SegmentationDataModule(**data_args, num_workers=workers)
    dm.setup("fit")
    if dm.loader is not None and dm.cache == "disk":  # write the cache first: the steady state is timed
        dm.loader.preload(dm.splits.train)
    skip = 1 + workers
    loader = dm.train_dataloader()
    if len(loader) < skip + batches:
        raise ValueError(f"{data_args}: the loader has {len(loader)} batches; {skip + batches} are needed")
    samples, shape = 0, None
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        samples += len(batch["image"])
        shape = list(batch["image"].shape)
    elapsed = time.perf_counter() - start
    del iterator
    return {
        "workers": workers,
        "batch_shape": shape,
        "samples": samples,
        "seconds": elapsed,
        "samples_per_s": samples / elapsed,
    }


def model_throughput(
    data_args: dict[str, Any], workdir: Path, device: str, reps: int, warmup: int
) -> dict[str, Any]:
    """Samples/s of the base config's training step (net, loss, optimizer from the CLI) on a real batch."""
    from unetseg.training.cli import build_cli

    # the base config's net: --data.root without a --config would plan the dataset
    args = ["--config", "unet_skip", "--logging.wandb", "false", "--logging.save_dir", str(workdir / "runs"),
            "--trainer.default_root_dir", str(workdir)]
    for key in ("root", "spatial_dims", "num_folds", "check_data"):  # what decides channels and classes
        if data_args.get(key) is not None:
            args += [f"--data.{key}", str(data_args[key])]
    module = build_cli(args).model
    from unetseg.data import SegmentationDataModule

    dm = SegmentationDataModule(**data_args)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    image, label = batch["image"].to(device), batch["label"].to(device)
    net = module.net.to(device).train()
    optimizer = module.optimizer(net.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module.loss_fn(net(image), label)
        loss.backward()
        optimizer.step()

    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "net_parameters": sum(p.numel() for p in module.net.parameters()),
        "in_channels": dm.in_channels,
        "out_channels": dm.num_classes,
        "batch_shape": list(image.shape),
        "step": summary(times),
        "samples_per_s": image.shape[0] / median,
    }


def plan(quick: bool, nifti_root: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """The scenarios: name and ``SegmentationDataModule`` arguments (without ``num_workers``)."""
    from unetseg.data.transforms import DEFAULT_AUGMENTATION_2D, DEFAULT_AUGMENTATION_3D

    aug2, aug3 = DEFAULT_AUGMENTATION_2D, DEFAULT_AUGMENTATION_3D
    size2, size3 = (32, 16) if quick else (96, 48)
    batch2 = 4 if quick else 16
    scenarios = [
        {"name": "synthetic-2d", "data": {"spatial_dims": 2, "spatial_size": size2, "batch_size": batch2,
                                          "num_train": 16 if quick else 512, "augmentation": aug2}},
        {"name": "synthetic-3d", "data": {"spatial_dims": 3, "spatial_size": size3, "batch_size": 2,
                                          "num_train": 8 if quick else 64, "augmentation": aug3}},
    ]
    patch2 = (24, 24) if quick else (96, 96)
    patch3 = (16, 16, 8) if quick else (64, 64, 48)
    for cache in ("none", "memory") if quick else ("none", "memory", "disk"):
        common = {"root": str(nifti_root), "cache": cache, "check_data": False,
                  "num_folds": 2 if quick else 5,
                  "cache_dir": str(cache_dir / cache) if cache == "disk" else None}
        scenarios.append({"name": f"nifti-2d-slices-{cache}", "data": {
            **common, "spatial_dims": 2, "patch_size": patch2, "batch_size": batch2, "augmentation": aug2}})
        scenarios.append({"name": f"nifti-3d-patches-{cache}", "data": {
            **common, "spatial_dims": 3, "patch_size": patch3, "batch_size": 2,
            "samples_per_case": 4 if quick else 8, "augmentation": aug3}})
    if not quick:  # the 3D augmentation's price: none vs every default transform on every patch
        memory3d = next(s["data"] for s in scenarios if s["name"] == "nifti-3d-patches-memory")
        always = [{name: {**kwargs, "prob": 1.0}} for entry in aug3 for name, kwargs in entry.items()]
        for suffix, aug, label in (("no-aug", None, "none"), ("aug-always", always, "default, every prob 1")):
            scenarios.append({"name": f"nifti-3d-patches-memory-{suffix}", "augmentation_label": label,
                              "data": {**memory3d, "augmentation": aug}})
    return scenarios


def run(quick: bool, workers: Sequence[int], batches: int, reps: int, device: str, workdir: Path) -> dict:
    """Write the NIfTI dataset, time every scenario's loader per worker count and its model step."""
    shape = (24, 24, 12) if quick else (96, 96, 64)
    n_cases = 4 if quick else 12
    start = time.perf_counter()
    nifti_root = write_nifti_dataset(workdir / "BenchmarkMR", n_cases, shape)
    dataset = {"layout": "msd", "cases": n_cases, "shape": list(shape), "spacing": [1.0, 1.0, 2.0],
               "file": ".nii.gz float32 image + uint8 label", "write_s": time.perf_counter() - start}
    scenarios = plan(quick, nifti_root, workdir / "cache")
    models: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        data = scenario["data"]
        scenario["loader"] = [loader_throughput(data, w, batches) for w in workers]
        key = f"{'nifti' if data.get('root') else 'synthetic'}-{data['spatial_dims']}d"
        if key not in models:
            models[key] = model_throughput(data, workdir / key, device, reps, warmup=1 if quick else 2)
        model = models[key]
        scenario["model"] = key
        for entry in scenario["loader"]:
            if entry["batch_shape"] != model["batch_shape"]:
                raise RuntimeError(
                    f"{scenario['name']}: loader batch {entry['batch_shape']} != model {model['batch_shape']}"
                )
            entry["loader_vs_model"] = entry["samples_per_s"] / model["samples_per_s"]
        label = scenario.pop("augmentation_label", "default")
        scenario["data"] = {k: (v if k != "augmentation" else label) for k, v in data.items()
                            if k not in ("root", "cache_dir")}
        print(f"{scenario['name']:>36}: " + ", ".join(
            f"{e['workers']}w {e['samples_per_s']:.0f}/s" for e in scenario["loader"]
        ) + f" | model {model['samples_per_s']:.1f}/s", file=sys.stderr)
    return {"nifti_dataset": dataset, "models": models, "scenarios": scenarios}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default 0 1 2 (quick 0 1)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader, default 20")
    parser.add_argument("--reps", type=int, default=None, help="timed model steps, default 7 (quick 2)")
    args = parse(parser, argv)
    machine = setup(args)
    quick = args.quick
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    with tempfile.TemporaryDirectory(prefix="unetseg-bench-data-") as tmp:
        results = run(
            quick=quick,
            workers=args.workers or ([0, 1] if quick else [0, 1, 2]),
            batches=args.batches or (2 if quick else 20),
            reps=args.reps or (2 if quick else 7),
            device=args.device,
            workdir=Path(tmp),
        )
    path = write_result(NAME, args, machine, results)
    print(f"-> {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
