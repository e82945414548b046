"""SegmentationModule, losses and metrics: conventions, float32 reductions, learning, clear failures."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from unetseg import SegmentationModule, UNet
from unetseg.losses import LOSSES, SegmentationLoss
from unetseg.metrics import segmentation_metrics, to_logged_scalars

NAMES = ["background", "organ", "vessel"]


def _toy_batch(n: int = 4, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Squares (class 1) and a one-pixel line (class 2) on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(4, size - 16, (2,), generator=g).tolist()
        label[i, r : r + 10, c : c + 10] = 1
        label[i, :, (c + 13) % size] = 2
    image = label.float().unsqueeze(1) + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return {"image": image, "label": label}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_finite_scalars_that_prefer_the_right_answer(name):
    batch = _toy_batch()
    loss = SegmentationLoss(name)
    perfect = torch.nn.functional.one_hot(batch["label"], 3).permute(0, 3, 1, 2).float() * 20 - 10
    wrong = perfect.roll(1, dims=1)
    good, bad = loss(perfect, batch["label"]), loss(wrong, batch["label"])
    assert good.ndim == 0 and torch.isfinite(good) and torch.isfinite(bad)
    assert good < bad


def test_loss_is_computed_in_float32_under_bf16_autocast():
    batch = _toy_batch()
    logits = torch.randn(4, 3, 32, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = SegmentationLoss("dice_ce")(logits, batch["label"])
    assert value.dtype == torch.float32


def test_unknown_loss_names_the_value_and_the_options():
    options = r"\['ce', 'dice', 'dice_ce', 'dice_ce_bg', 'dice_ce_image', 'focal'\]"
    with pytest.raises(ValueError, match=r"loss='dyce'.*" + options):
        SegmentationLoss("dyce")


def test_metrics_are_global_dice_and_iou_with_nan_for_absent_classes():
    # Two images; class 1: TP=3+1, FP=1, FN=2 over the set; class 2 nowhere; class 3 only predicted (FP).
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 0, :3] = 1
    pred[0, 0, :4] = 1  # 3 TP, 1 FP
    target[1, 1, :3] = 1
    pred[1, 1, 0] = 1  # 1 TP, 2 FN
    pred[1, 3, 3] = 3
    metrics = segmentation_metrics(4)
    metrics.update(pred, target)
    values = metrics.compute()
    dice, iou = values["dice"], values["iou"]
    assert dice[1].item() == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert iou[1].item() == pytest.approx(4 / (4 + 1 + 2))
    assert torch.isnan(dice[2]) and torch.isnan(iou[2])  # absent from both: undefined
    assert dice[3].item() == 0 and iou[3].item() == 0  # predicted but absent: a real error
    # global Dice and IoU are the same statistic: IoU = D / (2 - D)
    finite = torch.isfinite(dice)
    torch.testing.assert_close(iou[finite].float(), (dice / (2 - dice))[finite].float())
    summary = to_logged_scalars({"val/dice": dice, "val/iou": iou}, ["bg", "a", "b", "c"])
    assert summary["val/dice"].item() == pytest.approx((dice[1].item() + 0) / 2)  # NaN class left out
    assert set(summary) == {"val/dice", "val/iou", *(f"val/{m}/{c}" for m in ("dice", "iou") for c in "abc")}
    with_bg = to_logged_scalars({"val/dice": dice}, ["bg", "a", "b", "c"], include_background=True)
    assert "val/dice/bg" in with_bg and with_bg["val/dice"] > summary["val/dice"]


def test_metrics_match_under_16bit_logits_for_large_images():
    """Counts over 512x512x4 voxels exceed float16's range (65504); states stay exact integers."""
    target = torch.randint(0, 2, (4, 512, 512))
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).half()
    metrics = segmentation_metrics(2)
    metrics.update(logits.argmax(1), target)
    assert metrics.compute()["dice"][1].item() == 1.0


def _module(**kwargs) -> SegmentationModule:
    net = UNet(channels=(8, 16, 32), out_channels=3, norm="batch")
    return SegmentationModule(net, class_names=NAMES, **kwargs)


def test_module_overfits_one_batch_through_a_real_trainer():
    torch.manual_seed(0)
    batch = _toy_batch(n=4, size=32)
    data = [{"image": batch["image"][i], "label": batch["label"][i]} for i in range(4)]
    loader = DataLoader(data, batch_size=4)
    module = _module(optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = quiet_trainer(max_epochs=80)
    trainer.fit(module, loader, loader)
    assert trainer.callback_metrics["train/loss"] < 0.5
    metrics = trainer.validate(module, loader, verbose=False)[0]
    assert metrics["val/dice"] > 0.9
    assert {"val/loss", "val/iou", "val/dice/organ", "val/dice/vessel", "val/iou/vessel"} <= set(metrics)
    assert "val/dice/background" not in metrics  # background excluded by default


def test_nan_loss_stops_training_with_a_clear_error():
    batch = _toy_batch()
    batch["image"][0, 0, 0, 0] = float("nan")
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match=r"train loss is nan at epoch 0, global step 0"):
        trainer.fit(_module(), loader)


def test_class_names_must_match_the_net():
    with pytest.raises(ValueError, match=r"class_names has 2 entries.*net has 3 outputs"):
        SegmentationModule(UNet(channels=(4, 8), out_channels=3), class_names=["bg", "organ"])


def test_scheduler_is_configured_from_a_callable():
    module = _module(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    config = module.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


@pytest.mark.parametrize(
    ("name", "middle", "end"), [("cosine", 0.5, 0.0), ("poly", 0.5**0.9, 0.0), ("constant", 1, 1)]
)
def test_named_lr_schedule_spans_the_whole_fit(name, middle, end):
    module = _module(scheduler=name, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    trainer = L.Trainer(max_steps=10, logger=False)
    module.trainer = trainer
    config = module.configure_optimizers()
    schedule = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        config["optimizer"].step()
        schedule.step()
    assert (
        lrs[0] == 1.0 and lrs[5] == pytest.approx(middle) and schedule.get_last_lr()[0] == pytest.approx(end)
    )
    with pytest.raises(
        ValueError, match=r"scheduler='linear' is not one of \['constant', 'cosine', 'poly'\]"
    ):
        _module(scheduler="linear")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("dice_ce", {"include_background": False, "batch": True}),
        ("dice_ce_bg", {"include_background": True, "batch": True}),
        ("dice_ce_image", {}),  # MONAI's defaults: per image, background in
    ],
)
def test_dice_ce_forms_equal_monai_with_those_settings(name, kwargs):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits, label = torch.randn(3, 4, 9, 7), torch.randint(0, 4, (3, 9, 7))
    expected = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)(logits, label[:, None])
    assert torch.allclose(SegmentationLoss(name)(logits, label), expected)
    if name != "dice_ce":
        default = SegmentationLoss("dice_ce")(logits, label)
        assert not torch.allclose(SegmentationLoss(name)(logits, label), default)
