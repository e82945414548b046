"""Shared benchmark helpers: interleaved A/B timing, ratios, FLOP counts, peak RSS, machine info, JSON output.

The machines these run on are shared and noisy, so every comparison is made *inside one process*: the
variants run one after the other in each repetition (the order alternates between repetitions so that neither
always runs first), and the figure reported is the **median over repetitions of the per-repetition ratio**
``time(variant) / time(baseline)``; load that changes between repetitions hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that matter for these benchmarks (AVX-512, bf16, AMX), from ``/proc/cpuinfo``."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    """``module.__version__``, or ``None`` when the module is not importable."""
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - a broken optional install must not end a benchmark
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, library versions, thread count, date and load average, recorded in every result file."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "torchmetrics": _version("torchmetrics"),
        "monai": _version("monai"),
        "numpy": _version("numpy"),
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mib() -> float:
    """Current resident set size of this process, MiB (``/proc/self/statm``; the peak where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that wall-clock times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` times, the variants alternating within each repetition.

    Every function first runs ``warmup`` times (not timed). Repetition ``i`` runs the variants in the given
    order when ``i`` is even and in reverse when odd, so each variant is as often first as last.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, minimum and count of a list of times (seconds)."""
    values = sorted(times)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {
        "median_s": statistics.median(values),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": values[0],
        "n": len(values),
    }


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median and quartiles of the per-repetition ratios ``numerator[i] / denominator[i]``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratios need equal, non-empty lengths, got {len(numerator)}/{len(denominator)}")
    values = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "n": len(values)}


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (a multiply-add counts 2), by ``FlopCounterMode``.

    The counter covers matmuls and convolutions (forward and backward); elementwise ops, norms and the loss
    are not counted, so achieved FLOP/s figures are conv/matmul FLOP/s.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def autocast(device: str | torch.device, precision: str) -> Any:
    """The autocast context of a Lightning-style precision name: ``"32"`` (off) or ``"bf16-mixed"``."""
    if precision not in ("32", "bf16-mixed"):
        raise ValueError(f"precision={precision!r} is not one of ['32', 'bf16-mixed']")
    return torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"
    )


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: ``--quick``, ``--threads``, ``--device``, ``--out``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run in seconds (tests call it); not a measurement"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steadier on a shared machine; the JSON records it)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="folder for the JSON result (default benchmarks/results; --quick writes <name>.quick.json)",
    )
    return parser


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply ``--threads`` and the seed, check ``--device``; return the machine info to record."""
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads}: must be >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available (torch {torch.__version__})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return machine_info(args.device)


def _check_numbers(value: Any, where: str) -> None:
    """Raise ``ValueError`` on NaN or infinite floats anywhere in a JSON-like structure."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}: benchmark results must be finite")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_numbers(item, f"{where}[{i}]")


def write_result(
    name: str,
    args: argparse.Namespace,
    machine: dict[str, Any],
    results: dict[str, Any],
    stem: str | None = None,
) -> Path:
    """Write ``{benchmark, quick, command, machine, results}`` to ``<out>/<stem or name>[.quick].json``."""
    _check_numbers(results, "results")
    machine = {**machine, "load_average_end": load_average()}
    argv = getattr(args, "argv", [])
    payload = {
        "benchmark": name,
        "quick": bool(args.quick),
        "command": shlex.join(["python", "-m", f"benchmarks.{name}", *argv]),
        "machine": machine,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or name
    path = out / (f"{stem}.quick.json" if args.quick else f"{stem}.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when ``None``) and remember it for the recorded command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args
