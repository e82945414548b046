"""Deep supervision in the UNet: one output per supervised level in training mode (nnU-Net's levels), the
plain full-resolution tensor in eval mode, consistent crops, heads in the parameter accounting, stripping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unetseg.nets import UNet
from unetseg.nets.unet import level_crop

CHANNELS = (
    4,
    8,
    16,
    32,
)  # 3 decoder levels: full resolution and 1/2 supervised, 1/4 (next to the bottleneck) not
SKIPS = ["concat", "add", "none", ["none", "concat", "add"]]
SKIP_IDS = ["concat", "add", "none", "per-level"]


def _norms_to_eval(net: nn.Module) -> None:
    """Batch norm on running statistics, so that training and eval mode compute the same function."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _randomize_running_stats(net: nn.Module) -> None:
    """Non-trivial running statistics: eval-mode batch norm then differs from the identity."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("long_skip", SKIPS, ids=SKIP_IDS)
@pytest.mark.parametrize("block", ["plain", "residual", "dense"])
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (37, 30)), (3, (9, 17, 12))], ids=["2d", "3d"])
def test_training_returns_one_output_per_supervised_level_and_every_head_gets_gradients(
    long_skip, block, spatial_dims, size
):
    torch.manual_seed(0)
    net = UNet(spatial_dims, 2, 3, CHANNELS, long_skip=long_skip, block=block, deep_supervision=True)
    outputs = net(torch.randn(2, 2, *size))
    assert isinstance(outputs, list) and len(outputs) == 2
    for level, out in enumerate(outputs):  # 1 / 2**level of the resolution, rounded up
        assert out.shape == (2, 3, *(math.ceil(s / 2**level) for s in size))
    sum(out.square().mean() for out in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.ds_heads.parameters())
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    ("channels", "head_channels"),
    [((4, 8), []), ((4, 8, 16), []), ((4, 8, 16, 32), [8]), ((4, 8, 16, 32, 64), [8, 16])],
)
def test_every_decoder_level_but_the_lowest_is_supervised(channels, head_channels):
    net = UNet(channels=channels, out_channels=3, deep_supervision=True)
    assert [head.in_channels for head in net.ds_heads] == head_channels
    assert all(head.out_channels == 3 and head.kernel_size == (1, 1) for head in net.ds_heads)
    outputs = net(torch.randn(1, 1, 32, 32))
    assert [tuple(out.shape[2:]) for out in outputs] == [
        (32 // 2**i,) * 2 for i in range(len(head_channels) + 1)
    ]


@pytest.mark.parametrize("long_skip", SKIPS, ids=SKIP_IDS)
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (37, 30)), (3, (9, 17, 12))], ids=["2d", "3d"])
def test_eval_returns_the_first_training_output_which_is_the_plain_unet(long_skip, spatial_dims, size):
    torch.manual_seed(0)
    kwargs = {"channels": CHANNELS, "long_skip": long_skip, "out_channels": 3, "block": "residual"}
    net = UNet(spatial_dims, deep_supervision=True, **kwargs)
    _randomize_running_stats(net)
    x = torch.randn(2, 1, *size)
    net.train()
    _norms_to_eval(net)  # training mode, norms on running statistics
    first = net(x)[0]
    evaluated = net.eval()(x)
    assert isinstance(evaluated, torch.Tensor)
    torch.testing.assert_close(evaluated, first, rtol=0, atol=0)
    plain = UNet(spatial_dims, **kwargs)  # the same weights without the heads: the same full-res output
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("ds_heads.")})
    torch.testing.assert_close(plain.eval()(x), evaluated, rtol=0, atol=0)
    assert not torch.equal(plain.train()(x), evaluated)  # batch statistics differ: the check can fail


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (37, 30)), (3, (9, 17, 12))], ids=["2d", "3d"])
def test_lower_outputs_are_cropped_like_the_full_resolution_one(spatial_dims, size):
    """The outputs for an input of odd size are crops of the outputs for the same input padded by hand."""
    torch.manual_seed(0)
    net = UNet(spatial_dims, channels=(4, 8, 16, 32, 64), long_skip="add", deep_supervision=True)
    _randomize_running_stats(net)
    _norms_to_eval(net)
    x = torch.randn(1, 1, *size)
    multiple = net.size_multiple
    pads = [(multiple - s % multiple) % multiple for s in size]
    starts = [p // 2 for p in pads]
    padded = F.pad(x, [v for p in reversed(pads) for v in (p // 2, p - p // 2)])
    assert all(s % multiple == 0 for s in padded.shape[2:])
    whole = net(padded)  # no padding inside the net: level i covers input pixels [j 2^i, (j + 1) 2^i)
    outputs = net(x)
    assert len(outputs) == len(whole) == 3
    for level, (out, full) in enumerate(zip(outputs, whole, strict=True)):
        factor = 2**level
        index = tuple(
            slice(s // factor, s // factor + math.ceil(n / factor)) for s, n in zip(starts, size, strict=True)
        )
        torch.testing.assert_close(out, full[(..., *index)], rtol=0, atol=1e-6)


def test_level_crop_rounds_the_start_down_and_the_size_up():
    assert level_crop([5, 4], [37, 40], 0) == ([5, 4], [37, 40])
    assert level_crop([5, 4], [37, 40], 1) == ([2, 2], [19, 20])
    assert level_crop([5, 4], [37, 40], 3) == ([0, 0], [5, 5])


def test_parameter_counts_and_layer_groups_include_the_heads():
    net = UNet(channels=(4, 8, 16, 32, 64), out_channels=3, deep_supervision=True)
    plain = UNet(channels=(4, 8, 16, 32, 64), out_channels=3)
    counts, plain_counts = net.parameter_counts(), plain.parameter_counts()
    assert counts["ds_heads"] == (8 * 3 + 3) + (16 * 3 + 3)  # 1x1 convs with bias on levels 1 and 2
    assert counts["total"] == plain_counts["total"] + counts["ds_heads"]
    assert (
        counts["encoder"] + counts["decoder"] + counts["skips"] + counts["head"] + counts["ds_heads"]
        == (counts["total"])
    )
    assert "ds_heads" not in plain_counts
    groups = net.layer_groups()
    assert list(groups)[-2:] == ["head", "ds_heads"] and list(plain.layer_groups())[-1] == "head"
    ids = [id(p) for part in groups.values() for p in part.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}


def test_init_args_rebuild_the_net_and_bad_values_are_rejected():
    net = UNet(channels=CHANNELS, deep_supervision=True)
    assert net.init_args["deep_supervision"] is True
    rebuilt = UNet(**net.init_args)
    rebuilt.load_state_dict(net.state_dict())  # strict: the same heads
    assert UNet(channels=CHANNELS).init_args["deep_supervision"] is False
    with pytest.raises(ValueError, match=r"deep_supervision='yes' must be true or false"):
        UNet(channels=CHANNELS, deep_supervision="yes")


def test_strip_deep_supervision_keeps_the_eval_output_and_rebuilds_from_init_args():
    torch.manual_seed(0)
    net = UNet(channels=CHANNELS, deep_supervision=True)
    _randomize_running_stats(net)
    x = torch.randn(2, 1, 24, 20)
    expected = net.eval()(x)
    assert net.strip_deep_supervision() is net
    assert not any(k.startswith("ds_heads.") for k in net.state_dict())
    assert net.init_args["deep_supervision"] is False and "ds_heads" not in net.parameter_counts()
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    assert isinstance(net.train()(x), torch.Tensor)  # one tensor in any mode now
    UNet(**net.init_args).load_state_dict(net.state_dict())


def test_scripted_net_returns_the_eval_tensor_in_any_mode():
    torch.manual_seed(0)
    net = UNet(channels=CHANNELS, deep_supervision=True)
    _randomize_running_stats(net)
    x = torch.randn(1, 1, 21, 19)
    scripted = torch.jit.script(net.eval())
    torch.testing.assert_close(scripted(x), net(x))
    assert isinstance(scripted.train()(x), torch.Tensor)  # TorchScript compiles the inference path only
