"""Dense blocks (short concatenating skips), the ``block`` argument, layer groups and smp encoders."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from unetseg.nets import BLOCKS, DenseDoubleConv, DoubleConv, ResidualDoubleConv, UNet
from unetseg.nets.encoders import EncoderUNet, smp_available
from unetseg.nets.unet import crop_to, pad_to_multiple
from unetseg.training.cli import main
from unetseg.training.module import SegmentationModule

TINY = (4, 8, 16)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("spatial_dims", "in_channels", "out_channels", "size"),
    [(2, 3, 8, (10, 7)), (2, 6, 5, (9, 9)), (3, 3, 8, (4, 5, 6)), (3, 2, 1, (3, 4, 5))],
)
def test_dense_block_shape_backward_and_growth(spatial_dims, in_channels, out_channels, size):
    torch.manual_seed(0)
    block = DenseDoubleConv(in_channels, out_channels, spatial_dims=spatial_dims)
    x = torch.randn(2, in_channels, *size, requires_grad=True)
    out = block(x)
    assert out.shape == (2, out_channels, *size)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())
    growth = max(1, out_channels // 2)
    assert [layer[0].in_channels for layer in block.layers] == [in_channels, in_channels + growth]
    assert block.transition[0].in_channels == in_channels + 2 * growth
    assert block.transition[0].kernel_size == (1,) * spatial_dims


def test_dense_block_concatenates_the_input_and_every_previous_output():
    """The transition sees exactly ``[x, h1, h2]``, and the second conv sees ``[x, h1]``."""
    torch.manual_seed(0)
    block = DenseDoubleConv(3, 4, spatial_dims=2).eval()
    seen: dict[str, torch.Tensor] = {}
    block.layers[1].register_forward_hook(lambda m, i, o: seen.update(l2_in=i[0], h2=o))
    block.layers[0].register_forward_hook(lambda m, i, o: seen.update(h1=o))
    block.transition.register_forward_hook(lambda m, i, o: seen.update(t_in=i[0]))
    x = torch.randn(1, 3, 6, 6)
    block(x)
    assert torch.equal(seen["l2_in"], torch.cat([x, seen["h1"]], 1))
    assert torch.equal(seen["t_in"], torch.cat([x, seen["h1"], seen["h2"]], 1))


def test_dense_dropout_is_applied_last():
    block = DenseDoubleConv(2, 4, spatial_dims=3, dropout=0.5)
    assert isinstance(block.dropout, nn.Dropout3d)
    assert isinstance(DenseDoubleConv(2, 4).dropout, nn.Identity)


@pytest.mark.parametrize("long_skip", ["concat", "add", "none"])
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (37, 45)), (3, (9, 17, 12))], ids=["2d", "3d"])
def test_unet_with_dense_blocks_shape_and_backward(long_skip, spatial_dims, size):
    torch.manual_seed(0)
    net = UNet(spatial_dims, in_channels=2, out_channels=3, channels=TINY, long_skip=long_skip, block="dense")
    out = net(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert sum(isinstance(m, DenseDoubleConv) for m in net.modules()) == 2 * len(TINY) - 1
    counts = net.parameter_counts()
    assert counts["encoder"] + counts["decoder"] + counts["skips"] + counts["head"] == counts["total"]


def test_block_argument_is_the_one_short_skip_key():
    assert BLOCKS["dense"] is DenseDoubleConv
    named = UNet(channels=TINY, block="residual")
    assert named.block == "residual" and named.init_args["block"] == "residual"
    assert sum(isinstance(m, ResidualDoubleConv) for m in named.modules()) == 5
    assert UNet(channels=TINY).block == "plain"
    assert sum(isinstance(m, DoubleConv) for m in UNet(channels=TINY, block="plain").modules()) == 5
    assert "residual" not in UNet(channels=TINY).init_args  # the older flag is gone
    with pytest.raises(TypeError, match=r"residual"):
        UNet(channels=TINY, residual=True)
    with pytest.raises(ValueError, match=r"block='denze' is not one of \['dense', 'plain', 'residual'\]"):
        UNet(channels=TINY, block="denze")


@pytest.mark.parametrize("block", ["plain", "residual", "dense"])
def test_layer_groups_cover_every_parameter_once_in_data_flow_order(block):
    net = UNet(channels=(4, 8, 16, 32), block=block)
    groups = net.layer_groups()
    assert list(groups) == [
        "encoder.0", "encoder.1", "encoder.2", "bottleneck", "decoder.2", "decoder.1", "decoder.0", "head",
    ]  # fmt: skip
    ids = [id(p) for part in groups.values() for p in part.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    # decoder level i works at the resolution of encoder level i: its block outputs channels[i]
    assert groups["decoder.0"].block(torch.zeros(1, 8, 4, 4)).shape[1] == 4


@pytest.mark.parametrize("size", [(1, 1, 17, 32), (2, 3, 5, 6, 7)])
def test_pad_to_multiple_and_crop_back(size):
    x = torch.randn(*size)
    padded, starts = pad_to_multiple(x, 8)
    assert all(s % 8 == 0 for s in padded.shape[2:])
    assert torch.equal(crop_to(padded, starts, x.shape[2:]), x)


# --------------------------------------------------------------------------------------------------------
# smp encoders (the [smp] extra).

# CI sets UNETSEG_REQUIRE_SMP=1: there a missing smp fails these tests instead of skipping them.
needs_smp = pytest.mark.skipif(
    not os.environ.get("UNETSEG_REQUIRE_SMP") and not smp_available(),
    reason='segmentation-models-pytorch not importable: pip install -c constraints.txt -e ".[smp]" and '
    "python -m unetseg.compat.torchvision_cpu_shim install",
)


@needs_smp
@pytest.mark.parametrize("long_skip", ["concat", "add", "none", ["none", "add", "concat"]])
def test_encoder_unet_shape_backward_and_parameter_parts(long_skip):
    torch.manual_seed(0)
    net = EncoderUNet(
        in_channels=1, out_channels=3, encoder="resnet18", encoder_depth=4, long_skip=long_skip, norm="batch"
    )
    x = torch.randn(2, 1, 37, 45)
    out = net(x)
    assert out.shape == (2, 3, 37, 45)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    counts = net.parameter_counts()
    assert counts["encoder"] + counts["decoder"] + counts["skips"] + counts["head"] == counts["total"]
    assert counts["encoder"] == n_params(net.encoder)
    modes = [long_skip] * 3 if isinstance(long_skip, str) else long_skip
    assert list(net.long_skip) == modes
    assert (counts["skips"] == 0) == all(m == "none" for m in modes)
    groups = net.layer_groups()
    ids = [id(p) for part in groups.values() for p in part.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}


@needs_smp
@pytest.mark.parametrize(("long_skip", "uses_skips"), [("concat", True), ("add", True), ("none", False)])
def test_encoder_unet_output_depends_on_skip_features_only_with_skips(long_skip, uses_skips):
    """Replacing the encoder's skip features (all but the deepest) changes the output iff skips are used."""
    torch.manual_seed(0)
    net = EncoderUNet(in_channels=1, out_channels=2, encoder="resnet18", encoder_depth=3, long_skip=long_skip)
    net.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        reference = net(x)
        original = net.encoder.forward

        def noisy_skips(inp):
            feats = original(inp)
            return [feats[0], *(torch.randn_like(f) for f in feats[1:-1]), feats[-1]]

        net.encoder.forward = noisy_skips
        changed = net(x)
    assert (not torch.allclose(reference, changed)) == uses_skips


@needs_smp
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "resnet35"}, r"encoder='resnet35' is not an smp encoder.*resnet18"),
        ({"spatial_dims": 3}, r"spatial_dims=3 is not one of \[2\]"),
        ({"encoder_depth": 6}, r"encoder_depth=6 is not one of \[2, 3, 4, 5\]"),
        ({"decoder_channels": [16, 32]}, r"decoder_channels=\[16, 32\] must have encoder_depth=5 entries"),
        ({"long_skip": ["add", "add"]}, r"long_skip has 2 entries.*needs 4"),
    ],
)
def test_encoder_unet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderUNet(**{"encoder": "resnet18", **kwargs})


@needs_smp
def test_encoder_unet_trains_through_the_cli(run_args):
    result = main(
        [
            "--config", "debug",
            "--model.net.class_path", "unetseg.nets.EncoderUNet",
            "--model.net.init_args.encoder", "resnet18",
            "--model.net.init_args.encoder_depth", "3",
            "--model.net.init_args.long_skip", "add",
            "--trainer.fast_dev_run", "1",
            *run_args,
        ]
    )  # fmt: skip
    net = result.model.net
    assert isinstance(net, EncoderUNet) and net.long_skip == ("add", "add")
    assert (
        net.in_channels == result.datamodule.in_channels and net.out_channels == result.datamodule.num_classes
    )
    assert 0.0 <= result.test_metrics["test/dice"] <= 1.0


@needs_smp
def test_encoder_unet_checkpoint_restores_without_downloading_weights(tmp_path):
    """A Python-built EncoderUNet module comes back from its checkpoint, pretrained weights not fetched."""
    torch.manual_seed(0)
    net = EncoderUNet(in_channels=1, out_channels=2, encoder="resnet18", encoder_depth=3, long_skip="add")
    module = SegmentationModule(net, class_names=["bg", "fg"])
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["encoder_depth"] == 3
    # as if trained from ImageNet weights: rebuilding must not download them (no network here)
    checkpoint["hyper_parameters"]["net"]["init_args"]["encoder_weights"] = "imagenet"
    torch.save(checkpoint, tmp_path / "m.ckpt")
    restored = SegmentationModule.load_for_inference(tmp_path / "m.ckpt")
    assert isinstance(restored.net, EncoderUNet) and restored.net.long_skip == net.long_skip == ("add", "add")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module.eval()(x))


def test_encoder_unet_without_smp_says_how_to_install(monkeypatch):
    import unetseg.nets.encoders as encoders

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(encoders.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"pip install -c constraints.txt -e \"\.\[smp\]\""):
        EncoderUNet(encoder="resnet18")
    assert not encoders.smp_available()
