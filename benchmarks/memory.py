"""Memory: peak RSS of a training epoch's data pipeline as the dataset grows 1x, 4x, 16x, lazy vs cached.

Datasets: MSD-layout NIfTI folders written by this script (``.nii.gz`` MR volumes with a two-class label),
read through ``SegmentationDataModule(root=..., spatial_dims=2)`` (2D slices, ``CaseLoader`` underneath) with
``cache="none"`` (lazy: the current case only), ``"memory"`` (every case preloaded in ``setup``) and
``"disk"`` (preprocessed ``.npy`` files, memory-mapped), 2 folds (half the cases train); and the built-in
synthetic data (generated per sample, nothing kept). Every configuration runs in a fresh subprocess, so
its peak RSS (``ru_maxrss``) is its own: ``baseline`` is the RSS after the imports, ``growth = peak -
baseline`` what the data pipeline added over ``setup("fit")`` and one pass over the training loader (batch 8,
no workers).

    python -m benchmarks.memory            # full: 4/16/64 volumes of 96x96x32, ~2 min
    python -m benchmarks.memory --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import base_parser, parse, peak_rss_mib, rss_mib, setup, write_result

NAME = "memory"
REPO = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, n_cases: int, shape: Sequence[int], seed: int = 0) -> Path:
    """An MSD task folder of ``n_cases`` float32 MR volumes with a box-shaped ``organ`` label (uint8)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    training = []
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(n_cases):
        label = np.zeros(shape, dtype=np.uint8)
        lo = [int(rng.integers(1, max(2, s // 3))) for s in shape]
        label[tuple(slice(a, a + max(1, s // 2)) for a, s in zip(lo, shape, strict=True))] = 1
        image = (100.0 + 50.0 * label + rng.normal(0.0, 10.0, shape)).astype(np.float32)
        name = f"case_{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": f"bench{n_cases}",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ"},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, run in this (fresh) process: RSS after imports, then setup + one training epoch."""
    import torch

    from unetseg.data import SegmentationDataModule

    torch.set_num_threads(1)
    baseline = rss_mib()
    if config["source"] == "synthetic":
        dm = SegmentationDataModule(
            spatial_dims=2,
            spatial_size=config["size"],
            num_train=config["samples"],
            num_val=8,
            num_test=8,
            batch_size=8,
        )
    else:
        dm = SegmentationDataModule(
            root=config["root"],
            spatial_dims=2,
            batch_size=8,
            cache=config["cache"],
            cache_dir=config.get("cache_dir"),
            check_data=False,
            num_folds=2,
        )
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = 0
    for batch in dm.train_dataloader():
        samples += int(batch["image"].shape[0])
    epoch_s = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "end_rss_mib": rss_mib(),
        "growth_mib": peak - baseline,
        "samples": samples,
        "setup_s": setup_s,
        "epoch_s": epoch_s,
    }


def run_child(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run ``child(config)`` in a fresh interpreter; return its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--cases", type=int, default=None, help="volumes at scale 1x, default 4 (quick 2)")
    parser.add_argument("--scales", type=int, nargs="+", default=None, help="default 1 4 16 (quick 1 4)")
    parser.add_argument(
        "--caches",
        nargs="+",
        default=None,
        choices=["none", "memory", "disk", "synthetic"],
        help="NIfTI cache modes and/or the synthetic data, default all (quick: memory)",
    )
    args = parse(parser, argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    machine = setup(args)
    quick = args.quick
    base_cases = args.cases or (2 if quick else 4)
    scales = args.scales or ([1, 4] if quick else [1, 4, 16])
    shape = (24, 24, 8) if quick else (96, 96, 32)
    caches = args.caches or (["memory"] if quick else ["none", "memory", "disk", "synthetic"])
    configs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="unetseg-mem-") as tmp:
        for scale in scales:
            n = base_cases * scale
            root = write_dataset(Path(tmp) / f"data{n}", n, shape, seed=scale)
            for cache in (c for c in caches if c != "synthetic"):
                config = {"source": "nifti", "cache": cache, "scale": scale, "cases": n, "root": str(root)}
                if cache == "disk":
                    config["cache_dir"] = str(Path(tmp) / f"cache{n}")
                configs.append(config)
            if "synthetic" in caches:
                synthetic = {"source": "synthetic", "scale": scale, "samples": n * shape[2] // 2}
                configs.append(synthetic | {"size": list(shape[:2])})
        rows = []
        for config in configs:
            result = run_child(config, args.threads)
            rows.append({k: v for k, v in config.items() if k not in ("root", "cache_dir")} | result)
    case_mib = (np.prod(shape) * (4 + 8)) / 2**20  # float32 image + int64 label once loaded
    results: dict[str, Any] = {
        "volume_shape": list(shape),
        "case_in_memory_mib": case_mib,
        "runs": rows,
        "growth_vs_1x": {},
    }
    for key in sorted({(r["source"], r.get("cache", "-")) for r in rows}):
        group = {r["scale"]: r["growth_mib"] for r in rows if (r["source"], r.get("cache", "-")) == key}
        first = group[min(group)]
        results["growth_vs_1x"]["/".join(key)] = {
            f"{s}x": {"growth_mib": g, "minus_1x_mib": g - first} for s, g in sorted(group.items())
        }
    path = write_result(NAME, args, machine, results)
    for key, by_scale in results["growth_vs_1x"].items():
        line = ", ".join(f"{s}: +{v['growth_mib']:.0f} MiB" for s, v in by_scale.items())
        print(f"{key}: {line}", file=sys.stderr)
    print(f"-> {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
