"""The auto-vs-reference harness's table: per-seed paired differences and the end-to-end wall ratio."""

from benchmarks.auto_vs_reference import paired, table


def _arm(dice: float, wall: float, steps: int = 100) -> dict:
    return {"mean_dice": dice, "dice": {"a": dice, "b": dice}, "steps": steps, "wall": wall}


def test_table_pairs_each_seed_and_reports_the_wall_ratio_at_equal_steps():
    runs = [
        {
            "seed": 0,
            "reference": _arm(0.80, 180),
            "auto": _arm(0.85, 170),
            "reference_steps": _arm(0.81, 200),
        },
        {
            "seed": 1,
            "reference": _arm(0.90, 180),
            "auto": _arm(0.89, 170),
            "reference_steps": _arm(0.87, 100),
        },
    ]
    text = paired(runs)
    assert "equal time: 0.020 ± 0.042 (+0.050, -0.010)" in text
    assert "equal steps: 0.030 ± 0.014 (+0.040, +0.020)" in text
    assert "auto / reference: 1.275 ± 0.601 (0.85, 1.70)" in text
    full = table(runs)
    assert "| auto (equal time) | 100 ± 0 | 170.000 ± 0.000 | 0.870 ± 0.028 |" in full and text in full


def test_paired_skips_the_equal_steps_lines_when_those_runs_were_skipped():
    runs = [{"seed": 0, "reference": _arm(0.80, 180), "auto": _arm(0.85, 170)}]
    assert "equal steps" not in paired(runs) and "+0.050" in paired(runs)


def test_step_cost_times_every_width_and_the_reference():
    from benchmarks.step_cost import WIDTHS, rows

    table = rows(size=(32, 32), batches=[2], steps=1, warmup=0)
    assert len(table) == 1 + len(WIDTHS) and table[0]["net"].startswith("BasicUNet")
    assert all(r["ms_step"] > 0 and abs(r["ms_slice"] * r["batch"] - r["ms_step"]) < 1e-9 for r in table)
