"""GradientFlow callback: one finite record per layer group and recorded step, consistent with SGD, written
to files and loggers, and different for skip and no-skip nets on the same batch."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from unetseg.analysis.gradflow import GradientFlow, layer_groups, read_records
from unetseg.nets import UNet

GROUPS = ["encoder.0", "encoder.1", "bottleneck", "decoder.1", "decoder.0", "head"]
LR = 0.1


class SGDModule(L.LightningModule):
    """A net trained by plain SGD (no momentum, no weight decay): each update is exactly ``-LR * grad``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(2, 1, 16, 16, generator=g),
            "label": torch.randint(0, 3, (2, 16, 16), generator=g),
        }
        for _ in range(n)
    ]


def fit(net: nn.Module, callback: GradientFlow, steps: int, tmp_path, data=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        logger=CSVLogger(tmp_path, name="gf"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        accelerator="cpu",
    )
    loader = DataLoader(data or batches(4), batch_size=None)
    trainer.fit(SGDModule(net), train_dataloaders=loader)
    return trainer


def test_records_one_finite_entry_per_group_and_interval_and_match_sgd(tmp_path):
    torch.manual_seed(0)
    callback = GradientFlow(every_n_steps=3)
    trainer = fit(UNet(channels=(4, 8, 16), out_channels=3), callback, steps=7, tmp_path=tmp_path)
    records = callback.records
    assert [(r["step"], r["group"]) for r in records] == [(s, g) for s in (0, 3, 6) for g in GROUPS]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("grad_norm", "weight_norm", "update_norm", "update_ratio"))
        assert r["grad_norm"] > 0 and r["weight_norm"] > 0
        # plain SGD: ||dw|| = LR * ||g||, and the ratio is ||dw|| / ||w||
        assert r["update_norm"] == pytest.approx(LR * r["grad_norm"], rel=1e-4)
        assert r["update_ratio"] == pytest.approx(r["update_norm"] / r["weight_norm"], rel=1e-9)
    # files at the end of fit, in the logger's folder; the CSV reads back to the same records
    log_dir = trainer.log_dir
    assert read_records(f"{log_dir}/gradflow.csv") == records
    assert read_records(f"{log_dir}/gradflow.json") == records
    with open(f"{log_dir}/gradflow.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # and the loggers got them: one value per recorded step and group in metrics.csv
    with open(f"{log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for group in GROUPS:
        logged = [
            float(r[f"gradflow/grad_norm/{group}"]) for r in rows if r.get(f"gradflow/grad_norm/{group}")
        ]
        assert logged == pytest.approx([r["grad_norm"] for r in records if r["group"] == group])


def test_skip_and_no_skip_nets_differ_on_the_same_batch(tmp_path):
    """Same encoder initialisation, same batch: the encoder's gradients differ because of the long skips."""
    data = batches(1, seed=3)
    results = {}
    encoders = {}
    for mode in ("concat", "none"):
        torch.manual_seed(0)  # the encoder is built first: identical encoder weights in both nets
        net = UNet(channels=(4, 8, 16), out_channels=3, long_skip=mode)
        encoders[mode] = {k: v.clone() for k, v in net.encoder.state_dict().items()}
        callback = GradientFlow(every_n_steps=1, log=False)
        fit(net, callback, steps=1, tmp_path=tmp_path / mode, data=data)
        results[mode] = {r["group"]: r["grad_norm"] for r in callback.records}
    assert all(torch.equal(encoders["concat"][k], encoders["none"][k]) for k in encoders["concat"])
    assert list(results["concat"]) == list(results["none"]) == GROUPS
    for group in ("encoder.0", "encoder.1"):
        assert results["concat"][group] != pytest.approx(results["none"][group], rel=1e-3)


def test_layer_groups_fall_back_to_children_with_parameters():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    groups = layer_groups(net)
    assert list(groups) == ["0", "2"]
    assert [p.shape for p in groups["2"]] == [torch.Size([2, 2, 1, 1]), torch.Size([2])]


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_interval_is_rejected(every):
    with pytest.raises(ValueError, match=r"every_n_steps=.* must be a positive integer"):
        GradientFlow(every_n_steps=every)
