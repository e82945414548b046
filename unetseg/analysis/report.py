"""Tables, paired tests and figures of an ablation: ``results.csv``, ``results.md`` and PNGs.

* ``results.csv``: one row per finished run: grid values, seed, parameter counts (total and per part), fit
  time, best epoch, test loss and Dice/IoU (mean and per class).
* ``results.md``: per variant mean +- sample std over seeds, parameters, change vs the baseline variant, and
  pairwise comparisons (mean difference over common seeds, paired t-test p-value, whether the mean +- std
  intervals overlap), with a note for every pair whose spreads overlap.
* ``metric_by_variant.png`` (metric per variant, one dot per seed, mean +- std), ``val_curves.png``
  (validation Dice per epoch, mean over seeds and min-max band), ``gradflow.png`` (gradient-flow heat maps of
  the first seed of each variant, when recorded) and ``gradflow_profile.png`` (their medians per layer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unetseg.analysis.gradflow import plot_gradflow, plot_gradflow_profile
from unetseg.analysis.grid import AblationGrid, format_value
from unetseg.analysis.plotting import pyplot, save_figure
from unetseg.analysis.runs import Run, read_marker

SIGNIFICANCE = 0.05
POWER = 0.8


def collect(grid: AblationGrid, runs: Sequence[Run], out_dir: Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """One row per finished run (plan order) and the markers by run id."""
    short = grid.short_names()
    rows, markers = [], {}
    for run in runs:
        marker = read_marker(out_dir, run.id)
        if marker is None:
            continue
        markers[run.id] = marker
        row: dict[str, Any] = {"run": run.id, "variant": run.variant, "seed": run.seed}
        row |= {short[k]: format_value(v) for k, v in run.values.items()}
        row["matched"] = run.matched
        if run.width:
            row["widths"] = format_value(run.width.get("widths"))
        row |= {f"params_{part}": n for part, n in marker["params"].items()}
        row |= {k: marker.get(k) for k in ("fit_time_s", "wall_time_s", "epochs", "best_epoch")}
        row |= {k: v for k, v in marker["test"].items()}
        rows.append(row)
    return pd.DataFrame(rows), markers


def _variants(runs: Sequence[Run]) -> list[str]:
    """The variant names in plan order."""
    return list(dict.fromkeys(r.variant for r in runs))


def _mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for one value)."""
    values = values.dropna().astype(float)
    if values.empty:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate_over_seeds(frame: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """Per variant (given order): runs, mean/std over seeds of every test metric, parameters, best epoch and
    fit time; one row per variant with finished runs."""
    test_cols = [c for c in frame.columns if c.startswith("test/")]
    rows = []
    for variant in variants:
        part = frame[frame["variant"] == variant]
        if part.empty:
            continue
        row: dict[str, Any] = {"variant": variant, "runs": len(part)}
        for col in test_cols:
            row[f"{col}:mean"], row[f"{col}:std"] = _mean_std(part[col])
        for col in [c for c in part.columns if c.startswith("params_")]:
            row[col] = int(part[col].iloc[0])
        row["best_epoch:mean"] = float(part["best_epoch"].astype(float).mean())
        row["fit_time_s:mean"] = float(part["fit_time_s"].astype(float).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_for_power(
    diff_mean: float, diff_std: float, alpha: float = SIGNIFICANCE, power: float = POWER
) -> float:
    """Seeds a paired comparison needs to find ``diff_mean`` significant (two-sided ``alpha``) with
    probability ``power``, if ``diff_mean`` and ``diff_std`` (of the per-seed differences) were the true
    values: ``((z(1 - alpha/2) + z(power)) * diff_std / |diff_mean|)^2`` rounded up (normal approximation);
    ``inf`` for a zero difference, 2 (the fewest a t-test takes) when the differences do not vary.

    >>> seeds_for_power(0.01, 0.01)  # (1.96 + 0.84)^2 = 7.85
    8.0
    """
    from scipy import stats

    if diff_mean == 0 or math.isnan(diff_mean) or math.isnan(diff_std):
        return math.inf if diff_mean == 0 else math.nan
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return float(max(2, math.ceil((z * diff_std / abs(diff_mean)) ** 2)))


def pairwise(frame: pd.DataFrame, variants: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """Every pair of variants: mean and std of the per-seed difference (common seeds), its 95% confidence
    half-width (t distribution), paired t-test p-value, the seeds a test at 80% power would need if the
    observed difference were true (:func:`seeds_for_power`), and whether the mean +- std intervals of the two
    variants overlap."""
    by_variant = {v: frame[frame["variant"] == v].set_index("seed")[metric].astype(float) for v in variants}
    out = []
    for i, a in enumerate(variants):
        for b in variants[i + 1 :]:
            xa, xb = by_variant[a].dropna(), by_variant[b].dropna()
            if not xa.empty and not xb.empty:
                out.append({"a": a, "b": b, **_compare(xa, xb)})
    return out


def _compare(xa: pd.Series, xb: pd.Series) -> dict[str, Any]:
    """The statistics of one pair (values indexed by seed) that :func:`pairwise` reports."""
    from scipy import stats

    seeds = sorted(set(xa.index) & set(xb.index))
    diff = (xa.loc[seeds] - xb.loc[seeds]).to_numpy() if seeds else np.array([])
    p = math.nan
    if len(seeds) >= 2 and np.ptp(diff) > 0:
        p = float(stats.ttest_rel(xa.loc[seeds], xb.loc[seeds]).pvalue)
    elif len(seeds) >= 2:  # identical differences: the t statistic is infinite unless all are 0
        p = 1.0 if np.all(diff == 0) else 0.0
    diff_mean = float(diff.mean()) if len(diff) else math.nan
    diff_std = ci95 = seeds_needed = math.nan
    if len(seeds) >= 2:
        diff_std = float(diff.std(ddof=1))
        ci95 = float(stats.t.ppf(0.975, len(seeds) - 1)) * diff_std / math.sqrt(len(seeds))
        seeds_needed = seeds_for_power(diff_mean, diff_std)
    (ma, sa), (mb, sb) = _mean_std(xa), _mean_std(xb)
    sa, sb = (0.0 if math.isnan(s) else s for s in (sa, sb))
    return {
        "seeds": len(seeds),
        "diff_mean": diff_mean,
        "diff_std": diff_std,
        "p": p,
        "ci95": ci95,
        "seeds_for_power": seeds_needed,
        "overlap": (ma - sa) <= (mb + sb) and (mb - sb) <= (ma + sa),
    }


def _ci(pair: dict[str, Any]) -> str:
    """The 95% confidence interval of a pair's difference as ``[lo, hi]``; ``–`` when undefined."""
    if math.isnan(pair["ci95"]):
        return "–"
    return f"[{pair['diff_mean'] - pair['ci95']:+.4f}, {pair['diff_mean'] + pair['ci95']:+.4f}]"


def _class_names(frame: pd.DataFrame, metric: str) -> list[str]:
    prefix = f"{metric}/"
    return [c[len(prefix) :] for c in frame.columns if c.startswith(prefix)]


def markdown(
    grid: AblationGrid,
    runs: Sequence[Run],
    frame: pd.DataFrame,
    elapsed_s: float | None = None,
    jobs: int = 1,
    figures: Sequence[str] = (),
) -> str:
    """The text of ``results.md``."""
    metric = grid.metric
    variants = _variants(runs)
    summary = aggregate_over_seeds(frame, variants)
    lines = [f"# Ablation `{grid.name}`", "", *_overview(grid, runs, frame, elapsed_s, jobs)]
    lines += ["", f"## Results (`{metric}`, mean ± std over seeds)", ""]
    if summary.empty:
        return "\n".join([*lines, "No run has finished yet."]) + "\n"
    lines += _results_table(
        summary, metric, _class_names(frame, metric), {r.variant: r.baseline for r in runs}
    )
    matched = [r for r in runs if r.matched and r.seed == grid.seeds[0]]
    if matched:
        lines += ["", "Parameter-matched variants (widths scaled to the baseline's parameter count):", ""]
        lines += [
            f"- `{r.variant}`: `{r.width['argument']}={r.width['widths']}` "
            f"(x{r.width['multiplier']}), {r.params['total']:,} parameters vs baseline `{r.baseline}`"
            for r in matched
        ]
    means = dict(zip(summary["variant"], summary[f"{metric}:mean"], strict=True))
    pairs = pairwise(frame, [v for v in variants if v in means], metric)
    if pairs:
        lines += ["", f"## Pairwise comparisons (`{metric}`)", "", *_pairwise_table(pairs)]
        lines += ["", "### Notes", "", *_notes(pairs, means)]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _overview(
    grid: AblationGrid, runs: Sequence[Run], frame: pd.DataFrame, elapsed_s: float | None, jobs: int
) -> list[str]:
    """The lines under the title: grid, runs finished, configs, fixed settings and time spent."""
    lines = [
        f"Grid file `{grid.source}`; {len(_variants(runs))} variants x {len(grid.seeds)} seeds {grid.seeds}; "
        f"{len(frame)} of {len(runs)} runs finished."
    ]
    if grid.configs:
        lines.append(
            f"Training configs: {', '.join(f'`{c}`' for c in grid.configs)} (on `configs/unet_skip.yaml`)."
        )
    if grid.args:
        lines.append(
            "Fixed settings: " + ", ".join(f"`{k}={format_value(v)}`" for k, v in grid.args.items()) + "."
        )
    if len(frame):
        total_fit = frame["fit_time_s"].astype(float).sum()
        total_wall = frame["wall_time_s"].astype(float).sum()
        text = f"Sum over runs: fit {_duration(total_fit)}, fit + test {_duration(total_wall)}"
        if elapsed_s is not None:
            text += f"; this invocation took {_duration(elapsed_s)} wall clock with --jobs {jobs}"
        lines.append(text + ".")
    return lines


def _results_table(
    summary: pd.DataFrame, metric: str, classes: Sequence[str], baseline_of: dict[str, str | None]
) -> list[str]:
    """One row per variant: runs, parameters, metric, change vs baseline, IoU, per class, epochs, time."""
    iou = metric.replace("dice", "iou") if "dice" in metric else None
    with_iou = bool(iou) and f"{iou}:mean" in summary
    header = ["variant", "runs", "params", "skip params", metric, "Δ vs baseline"]
    header += ([iou] if with_iou else []) + list(classes) + ["best epoch", "fit time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    means = dict(zip(summary["variant"], summary[f"{metric}:mean"], strict=True))
    for _, row in summary.iterrows():
        base = baseline_of.get(row["variant"])
        if base is None or base not in means or base == row["variant"]:
            delta = "baseline" if base == row["variant"] else "–"
        else:
            delta = f"{100 * (row[f'{metric}:mean'] - means[base]) / means[base]:+.1f}%"
        cells = [
            f"`{row['variant']}`",
            str(row["runs"]),
            f"{row.get('params_total', math.nan):,.0f}",
            f"{row.get('params_skips', math.nan):,.0f}" if "params_skips" in row else "–",
            _pm(row[f"{metric}:mean"], row[f"{metric}:std"]),
            delta,
        ]
        if with_iou:
            cells.append(_pm(row[f"{iou}:mean"], row[f"{iou}:std"]))
        cells += [_pm(row[f"{metric}/{c}:mean"], row[f"{metric}/{c}:std"], 3) for c in classes]
        cells += [f"{row['best_epoch:mean']:.1f}", f"{row['fit_time_s:mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pairwise_table(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """What the comparisons mean, then one row per pair of variants."""
    lines = [
        "Difference A − B over the seeds both have (same seed = same data order and init seed), its 95% "
        "confidence interval, the paired t-test p-value, the seeds a paired test would need to find the "
        f"observed difference significant with {POWER:.0%} power (if it were the true one), and whether "
        "the mean ± std intervals overlap.",
        "",
        "| A | B | seeds | A − B (mean ± std) | 95% CI of A − B | paired t-test p | seeds for "
        f"{POWER:.0%} power | mean ± std overlap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        pval = "–" if math.isnan(p["p"]) else f"{p['p']:.3g}"
        need = p["seeds_for_power"]
        need_text = "–" if math.isnan(need) else "∞" if math.isinf(need) else f"{need:,.0f}"
        lines.append(
            f"| `{p['a']}` | `{p['b']}` | {p['seeds']} | {_pm(p['diff_mean'], p['diff_std'])} | {_ci(p)} | "
            f"{pval} | {need_text} | {'yes' if p['overlap'] else 'no'} |"
        )
    return lines


def _notes(pairs: Sequence[dict[str, Any]], means: dict[str, float]) -> list[str]:
    """Ordering by mean, overlapping pairs, the count of significant pairs and why the others are not."""
    ordered = sorted(means, key=lambda v: -means[v])
    lines = ["Ordering by mean: " + " > ".join(f"`{v}`" for v in ordered) + "."]
    overlapping = [p for p in pairs if p["overlap"]]
    significant = [p for p in pairs if not math.isnan(p["p"]) and p["p"] < SIGNIFICANCE]
    lines += [
        f"- `{p['a']}` and `{p['b']}`: the mean ± std intervals overlap; the difference "
        f"({p['diff_mean']:+.4f}) is within the seed spread."
        for p in overlapping
    ]
    text = f"- Pairs with p < {SIGNIFICANCE} (paired t-test): {len(significant)} of {len(pairs)}"
    if len(pairs) > 1:
        bonferroni = SIGNIFICANCE / len(pairs)
        strict = [p for p in significant if p["p"] < bonferroni]
        text += f"; with p < {bonferroni:.2g} (Bonferroni, {len(pairs)} comparisons): {len(strict)}"
    lines.append(f"{text}; overlapping mean ± std intervals: {len(overlapping)}.")
    for p in pairs:
        if p in significant or math.isnan(p["ci95"]):
            continue
        need = p["seeds_for_power"]
        if math.isinf(need):
            tail = "the observed difference is 0, which no number of seeds makes significant."
        else:
            tail = (
                f"finding the observed {p['diff_mean']:+.4f} significant would take about "
                f"{need:,.0f} seeds ({POWER:.0%} power)."
            )
        lines.append(
            f"- `{p['a']}` vs `{p['b']}` is not significant: the 95% confidence interval of the "
            f"difference is {_ci(p)}; {tail}"
        )
    return lines


def plot_metric(frame: pd.DataFrame, variants: Sequence[str], metric: str, path: Path) -> Path:
    """Metric per variant: one dot per seed, mean +- std bar; one panel for the mean and one per class."""
    plt = pyplot()
    panels = [metric] + [f"{metric}/{c}" for c in _class_names(frame, metric)]
    variants = [v for v in variants if (frame["variant"] == v).any()]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(2.2 + 0.55 * len(variants) * len(panels), 4.2),
        squeeze=False,
        constrained_layout=True,
    )
    rng = np.random.default_rng(0)
    for ax, col in zip(axes[0], panels, strict=True):
        for x, variant in enumerate(variants):
            values = frame.loc[frame["variant"] == variant, col].astype(float).dropna().to_numpy()
            if not len(values):
                continue
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.7, color=f"C{x % 10}")
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar(x + 0.28, values.mean(), yerr=std, fmt="o", color="k", capsize=3, markersize=4)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=60, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_val_curves(markers: dict[str, dict], runs: Sequence[Run], path: Path, key: str = "val/dice") -> Path:
    """Validation ``key`` per epoch for each variant: mean over seeds (line) and min-max over seeds (band)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    variants = _variants(runs)
    for i, variant in enumerate(variants):
        curves = [
            {int(row["epoch"]): row[key] for row in markers[r.id]["val_curve"] if key in row}
            for r in runs
            if r.variant == variant and r.id in markers
        ]
        curves = [c for c in curves if c]
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[e] for e in epochs] for c in curves])
        ax.plot(epochs, values.mean(0), label=variant, color=f"C{i % 10}")
        ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.15, color=f"C{i % 10}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_report(
    grid: AblationGrid, runs: Sequence[Run], out_dir: Path, elapsed_s: float | None = None, jobs: int = 1
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and the figures into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, markers = collect(grid, runs, out_dir)
    paths: dict[str, Path] = {"csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    frame.to_csv(paths["csv"], index=False)
    variants = _variants(runs)
    figures: list[str] = []
    if not frame.empty:
        paths["metric_png"] = plot_metric(frame, variants, grid.metric, out_dir / "metric_by_variant.png")
        paths["curves_png"] = plot_val_curves(markers, runs, out_dir / "val_curves.png")
        figures += [paths["metric_png"].name, paths["curves_png"].name]
        flows = _gradflow_records(runs, markers)
        if flows:
            paths["gradflow_png"] = plot_gradflow(flows, out_dir / "gradflow.png")
            paths["gradflow_profile_png"] = plot_gradflow_profile(flows, out_dir / "gradflow_profile.png")
            figures += [paths["gradflow_png"].name, paths["gradflow_profile_png"].name]
    paths["md"].write_text(markdown(grid, runs, frame, elapsed_s, jobs, figures))
    return paths


def _gradflow_records(runs: Sequence[Run], markers: dict[str, dict]) -> list[tuple[str, list[dict]]]:
    """``(label, gradient-flow records)`` of the first finished seed of each variant that recorded them."""
    flows = []
    for variant in _variants(runs):
        first = next((r for r in runs if r.variant == variant and r.id in markers), None)
        if first is None:
            continue
        records = Path(markers[first.id]["log_dir"]) / "gradflow.json"
        if records.is_file():
            flows.append((f"{variant} (seed {first.seed})", json.loads(records.read_text())))
    return flows
