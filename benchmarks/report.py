"""Render the README tables of the overhead, models, FLOP/s, memory and GPU benchmarks from their JSON.

``python -m benchmarks.report`` rewrites, in ``benchmarks/README.md``, only the text between the markers
``<!-- report:NAME:begin -->`` and ``<!-- report:NAME:end -->`` of each section it renders (a missing section
is appended), so that the sections other scripts' authors write by hand stay as they are. A result file that
does not exist yet renders as a line saying so.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR

README = Path(__file__).resolve().parent / "README.md"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(r: dict[str, float]) -> str:
    """``1.023 (IQR 1.010-1.041)``."""
    return f"{r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def machine_line(payload: dict[str, Any]) -> str:
    """One line: machine, versions, threads, date, load average and the command that produced the figures."""
    m = payload["machine"]
    load = "/".join(str(v) for v in m.get("load_average_start", []))
    load_end = "/".join(str(v) for v in m.get("load_average_end", []))
    return (
        f"_{m['cpu']} ({m['logical_cores']} cores, {', '.join(m.get('cpu_flags', []))}), "
        f"{m['torch_threads']} torch thread(s); torch {m['torch']}, lightning {m['lightning']}, "
        f"monai {m['monai']}; {m['date']}; load average {load} at start, {load_end} at end. "
        f"Command: `{payload['command']}`_"
    )


def render_framework_overhead(p: dict[str, Any]) -> list[str]:
    r = p["results"]
    c = r["config"]
    t, s, ratios = r["epoch_times"], r["step_times"], r["ratios"]
    met = "**met**" if r["target"]["met"] else "**not met**"
    lines = [
        f"{c['net']}, batch {c['batch_size']} at {c['spatial_size']}x{c['spatial_size']}, "
        f"{c['steps_per_epoch']} steps per epoch, {c['timed_epochs']} timed epochs (+1 warm-up), precision "
        f"{c['precision']}; trainer callbacks {', '.join(c['callbacks'])}; loggers "
        f"{', '.join(c['loggers'])}; log_every_n_steps {c['log_every_n_steps']}; checkpoint "
        f"{c['checkpoint_mib']} MiB written every epoch.",
        "",
        *_table(
            ["", "Trainer (unetseg)", "plain loop", "plain loop + same metrics"],
            [
                [
                    "median step, ms (inside epochs)",
                    _ms(s["trainer"]["median_s"]),
                    _ms(s["plain"]["median_s"]),
                    _ms(s["plain_metrics"]["median_s"]),
                ],
                [
                    "median epoch, s",
                    f"{t['trainer']['median_s']:.2f}",
                    f"{t['plain']['median_s']:.2f}",
                    f"{t['plain_metrics']['median_s']:.2f}",
                ],
            ],
        ),
        "",
        *_table(
            ["ratio", "median (IQR)"],
            [
                [
                    f"**Trainer / plain loop**, epoch sums (target <= {r['target']['trainer_vs_plain_max']}: "
                    f"{met})",
                    _ratio(ratios["trainer_vs_plain"]),
                ],
                [
                    "Trainer / plain loop + same metrics (Lightning alone)",
                    _ratio(ratios["trainer_vs_plain_metrics"]),
                ],
                [
                    "plain + metrics / plain (the training Dice/IoU update)",
                    _ratio(ratios["plain_metrics_vs_plain"]),
                ],
                *[
                    [f"per step, {kind.replace('_', ' ')} steps ({v['n']})", _ratio(v)]
                    for kind, v in r["step_kinds_vs_plain"].items()
                ],
                ["overhead, ms per step (epoch sums)", f"{r['overhead_ms_per_step']:.1f}"],
                ["epoch-end work (checkpoint, metric compute/log), ms", f"{r['epoch_end_ms']:.1f}"],
            ],
        ),  # fmt: skip
    ]
    parts = r.get("components_ms")
    if parts:
        lines += [
            "",
            "Pieces, measured alone on this batch shape (median ms per call):",
            "",
            *_table(list(parts), [[f"{v:.2f}" for v in parts.values()]]),
        ]
    return lines


def render_models(p: dict[str, Any]) -> list[str]:
    r = p["results"]
    inp = r["input"]
    lines = [
        f"Step: {r['step']}; batch {inp['batch']} x {inp['in_channels']} x {inp['size'][0]} x "
        f"{inp['size'][1]}, {inp['classes']} classes. GFLOP = conv/matmul FLOPs of the step "
        "(`FlopCounterMode`). Ratios: medians of per-repetition ratios to the first row (IQR in the JSON).",
        "",
        f"smp: {r['smp']}.",
        "",
    ]
    for title, block in (("Frameworks", r["frameworks"]), ("Skip modes (unetseg UNet)", r["skips"])):
        ref = block["reference"]
        rows = []
        for name, m in block["models"].items():
            ratio = {
                prec: block["ratios"][prec].get(name) for prec in ("32", "bf16-mixed")
            }  # None for the reference row
            rows.append(
                [
                    f"`{name}`",
                    f"{m['params']:,}",
                    f"{m['gflop_per_step']:.2f}",
                    _ms(m["32"]["median_s"]),
                    _ms(m["bf16-mixed"]["median_s"]),
                    f"{m['32']['gflop_per_s']:.1f} / {m['bf16-mixed']['gflop_per_s']:.1f}",
                    "1"
                    if ratio["32"] is None
                    else f"{ratio['32']['time']['median']:.3f} / {ratio['bf16-mixed']['time']['median']:.3f}",
                    "1"
                    if ratio["32"] is None
                    else f"{ratio['32']['time_per_flop']['median']:.3f} / "
                    f"{ratio['bf16-mixed']['time_per_flop']['median']:.3f}",
                ]
            )
        lines += [
            f"**{title}** (reference `{ref}`):",
            "",
            *_table(
                [
                    "model",
                    "params",
                    "GFLOP/step",
                    "fp32 ms",
                    "bf16 ms",
                    "GFLOP/s fp32 / bf16",
                    f"time vs `{ref}` fp32 / bf16",
                    f"time per FLOP vs `{ref}` fp32 / bf16",
                ],
                rows,
            ),
            "",
        ]
        lines += [f"- `{name}`: {m['description']}" for name, m in block["models"].items()] + [""]
    target = r["target"]
    pair = target["time_per_flop"]["unetseg_vs_monai_basicunet"]
    met = "**met**" if target["met"] else "**not met**"
    lines.append(
        "Target (unetseg no slower than MONAI BasicUNet per FLOP, matched config): time per FLOP of "
        f"unetseg / BasicUNet = {_ratio(pair['32'])} fp32, {_ratio(pair['bf16-mixed'])} bf16; {met} "
        "(rule: the lower quartile of the ratio is <= 1, i.e. no measurable slowdown)."
    )
    return lines


def render_flops(p: dict[str, Any]) -> list[str]:
    r = p["results"]
    peak = r["peak"]
    ref = r.get("issue_reference_ms", {})
    lines = [
        f"{r['model']}; step: {r['step']}. Peak: {peak['conv']}: **bf16 {peak['bf16']['gflop_per_s']:.0f} "
        f"GFLOP/s** ({peak['bf16']['best_layout']}), fp32 {peak['fp32']['gflop_per_s']:.0f} GFLOP/s "
        f"({peak['fp32']['best_layout']}).",
        "",
    ]
    for size, res in r["sizes"].items():
        rows = []
        for name, v in res["variants"].items():
            vs = res["ratios_vs_fp32"].get(name)
            rows.append(
                [
                    f"`{name}`",
                    _ms(v["median_s"]),
                    f"{v['images_per_s']:.1f}",
                    "1" if vs is None else f"{vs['median']:.3f}",
                    f"{v['gflop_per_s']:.1f}",
                    f"{v['fraction_of_peak']:.0%}",
                    f"{v['fraction_of_bf16_peak']:.0%}",
                    f"{v['first_call_s']:.1f}",
                    f"{ref[name]:.0f}" if name in ref else "-",
                ]
            )
        lines += [
            f"Batch {res['batch']} at {size}x{size}, {res['gflop_per_step']:.1f} GFLOP per step:",
            "",
            *_table(
                [
                    "variant",
                    "ms/step",
                    "images/s",
                    "time vs fp32",
                    "GFLOP/s",
                    "of own dtype's peak",
                    "of bf16 peak",
                    "first call, s",
                    "issue's plain-PyTorch ms",
                ],
                rows,
            ),
            "",
        ]
    return lines


def render_memory(p: dict[str, Any]) -> list[str]:
    r = p["results"]
    runs = r["runs"]
    scales = sorted({run["scale"] for run in runs})
    rows = []
    for key in r["growth_vs_1x"]:
        cells = []
        for s in scales:
            run = next(
                (x for x in runs if x["scale"] == s and "/".join((x["source"], x.get("cache", "-"))) == key),
                None,
            )
            cells.append(
                "-"
                if run is None
                else f"+{run['growth_mib']:.0f} (peak {run['peak_rss_mib']:.0f}, {run['epoch_s']:.1f} s)"
            )
        rows.append([f"`{key}`", *cells])
    shape = "x".join(str(v) for v in r["volume_shape"])
    base = min((x["cases"] for x in runs if x["source"] == "nifti"), default=0)
    return [
        f"NIfTI cases of {shape} voxels ({r['case_in_memory_mib']:.2f} MiB each once loaded: float32 image + "
        f"int64 label); scale 1x = {base} cases. "
        "Cells: RSS growth over the baseline after imports, MiB (peak RSS, one-epoch time).",
        "",
        *_table(["source / cache", *[f"{s}x" for s in scales]], rows),
    ]


def render_gpu(p: dict[str, Any] | None) -> list[str]:
    if p is None:
        return [
            "No GPU was available in this session (the `device` tool lent none: `can_start_another=false`), "
            "so there are no GPU figures. `python -m benchmarks.flops --device cuda` measures them: images/s "
            "at 256x256 and 512x512 for fp32, bf16-mixed, + channels_last and + `torch.compile`, and the "
            "fraction of the GPU's measured bf16 conv peak (written to `results/flops_cuda.json`; `python -m "
            "benchmarks.models --device cuda` compares the models on the GPU).",
        ]
    return [f"GPU: {p['machine'].get('gpu', '?')}.", "", *render_flops(p)]


SECTIONS: dict[str, tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = {
    "framework_overhead": (
        "Framework overhead (`benchmarks/framework_overhead.py`)",
        "framework_overhead.json",
        render_framework_overhead,
    ),
    "models": ("Model efficiency (`benchmarks/models.py`)", "models.json", render_models),
    "flops": ("Precision, layout and FLOP/s (`benchmarks/flops.py`)", "flops.json", render_flops),
    "memory": ("Memory (`benchmarks/memory.py`)", "memory.json", render_memory),
}


def render(name: str, results_dir: Path, quick: bool = False) -> list[str]:
    """The generated lines of section ``name`` (tables, machine line) from its result file."""
    ending = ".quick.json" if quick else ".json"
    if name == "gpu":
        path = results_dir / f"flops_cuda{ending}"
        payload = json.loads(path.read_text()) if path.is_file() else None
        return render_gpu(payload) + ([] if payload is None else ["", machine_line(payload)])
    _, filename, fn = SECTIONS[name]
    path = results_dir / filename.replace(".json", ending)
    if not path.is_file():
        return [f"_No result yet: run `python -m benchmarks.{name}`._"]
    payload = json.loads(path.read_text())
    return [*fn(payload), "", machine_line(payload)]


def update_readme(readme: Path, results_dir: Path, names: Sequence[str], quick: bool = False) -> str:
    """Replace (or append) the generated part of each section in ``readme``; return the new text."""
    text = readme.read_text() if readme.is_file() else "# Benchmarks\n"
    for name in names:
        begin, end = f"<!-- report:{name}:begin -->", f"<!-- report:{name}:end -->"
        body = "\n".join([begin, *render(name, results_dir, quick), end])
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _, body=body: body, text)
        else:
            title = SECTIONS[name][0] if name in SECTIONS else "GPU"
            text = text.rstrip("\n") + f"\n\n## {title}\n\n{body}\n"
    readme.write_text(text if text.endswith("\n") else text + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument("--readme", type=Path, default=README, help="the README to update")
    parser.add_argument("--quick", action="store_true", help="render the <name>.quick.json smoke results")
    parser.add_argument("names", nargs="*", default=[*SECTIONS, "gpu"], help="sections, default all")
    args = parser.parse_args(argv)
    update_readme(args.readme, args.results, args.names, args.quick)


if __name__ == "__main__":
    main()
