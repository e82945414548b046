"""Mixed precision, memory layout, torch.compile and determinism, through the real Trainer and CLI.

The loss and metric checks compare against float64 references computed from the very logits the module saw,
with tolerances that a low-precision reduction misses by orders of magnitude (fp16 sums overflow past 65,504;
bf16 sums keep 8 bits of mantissa): removing the float32 casts of ``unetseg.losses`` makes them fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from unetseg import UNet
from unetseg.losses import LOSSES, SegmentationLoss
from unetseg.metrics import segmentation_metrics
from unetseg.training.callbacks import Performance
from unetseg.training.cli import _close, build_cli, main
from unetseg.training.module import SegmentationModule

NUM_CLASSES = 4
FP16_MAX = 65504


def _label(spatial: tuple[int, ...]) -> torch.Tensor:
    """A label map whose organ (class 1) alone covers more voxels than float16 can count (> 65,504)."""
    label = torch.zeros(spatial, dtype=torch.long)
    inner = tuple(slice(2, s - 2) for s in spatial)
    label[inner] = 1
    centre = tuple(slice(s // 2 - 4, s // 2 + 4) for s in spatial)
    label[centre] = 2
    label[(slice(None),) * (len(spatial) - 1) + (slice(5, 7),)] = 3
    assert int((label == 1).sum()) > FP16_MAX
    return label


CASES = {"2d-512x512": (512, 512), "3d-48^3": (48, 48, 48)}


def _logits(spatial: tuple[int, ...], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident-but-imperfect logits (B, C, *spatial) and labels (B, *spatial)."""
    g = torch.Generator().manual_seed(seed)
    label = _label(spatial).expand(batch, *spatial).clone()
    logits = torch.randn(batch, NUM_CLASSES, *spatial, generator=g) * 2
    logits.scatter_add_(1, label.unsqueeze(1), torch.full((batch, 1, *spatial), 3.0))
    return logits, label


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_on_low_precision_logits_match_float64(name, dtype, case):
    logits, label = _logits(CASES[case], batch=2 if case.startswith("2d") else 1)
    low = logits.to(dtype)  # what a net returns under autocast
    reference = SegmentationLoss(name).fn(low.double(), label).item()
    with torch.autocast("cpu", dtype=dtype):
        value = SegmentationLoss(name)(low, label)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # float32 reductions land within 1e-7 here; without the cast, fp16/bf16 ones are off by 5e-7 to 0.4
    assert value.item() == pytest.approx(reference, rel=3e-7, abs=1e-8)


def _reference_dice_iou(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global per-class Dice and IoU from float64 voxel counts (NaN where a class is absent from both)."""
    dice, iou = np.full(NUM_CLASSES, np.nan), np.full(NUM_CLASSES, np.nan)
    for c in range(NUM_CLASSES):
        p, t = pred == c, label == c
        tp, fp, fn = float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())
        if tp + fp + fn:
            dice[c], iou[c] = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
    return dice, iou


@pytest.mark.parametrize("case", list(CASES))
def test_metric_states_are_integer_counts_exact_under_fp16(case):
    logits, label = _logits(CASES[case], batch=2)
    metrics = segmentation_metrics(NUM_CLASSES).half()  # what precision="16-true" does to the module
    with torch.autocast("cpu", dtype=torch.float16):
        pred = logits.half().argmax(1)
        for _ in range(3):  # accumulate past what float16 (and bf16) could count exactly
            metrics.update(pred, label)
    states = [  # every state of every metric, whatever the implementation
        tensor
        for metric in metrics.values()
        for state in metric.metric_state.values()
        for tensor in (state if isinstance(state, list) else [state])
    ]
    assert states and all(not s.is_floating_point() for s in states), [s.dtype for s in states]
    values = metrics.compute()
    dice, iou = _reference_dice_iou(np.concatenate([pred.numpy()] * 3), np.concatenate([label.numpy()] * 3))
    assert int((label == 1).sum()) * 3 > 4 * FP16_MAX
    np.testing.assert_allclose(values["dice"].double().numpy(), dice, rtol=1e-6)
    np.testing.assert_allclose(values["iou"].double().numpy(), iou, rtol=1e-6)


class _Capture:
    """Forward hook that keeps the net's last output (the logits the module computed its loss on)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        net.register_forward_hook(lambda module, args, out: self.outputs.append(out.detach()))


@pytest.mark.parametrize("case", list(CASES))
def test_validation_under_bf16_mixed_matches_float64_on_large_images(case):
    spatial = CASES[case]
    torch.manual_seed(0)
    net = UNet(spatial_dims=len(spatial), out_channels=NUM_CLASSES, channels=(4, 8))
    module = SegmentationModule(net, class_names=["background", "organ", "lesion", "vessel"])
    label = _label(spatial)
    image = (label.float() + torch.randn(spatial) * 0.5).unsqueeze(0)
    loader = DataLoader([{"image": image, "label": label}], batch_size=1)
    capture = _Capture(net)
    trainer = quiet_trainer(accelerator="cpu", precision="bf16-mixed")
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    (logits,) = capture.outputs
    assert logits.dtype == torch.bfloat16  # autocast was on
    loss = SegmentationLoss("dice_ce").fn(logits.double(), label.unsqueeze(0)).item()
    assert np.isfinite(logged["val/loss"]) and logged["val/loss"] == pytest.approx(loss, rel=2e-6)
    dice, iou = _reference_dice_iou(logits.argmax(1).numpy(), label.unsqueeze(0).numpy())
    assert logged["val/dice"] == pytest.approx(np.nanmean(dice[1:]), rel=1e-6)
    assert logged["val/iou"] == pytest.approx(np.nanmean(iou[1:]), rel=1e-6)


def _spatial_args(dims: int) -> list[str]:
    return ["--data.spatial_dims", str(dims), "--data.spatial_size", "32" if dims == 2 else "16"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("long_skip", ["none", "concat", "add"])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_every_skip_mode_trains_in_each_precision(precision, long_skip, dims, run_args):
    cli = build_cli(
        [
            "--config", "debug", "--trainer.precision", precision,
            "--model.net.init_args.long_skip", long_skip, *_spatial_args(dims),
            "--trainer.fast_dev_run", "1", *run_args,
        ]
    )
    capture = _Capture(cli.model.net)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        _close(cli.trainer)
    expected = torch.float32 if precision == "32" else torch.bfloat16
    assert len(capture.outputs) == 2  # one training and one validation step
    assert all(out.dtype == expected for out in capture.outputs)
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # fp32 master weights
    logged = cli.trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and torch.isfinite(logged["val/loss"])
    assert 0 <= float(logged["val/dice"]) <= 1


def test_16_mixed_on_cpu_falls_back_to_bf16(run_args):
    """Lightning has no fp16 autocast on CPU: it warns and uses bf16 (fp16 is covered by the gpu test)."""
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        result = main(["--config", "debug", "--trainer.precision", "16-mixed", "--trainer.fast_dev_run", "1",
                       *run_args])
    assert result.trainer.precision == "bf16-mixed"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("long_skip", ["none", "concat", "add"])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_every_skip_mode_trains_in_mixed_precision_on_gpu(precision, long_skip, dims, run_args):
    result = main(
        [
            "--config", "debug", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.precision", precision, "--model.net.init_args.long_skip", long_skip,
            "--performance.memory_format", "channels_last", *_spatial_args(dims),
            "--trainer.max_epochs", "2", *run_args,
        ]
    )
    assert result.trainer.precision == precision
    assert np.isfinite(result.val_metrics["val/loss"]) and 0 <= result.test_metrics["test/dice"] <= 1


def _first_conv(net: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


@pytest.mark.parametrize(("dims", "layout"), [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_channels_last_option_lays_out_weights_and_activations(dims, layout, precision, run_args):
    result = main(
        [
            "--config", "debug", "--performance.memory_format", "channels_last", "--trainer.precision",
            precision, *_spatial_args(dims), "--trainer.fast_dev_run", "1", *run_args,
        ]
    )
    net = result.model.net
    convs = [p for p in net.parameters() if p.dim() == dims + 2]
    assert convs and all(p.is_contiguous(memory_format=layout) for p in convs)
    activations: list[torch.Tensor] = []
    _first_conv(net).register_forward_hook(lambda module, args, out: activations.append(out))
    net(torch.rand(2, 1, *(16,) * dims))
    assert activations[0].is_contiguous(memory_format=layout) and not activations[0].is_contiguous()
    assert np.isfinite(result.test_metrics["test/loss"])


@pytest.mark.parametrize(("dims", "layout"), [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_channels_last_lays_out_multichannel_inputs(dims, layout):
    net = Performance("channels_last").apply(UNet(spatial_dims=dims, in_channels=3, channels=(4, 8)))
    inputs: list[torch.Tensor] = []
    _first_conv(net).register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    net(torch.rand(2, 3, *(8,) * dims))
    assert inputs[0].is_contiguous(memory_format=layout) and not inputs[0].is_contiguous()


def test_channels_last_does_not_change_the_outputs():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, out_channels=NUM_CLASSES, channels=(4, 8, 16)).eval()
    x = torch.rand(2, 1, 40, 40)
    expected = net(x)
    Performance("channels_last").apply(net)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_memory_format_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"memory_format='nhwc' is not one of \['contiguous', 'channels_la"):
        Performance("nhwc")
    with pytest.raises(ValueError, match="channels_last_3d.*needs a 3D net"):
        Performance("channels_last_3d").apply(UNet(spatial_dims=2, channels=(4, 8)))


def test_compile_keeps_checkpoint_keys_and_outputs():
    """``nn.Module.compile`` is in place: state-dict keys stay loadable into an uncompiled net."""
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, out_channels=NUM_CLASSES, channels=(4, 8)).eval()
    keys = list(net.state_dict())
    x = torch.rand(1, 1, 16, 16)
    expected = net(x)
    Performance(compile=True, compile_backend="eager").apply(net)
    assert net._compiled_call_impl is not None and list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), expected)


@pytest.mark.slow
def test_compiled_training_with_inductor_through_the_cli(run_args):
    result = main(
        ["--config", "debug", "--performance.compile", "true", "--trainer.max_epochs", "1", *run_args]
    )
    assert result.model.net._compiled_call_impl is not None
    state = torch.load(result.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    assert np.isfinite(result.test_metrics["test/loss"])


def test_same_seed_gives_identical_metrics_and_weights(run_args, tmp_path):
    def run(seed: int, folder: str):
        return main(
            [
                "--config", "debug", "--trainer.deterministic", "true", "--seed_everything", str(seed),
                "--trainer.max_epochs", "2", "--logging.save_dir", str(tmp_path / folder),
                "--trainer.default_root_dir", str(tmp_path / folder),
            ]
        )

    first, second, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first.val_metrics == second.val_metrics and first.test_metrics == second.test_metrics
    for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(first.model.state_dict().values(), other.model.state_dict().values(), strict=True)
    )
    assert first.val_metrics["val/loss"] != other.val_metrics["val/loss"]
