"""Plan a dataset folder and write the plan as a YAML config overlay, reasons as comments.

>>> path = plan_dataset("/data/Task04_Hippocampus", output="plan.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

from unetseg.data.formats import Case, DatasetSpec, detect_layout, validate
from unetseg.data.splits import read_split_file
from unetseg.plan.fingerprint import Fingerprint, dataset_fingerprint
from unetseg.plan.rules import Plan, make_plan


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style for lists and dicts)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def _render_node(node: dict[str, Any], prefix: str, reasons: dict[str, str], depth: int) -> list[str]:
    """YAML lines of one nesting level; leaves carry their reason as a comment."""
    lines = []
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in reasons:
            lines.append(f"{'  ' * depth}{name}:")
            lines += _render_node(value, f"{key}.", reasons, depth + 1)
        else:
            lines.append(f"{'  ' * depth}{name}: {_scalar(value)}  # {reasons[key]}")
    return lines


def render(plan: Plan, header: list[str]) -> str:
    """The plan as YAML text: nested keys, each planned value followed by its reason as a comment."""
    reasons = {choice.key: choice.reason for choice in plan.choices}
    lines = [f"# {line}" if line else "#" for line in header]
    return "\n".join(lines + _render_node(plan.overlay(), "", reasons, 0)) + "\n"


def _planned_cases(spec: DatasetSpec, split_file: str | None) -> list[Case]:
    """Training cases to plan from: train + val of the split file when one is given, else all of them."""
    if split_file is None:
        return list(spec.cases_train)
    splits = read_split_file(split_file, [c.case_id for c in spec.cases_train])
    keep = set(splits["train"]) | set(splits["val"])
    return [c for c in spec.cases_train if c.case_id in keep]


def _header(spec: DatasetSpec, fp: Fingerprint, gpu: bool) -> list[str]:
    """Comment lines above the plan: where it comes from and what the data look like."""
    shares = ", ".join(
        f"{name} {share:.1%}"
        for name, share in zip(fp.class_names[1:], fp.foreground_fraction()[1:], strict=True)
    )
    return [
        f"Planned by `python -m unetseg.plan` for {spec.root} ({spec.layout}, {fp.num_cases} training cases)",
        f"on {datetime.date.today().isoformat()} for a machine {'with' if gpu else 'without'} a GPU.",
        f"Median shape {fp.median_shape}, median spacing {fp.median_spacing}; channels {fp.channel_names}.",
        f"Classes (share of the foreground voxels): {shares}.",
        "An overlay on unet_skip.yaml: every value can be overridden on the command line as usual.",
        "",
    ]


def plan_dataset(
    root: str | Path, output: str | Path, split_file: str | None = None, gpu: bool | None = None
) -> Path:
    """Fingerprint the dataset at ``root``, plan it and write the overlay to ``output``; returns the path."""
    spec = validate(detect_layout(root))
    cases = _planned_cases(spec, split_file)
    fp = dataset_fingerprint(spec, cases)
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    plan = make_plan(fp, gpu=gpu)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(plan, _header(spec, fp, gpu)))
    return output
