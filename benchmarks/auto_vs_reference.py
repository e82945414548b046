"""``--config auto`` vs the plain MONAI reference loop on a real-MRI dataset, at equal wall time and steps.

For each seed, in one process tree (so that whatever else loads the machine hits both sides alike):

1. the reference loop (:mod:`benchmarks.reference_loop`) trains for ``--seconds`` of wall time, then tests;
2. ``python train.py --config auto --data.root ROOT --data.split_file SPLIT`` with ``--trainer.max_time`` set
   so that the whole process (start-up, planning, fit with its validation and checkpoints, test) takes no
   longer than the reference's whole process (``--seconds`` minus ``--margin``);
3. the reference loop again for exactly as many steps as unetseg made in 2 (equal steps): which one needs
   less wall time, and what Dice it reaches.

Test Dice is global over the test split per class (TP, FP, FN summed over every slice) on both sides. Writes
``--out`` (JSON with every run) and prints a markdown table (mean ± std over seeds, per class).

    python -m benchmarks.auto_vs_reference --root /tmp/real_mri --seconds 180 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _timed(command: list[str], log: Path) -> float:
    """Run ``command`` (output to ``log``), raise with the log's tail on failure; returns its wall time."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def reference(
    root: Path, split: Path, seed: int, out: Path, seconds: float | None, steps: int | None
) -> dict:
    """One reference-loop process; its JSON result plus the process wall time."""
    result = out.with_suffix(".json")
    command = [
        sys.executable,
        "-m",
        "benchmarks.reference_loop",
        "--root",
        str(root),
        "--split-file",
        str(split),
        "--seed",
        str(seed),
        "--out",
        str(result),
    ]
    command += ["--seconds", str(seconds)] if seconds is not None else ["--steps", str(steps)]
    wall = _timed(command, out.with_suffix(".log"))
    data = json.loads(result.read_text())
    return {"mean_dice": data["mean_dice"], "dice": data["dice"], "steps": data["steps"], "wall": wall}


def _test_metrics(run_dir: Path) -> tuple[dict[str, float], int]:
    """Test Dice per class and the number of optimizer steps from a run's ``metrics.csv``."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    test = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/dice") and v}
    steps = max(int(row["step"]) for row in rows if row.get("step")) + 1
    return test, steps


def auto(root: Path, split: Path, seed: int, out: Path, fit_seconds: float, extra: list[str]) -> dict:
    """One ``train.py --config auto`` process with a fit budget of ``fit_seconds``."""
    budget = time.strftime("%H:%M:%S", time.gmtime(int(fit_seconds)))
    command = [
        sys.executable,
        "train.py",
        "--config",
        "auto",
        "--data.root",
        str(root),
        "--data.split_file",
        str(split),
        "--trainer.max_time",
        f"00:{budget}",
        "--seed_everything",
        str(seed),
        "--logging.save_dir",
        str(out / "runs"),
        "--logging.name",
        "auto",
        "--logging.version",
        f"seed{seed}",
        "--logging.wandb",
        "false",
        *extra,
    ]
    wall = _timed(command, out / f"auto_seed{seed}.log")
    test, steps = _test_metrics(out / "runs" / "auto" / f"seed{seed}")
    dice = {k.removeprefix("test/dice/"): v for k, v in test.items() if k.count("/") == 2}
    return {"mean_dice": test["test/dice"], "dice": dice, "steps": steps, "wall": wall}


def _mean_std(values: list[float]) -> str:
    """``mean ± std`` of ``values`` (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per arm, mean ± std over seeds of steps, wall time, mean and per-class Dice."""
    arms = ["reference (equal time)", "auto (equal time)", "reference (equal steps)"]
    classes = list(runs[0]["auto"]["dice"])
    lines = [
        "| run | steps | wall s | test Dice | " + " | ".join(classes) + " |",
        "|---|---|---|---|" + "---|" * len(classes),
    ]
    keys = {
        "reference (equal time)": "reference",
        "auto (equal time)": "auto",
        "reference (equal steps)": "reference_steps",
    }
    for arm in arms:
        rows = [r[keys[arm]] for r in runs if keys[arm] in r]
        if not rows:
            continue
        cells = [
            _mean_std([r["steps"] for r in rows]).replace(".000", ""),
            _mean_std([r["wall"] for r in rows]),
            _mean_std([r["mean_dice"] for r in rows]),
        ]
        cells += [_mean_std([r["dice"][c] for r in rows]) for c in classes]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + paired(runs)


def paired(runs: list[dict[str, Any]]) -> str:
    """Per-seed differences: auto minus the reference at equal time and at equal steps (test Dice), and the
    end-to-end wall-time ratio auto / reference at equal steps (start-up, validation, checkpoints, test
    included)."""
    lines = []
    for key, label in (("reference", "equal time"), ("reference_steps", "equal steps")):
        deltas = [r["auto"]["mean_dice"] - r[key]["mean_dice"] for r in runs if key in r]
        if deltas:
            each = ", ".join(f"{d:+.3f}" for d in deltas)
            lines.append(f"- auto - reference, {label}: {_mean_std(deltas)} ({each})")
    ratios = [r["auto"]["wall"] / r["reference_steps"]["wall"] for r in runs if "reference_steps" in r]
    if ratios:
        each = ", ".join(f"{x:.2f}" for x in ratios)
        lines.append(f"- end to end at equal steps, wall time auto / reference: {_mean_std(ratios)} ({each})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: the comparison over ``--seeds``; JSON to ``--out``, table to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.auto_vs_reference", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--split-file", type=Path, default=None, help="default ROOT/splits.json")
    parser.add_argument("--seconds", type=float, default=180.0, help="the reference's training wall time")
    parser.add_argument(
        "--margin",
        type=float,
        default=15.0,
        help="seconds of unetseg's process outside fit (start-up, plan, test) not in max_time",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-equal-steps", action="store_true", help="skip the equal-steps reference runs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/auto_vs_reference"))
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "auto_vs_reference.json"
    )
    parser.add_argument("extra", nargs="*", help="extra train.py arguments (after --)")
    args = parser.parse_args(argv)
    split = args.split_file or args.root / "splits.json"
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        run: dict[str, Any] = {"seed": seed}
        run["reference"] = reference(
            args.root, split, seed, args.workdir / f"ref_seed{seed}", args.seconds, None
        )
        run["auto"] = auto(args.root, split, seed, args.workdir, args.seconds - args.margin, args.extra)
        if not args.no_equal_steps:
            run["reference_steps"] = reference(
                args.root, split, seed, args.workdir / f"ref_steps_seed{seed}", None, run["auto"]["steps"]
            )
        runs.append(run)
        print(json.dumps(run), flush=True)
    import os
    import platform

    result = {
        "command": " ".join(["python -m benchmarks.auto_vs_reference", *(argv or sys.argv[1:])]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "table": table(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
