"""From a dataset fingerprint to a training plan: every planned value with the reason it was chosen.

The rules follow nnU-Net's experiment planner where it applies to a short budget on modest hardware:
median spacing as the target spacing, 2D on slices across the coarsest axis when the data are anisotropic
(or the machine has no GPU, where 3D convolutions cost too many steps), whole slices when they fit the pixel
budget, a UNet deep enough for a 4-8 px bottleneck, a batch sized to the pixel budget, class-aware
oversampling so that a rare class is in some batch every few steps, and an epoch long enough for validation
to stay a small share of the time.

>>> fp = Fingerprint(["background", "a"], ["MRI"], 3, [(80, 96, 40)] * 4, [(1.0, 1.0, 1.0)] * 4,
...                  intensity=[{"mean": 0.0, "std": 1.0}], class_voxels=[900, 100], class_cases=[4, 4],
...                  class_slices=[[80, 80]] * 3,
...                  num_slices=[320, 384, 160], bytes_per_case=1e6)
>>> plan = make_plan(fp, gpu=False)
>>> plan.value("data.spatial_dims"), plan.value("model.net.init_args.channels")
(2, [16, 16, 32, 64, 128])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from unetseg.plan.fingerprint import Fingerprint

ANISOTROPY = 3.0  # max/min spacing ratio above which the data count as anisotropic (nnU-Net)
BOTTLENECK_PX = 4  # downsample while the smallest planned axis stays >= 2 * this
# CPU / GPU pixel (2D) budget of a batch. On CPU a step costs in proportion to its pixels: smaller batches
# make more steps in a short budget (at equal slices seen, batch 8 and 11 of 75x93 tested alike on real MRI)
PIXELS_PER_BATCH = {False: 96 * 96 * 6, True: 256 * 256 * 24}
VOXELS_PER_BATCH = {False: 48**3 * 2, True: 128**3 * 2}
MAX_SLICE_PIXELS = {False: 192 * 192, True: 512 * 512}  # whole slices up to this size, else patches
MAX_CHANNELS = {False: 128, True: 320}
BASE_CHANNELS = {False: 16, True: 32}
MEMORY_CACHE_BYTES = 4 * 2**30  # datasets below this are preloaded (cache: memory)
ZERO_BACKGROUND = 0.25  # median share of all-zero voxels from which non-CT images use non-zero statistics
RARE_SLICE_FRACTION = 0.3  # a class in fewer slices (or cases) than this is rare: oversample more
VAL_SHARE = 0.05  # validation should cost at most about this share of the training time
CPU_STEP_NOTE = "-36% at 75x93, quality unchanged or better on the real-MRI benchmark"
PASSES, MIN_STEPS, MAX_STEPS = 200, 2_000, 100_000  # planned training length


@dataclass
class Choice:
    """One planned config value (a dotted key as on the command line) and why it was chosen."""

    key: str
    value: Any
    reason: str


@dataclass
class Plan:
    """An ordered list of planned values; ``overlay()`` nests them like a YAML config file.

    >>> plan = Plan([Choice("data.batch_size", 8, "pixel budget")])
    >>> plan.overlay()
    {'data': {'batch_size': 8}}
    """

    choices: list[Choice] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, reason: str) -> None:
        """Plan ``key = value`` (replacing an earlier choice of the same key)."""
        self.choices = [c for c in self.choices if c.key != key] + [Choice(key, value, reason)]

    def value(self, key: str) -> Any:
        """The planned value of ``key``; ``KeyError`` naming the planned keys if it was not planned."""
        for choice in self.choices:
            if choice.key == key:
                return choice.value
        raise KeyError(f"{key!r} was not planned; planned: {[c.key for c in self.choices]}")

    def overlay(self) -> dict[str, Any]:
        """The planned values as a nested dict (the structure of a config file)."""
        out: dict[str, Any] = {}
        for choice in self.choices:
            *parents, leaf = choice.key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = choice.value
        return out


def _pow2_floor(value: float) -> int:
    """Largest power of two <= value (at least 1)."""
    return 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))


def _anisotropic_axis(spacing: tuple[float, ...]) -> int | None:
    """The coarse axis when the spacing is anisotropic (max/min > ``ANISOTROPY``), else ``None``."""
    if max(spacing) / min(spacing) > ANISOTROPY:
        return max(range(len(spacing)), key=lambda a: spacing[a])
    return None


def _plan_geometry(plan: Plan, fp: Fingerprint, gpu: bool) -> tuple[int, tuple[int, ...], int]:
    """Dimensionality, slice axis, target spacing; returns (spatial_dims, planned sample size, slice axis)."""
    spacing, shape = fp.median_spacing, fp.median_shape
    coarse = _anisotropic_axis(spacing) if fp.spatial_dims == 3 else None
    if fp.spatial_dims == 2:
        plan.add("data.spatial_dims", 2, "2D images")
        return 2, shape, 2
    if coarse is not None:
        dims, why = (
            2,
            f"anisotropic spacing {spacing} (max/min > {ANISOTROPY:g}): 2D slices across axis {coarse}",
        )
    elif not gpu:
        dims, why = 2, "no GPU: 2D slices make many more training steps than 3D patches in the same time"
    else:
        dims, why = 3, f"near-isotropic spacing {spacing} on a GPU: 3D patches see the volume's context"
    plan.add("data.spatial_dims", dims, why)
    axis = coarse if coarse is not None else 2
    if dims == 2:
        plan.add("data.slice_axis", axis, "across the coarsest axis" if coarse is not None else "axial (Z)")
        in_plane = tuple(s for a, s in enumerate(shape) if a != axis)
        return 2, in_plane, axis
    return 3, shape, axis


def _plan_spacing(plan: Plan, fp: Fingerprint) -> None:
    """Target spacing: the median, only when the cases disagree (resampling costs time and detail)."""
    if len(set(fp.spacings)) > 1:
        target = [round(s, 4) for s in fp.median_spacing]
        plan.add("data.target_spacing", target, "the cases' spacings differ: resample to their median")


def _plan_normalization(plan: Plan, fp: Fingerprint) -> None:
    """CT: window over the foreground percentiles then z-score; anything else: z-score per case, with the
    statistics of the non-zero voxels when the images have a zero background (nnU-Net's
    ``use_mask_for_norm``): a whole-case z-score would move the tissue intensities with the share of
    background in each case. The background is scaled with the tissue, so it stays the darkest value (set to
    0, the tissue mean, it cost the CSF next to it 0.03 Dice on the real-MRI benchmark)."""
    zero_background = fp.median_zero_fraction >= ZERO_BACKGROUND
    names = ["ct" if n.strip().lower() == "ct" else "zscore" for n in fp.channel_names]
    configs: list[Any] = []
    for name, stats in zip(names, fp.intensity, strict=True):
        if name == "ct":
            window = [round(stats["p00_5"], 1), round(stats["p99_5"], 1)]
            configs.append(
                {
                    "name": "ct",
                    "window": window,
                    "mode": "zscore",
                    "mean": round(stats["mean"], 2),
                    "std": round(stats["std"], 2),
                }
            )
        else:
            configs.append(
                {"name": "zscore", "nonzero": True, "background": "scale"} if zero_background else "zscore"
            )
    value = configs[0] if len(set(map(repr, configs))) == 1 else configs
    zero = f"{fp.median_zero_fraction:.0%} of the voxels of the median case are 0"
    why = {
        "ct": "CT: window to the 0.5-99.5% foreground percentiles, then z-score with the foreground's"
        " mean and std",
        "zscore": f"z-score per case with the non-zero voxels' mean and std ({zero}: a zero background;"
        " nnU-Net's mask normalization, the background scaled too so it stays the darkest)"
        if zero_background
        else "z-score per case (not CT)",
    }
    plan.add(
        "data.normalization",
        value,
        f"channels {fp.channel_names}: " + "; ".join(why[n] for n in dict.fromkeys(names)),
    )


def _plan_sample_size(plan: Plan, size: tuple[int, ...], dims: int, gpu: bool) -> tuple[int, ...]:
    """Whole slices when they fit the pixel budget, else the largest power-of-two patch that does."""
    budget = MAX_SLICE_PIXELS[gpu] if dims == 2 else VOXELS_PER_BATCH[gpu] // 2
    if math.prod(size) <= budget:
        plan.add(
            "data.patch_size",
            None,
            f"whole {'slices' if dims == 2 else 'volumes'} ({'x'.join(map(str, size))}) fit",
        )
        return size
    scale = (budget / math.prod(size)) ** (1 / dims)
    patch = [min(s, _pow2_floor(s * scale) if s * scale >= 16 else s) for s in size]
    plan.add("data.patch_size", patch, f"median size {size} over the budget of {budget} px: random patches")
    return tuple(patch)


def _plan_net(plan: Plan, sample: tuple[int, ...], gpu: bool) -> None:
    """Depth for a 4-8 px bottleneck; channels doubling from the base, capped. On CPU the first two levels
    share the base width (as MONAI's BasicUNet): a level costs ~channels^2 x pixels, so doubling at the
    first pooling makes the half-resolution level as dear as the full-resolution one; keeping it at the base
    width takes a third off the step time at the same depth and receptive field."""
    pools = max(1, min(6, int(math.floor(math.log2(min(sample) / BOTTLENECK_PX)))))
    doublings = range(pools + 1) if gpu else [0, *range(pools)]
    channels = [min(BASE_CHANNELS[gpu] * 2**i, MAX_CHANNELS[gpu]) for i in doublings]
    bottleneck = "x".join(str(max(1, s // 2**pools)) for s in sample)
    why = f"{pools} downsamplings take {'x'.join(map(str, sample))} to a {bottleneck} px bottleneck"
    if not gpu:
        why += f"; CPU: levels 0 and 1 both {channels[0]} wide (step time {CPU_STEP_NOTE})"
    plan.add("model.net.init_args.channels", channels, why)


def _plan_batch(plan: Plan, sample: tuple[int, ...], dims: int, gpu: bool) -> int:
    """Batch size from the pixel budget (2 at least, as nnU-Net)."""
    budget = PIXELS_PER_BATCH[gpu] if dims == 2 else VOXELS_PER_BATCH[gpu]
    batch = int(max(2, min(64, round(budget / math.prod(sample)))))
    plan.add("data.batch_size", batch, f"{budget} px per batch on {'GPU' if gpu else 'CPU'}")
    return batch


def _rarest(fp: Fingerprint, axis: int, dims: int) -> tuple[str, float, float]:
    """Name, voxel share of the foreground and slice (2D) or case (3D) share of the rarest class."""
    shares = fp.foreground_fraction()
    presence = fp.class_slice_fraction(axis) if dims == 2 else [c / fp.num_cases for c in fp.class_cases]
    k = min(range(1, len(shares)), key=lambda i: (presence[i], shares[i]))
    return fp.class_names[k], shares[k], presence[k]


def _plan_sampling(plan: Plan, fp: Fingerprint, axis: int, dims: int) -> None:
    """Class-aware oversampling: a third of each batch (nnU-Net), half when a class is rare."""
    name, share, presence = _rarest(fp, axis, dims)
    where = "slices" if dims == 2 else "cases"
    rare = presence < RARE_SLICE_FRACTION
    fraction = 0.5 if rare else 0.33
    plan.add(
        "data.oversample",
        fraction,
        f"rarest class {name!r}: {share:.1%} of the foreground, in {presence:.0%} of the {where}"
        + (": rare, half of every batch shows a foreground class" if rare else ""),
    )


def _plan_schedule(plan: Plan, fp: Fingerprint, dims: int, axis: int, batch: int, val_samples: int) -> None:
    """Epoch length so that validation costs about ``VAL_SHARE`` of the time; total steps by data size."""
    train_samples = fp.num_slices[axis] if dims == 2 else fp.num_cases
    # a validation sample costs about a third of a training sample (forward only), times the 2**dims
    # mirrored passes of flip TTA when the plan uses it
    passes = 2**dims if plan.value("model.inference.flip_tta") else 1
    epoch = max(50, math.ceil(val_samples * passes / (3 * VAL_SHARE * batch)))
    plan.add(
        "data.batches_per_epoch",
        epoch,
        f"validating {val_samples} samples ({passes} passes each) after {epoch} training batches costs"
        f" ~{VAL_SHARE:.0%} or less",
    )
    steps = int(min(MAX_STEPS, max(MIN_STEPS, PASSES * train_samples / batch)))
    epochs = max(1, round(steps / epoch))
    plan.add(
        "trainer.max_epochs",
        epochs,
        f"{epochs * epoch} steps ({PASSES} passes over {train_samples} training samples, {MIN_STEPS:,} at "
        "least); --trainer.max_time ends earlier, the LR schedule follows it",
    )


def _plan_augmentation(plan: Plan, dims: int) -> None:
    """Mirroring along every spatial axis (nnU-Net's default); heavier spatial augmentation needs more
    steps than a short budget gives (the rare class was not learned within ~500 steps with it)."""
    if dims == 2:
        value: list[dict[str, Any]] = [{"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}}]
    else:
        value = [{"RandFlipd": {"prob": 0.5, "spatial_axis": axis}} for axis in range(3)]
    why = "mirroring along every axis (nnU-Net); +0.03 test Dice at 1,000 steps on the real-MRI benchmark"
    plan.add("data.augmentation", value, why)
    plan.add(
        "model.inference.flip_tta",
        True,
        "trained with mirroring: validation, test and predict average the mirrored predictions (nnU-Net)",
    )


def _plan_loss(plan: Plan) -> None:
    """Dice + CE with batch Dice over the foreground classes: measured against MONAI's per-image Dice with
    the background in, and batch Dice with it, on the real-MRI benchmark (docs/planning.md)."""
    why = "batch Dice over the foreground + CE: with mirroring it led the per-image/background-in forms"
    plan.add("model.loss", "dice_ce", why + " on the real-MRI benchmark (docs/planning.md)")


def make_plan(fp: Fingerprint, gpu: bool = False, val_samples: int | None = None) -> Plan:
    """The plan for a dataset with fingerprint ``fp`` on a machine with (``gpu``) or without a GPU."""
    plan = Plan()
    dims, size, axis = _plan_geometry(plan, fp, gpu)
    _plan_spacing(plan, fp)
    _plan_normalization(plan, fp)
    sample = _plan_sample_size(plan, size, dims, gpu)
    _plan_net(plan, sample, gpu)
    batch = _plan_batch(plan, sample, dims, gpu)
    _plan_sampling(plan, fp, axis, dims)
    _plan_augmentation(plan, dims)
    _plan_loss(plan)
    plan.add(
        "data.cache",
        "memory" if fp.bytes_per_case * fp.num_cases < MEMORY_CACHE_BYTES else "none",
        f"{fp.bytes_per_case * fp.num_cases / 2**20:.0f} MiB of training data "
        f"({'fits' if fp.bytes_per_case * fp.num_cases < MEMORY_CACHE_BYTES else 'over'} the "
        f"{MEMORY_CACHE_BYTES / 2**30:.0f} GiB memory cache budget)",
    )
    if val_samples is None:
        val_samples = max(1, round(0.2 * (fp.num_slices[axis] if dims == 2 else fp.num_cases)))
    _plan_schedule(plan, fp, dims, axis, batch, val_samples)
    return plan
