"""Deep supervision in training: the module's training loss is nnU-Net's weighted sum, validation sees one
tensor, and a real CLI run with ``model.net.init_args.deep_supervision: true`` trains (gradient flow into the
heads), checkpoints with the heads, and loads and exports without them."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from tests._trainer import quiet_trainer
from unetseg import UNet
from unetseg.analysis.gradflow import GradientFlow
from unetseg.inference.checkpoint import CheckpointModel
from unetseg.losses import DeepSupervisionLoss, SegmentationLoss
from unetseg.training.cli import main
from unetseg.training.module import SegmentationModule

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _data(n: int = 4, size: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(n, 1, size, size, generator=g)
    label = (image[:, 0] > 0.5).long() + (image[:, 0] > 1.2).long()  # 3 classes, learnable from the pixel
    return [{"image": image[i], "label": label[i]} for i in range(n)]


class LossCheck(Callback):
    """Before each training step, the loss that step must report, from a copy of the net as it is then."""

    def __init__(self) -> None:
        self.expected: list[float] = []
        self.first_output_only: list[float] = []
        self.reported: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = copy.deepcopy(pl_module.net)  # training mode, batch statistics, as the step runs it
        with torch.no_grad():
            outputs = net(batch["image"])
        loss = SegmentationLoss("dice_ce")
        self.expected.append(float(DeepSupervisionLoss(loss)(outputs, batch["label"])))
        self.first_output_only.append(float(loss(outputs[0], batch["label"])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reported.append(float(outputs["loss"]))


def test_module_trains_with_the_weighted_loss_and_validates_on_one_tensor():
    torch.manual_seed(0)
    net = UNet(channels=(4, 8, 16, 32), out_channels=3, deep_supervision=True)
    module = SegmentationModule(net, class_names=["background", "a", "b"])
    check = LossCheck()
    trainer = quiet_trainer(max_steps=3, callbacks=[check])
    loader = DataLoader(_data(), batch_size=2)
    trainer.fit(module, loader)
    assert len(check.reported) == 3
    assert check.reported == pytest.approx(check.expected, rel=1e-5)
    assert all(abs(r - f) > 1e-4 for r, f in zip(check.reported, check.first_output_only, strict=True))
    metrics = trainer.validate(module, loader, verbose=False)[0]
    with torch.no_grad():
        batches = list(loader)
        plain = [float(SegmentationLoss("dice_ce")(net.eval()(b["image"]), b["label"])) for b in batches]
    assert metrics["val/loss"] == pytest.approx(sum(plain) / len(plain), rel=1e-5)
    assert 0.0 <= metrics["val/dice"] <= 1.0


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny real training through the CLI with deep supervision and the gradient-flow callback."""
    folder = tmp_path_factory.mktemp("ds")
    args = [
        "--config", "debug",
        "--model.net.init_args.channels", "[4, 8, 16, 32]",
        "--model.net.init_args.deep_supervision", "true",
        "--trainer.max_epochs", "2",
        "--trainer.callbacks+=unetseg.analysis.GradientFlow",
        "--trainer.callbacks.every_n_steps", "1",
        "--trainer.default_root_dir", str(folder),
        "--logging.save_dir", str(folder / "runs"),
        "--test", "false",
        *QUIET,
    ]  # fmt: skip
    result = main(args)
    return result, Path(result.best_model_path).with_name("last.ckpt")


def test_cli_run_trains_with_gradients_into_the_heads(cli_run):
    result, ckpt = cli_run
    assert result.trainer.state.finished and result.model.net.deep_supervision
    assert len(result.model.net.ds_heads) == 1  # decoder level 1 of 3 (level 2 is next to the bottleneck)
    metrics_csv = next(Path(result.trainer.log_dir).glob("**/metrics.csv"))
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics_csv.open()) if row.get("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    gradflow = next(c for c in result.trainer.callbacks if isinstance(c, GradientFlow))
    heads = [r for r in gradflow.records if r["group"] == "ds_heads"]
    assert len(heads) == 4 and all(r["grad_norm"] > 0 and r["update_ratio"] > 0 for r in heads)


def _restored(ckpt: Path) -> UNet:
    """The net of a checkpoint as a resume rebuilds it: its recorded arguments, heads included, strictly."""
    checkpoint = torch.load(ckpt, weights_only=True)
    config = checkpoint["hyper_parameters"]["net"]
    assert config["init_args"]["deep_supervision"] is True
    net = UNet(**config["init_args"])
    net.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return net


def test_checkpoint_keeps_the_heads_and_loads_for_inference_without_them(cli_run):
    result, ckpt = cli_run
    restored = _restored(ckpt)
    torch.testing.assert_close(restored.ds_heads[0].weight, result.model.net.ds_heads[0].weight.cpu())
    image = torch.randn(2, 1, 30, 26, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = restored.eval()(image)
        model = CheckpointModel.load(ckpt)
        assert len(model.net.ds_heads) == 0 and not model.net.deep_supervision
        assert model.hparams["net"]["init_args"]["deep_supervision"] is False
        logits = model.infer(image)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 30, 26)
        torch.testing.assert_close(logits, expected)
        assert isinstance(model.net.train()(image), torch.Tensor)  # stripped: one tensor in any mode
        module = SegmentationModule.load_for_inference(ckpt)
        torch.testing.assert_close(module.infer(image), expected)
    assert module.hparams["net"]["init_args"]["deep_supervision"] is False


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_strips_the_heads_and_matches_the_eval_output(cli_run, fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    from unetseg.inference.export import export_onnx, export_torchscript, run_exported
    from unetseg.inference.export import main as export_main

    _, ckpt = cli_run
    output = tmp_path / f"model.{fmt}"
    assert export_main(["--ckpt", str(ckpt), "--format", fmt, "--output", str(output), "--check"]) == 0
    net = _restored(ckpt)  # the trained net with its heads
    image = torch.randn(2, 1, 27, 33, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net.eval()(image).numpy()
    assert abs(run_exported(output, image) - expected).max() < 1e-4
    direct = tmp_path / f"direct.{fmt}"  # exporting the net itself strips a copy, not the net
    if fmt == "onnx":
        import onnx

        export_onnx(net, direct, torch.randn(1, 1, 32, 32))
        graph = onnx.load(str(direct)).graph
        assert len(graph.output) == 1
        assert not any("ds_heads" in init.name for init in graph.initializer)
    else:
        export_torchscript(net, direct, method="script")
        assert not any(k.startswith("ds_heads.") for k in torch.jit.load(str(direct)).state_dict())
    assert len(net.ds_heads) == 1 and net.deep_supervision
    assert abs(run_exported(direct, image) - expected).max() < 1e-4
