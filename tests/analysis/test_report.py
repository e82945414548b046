"""Ablation report statistics: paired confidence intervals, p-values and the seeds needed for 80% power."""

from __future__ import annotations

import math

import pandas as pd
import pytest


def test_pairwise_confidence_interval_power_and_notes():
    """The report's statistics on hand-made results: a clear difference, a null one and a small noisy one."""
    from scipy import stats

    from unetseg.analysis.report import pairwise, seeds_for_power

    seeds = range(6)
    base = [0.90, 0.92, 0.91, 0.93, 0.89, 0.92]
    shifts = {"a": [0.0] * 6, "b": [-0.10 + 0.002 * (s % 2) for s in seeds], "c": [0.01, -0.01] * 3}
    rows = [
        {"variant": name, "seed": s, "m": base[s] + shift[s]} for name, shift in shifts.items() for s in seeds
    ]
    frame = pd.DataFrame(rows)
    pairs = {(p["a"], p["b"]): p for p in pairwise(frame, ["a", "b", "c"], "m")}
    ab, ac = pairs[("a", "b")], pairs[("a", "c")]
    diff = frame[frame.variant == "a"]["m"].to_numpy() - frame[frame.variant == "b"]["m"].to_numpy()
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert ab["diff_mean"] - ab["ci95"] == pytest.approx(lo)
    assert ab["diff_mean"] + ab["ci95"] == pytest.approx(hi)
    assert ab["p"] < 1e-6 and ab["seeds_for_power"] == 2  # a 0.1 difference with 0.001 spread
    assert ac["diff_mean"] == pytest.approx(0.0, abs=1e-12) and ac["p"] > 0.5
    assert ac["diff_mean"] - ac["ci95"] < 0 < ac["diff_mean"] + ac["ci95"]
    # the power formula: (z_.975 + z_.8)^2 = 7.85 seeds for a difference equal to its spread, 4x for half
    assert seeds_for_power(0.01, 0.01) == 8 and seeds_for_power(-0.005, 0.01) == 32
    assert seeds_for_power(0.0, 0.01) == math.inf
