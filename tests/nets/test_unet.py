"""Tests for the configurable-skip UNet (unetseg.nets): shapes, information paths, parameter accounting."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unetseg.nets.blocks
import unetseg.nets.layers
import unetseg.nets.skips
import unetseg.nets.unet
from unetseg.nets import (
    BLOCKS,
    LONG_SKIPS,
    AddSkip,
    ConcatSkip,
    Decoder,
    DoubleConv,
    Encoder,
    NoSkip,
    ResidualDoubleConv,
    UNet,
)
from unetseg.nets.layers import group_count

TINY = (4, 8, 16)
CONV_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on shared CPUs (10x slower otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, CONV_TYPES)]


# --------------------------------------------------------------------------------------------------------
# Shapes, backward and gradient flow over skip mode x block (plain | residual) x 2D/3D x odd sizes.


@pytest.mark.parametrize("long_skip", ["concat", "add", "none"])
@pytest.mark.parametrize("block", ["plain", "residual"])
@pytest.mark.parametrize(
    ("spatial_dims", "size"),
    [(2, (37, 45)), (2, (64, 64)), (3, (9, 17, 12))],
    ids=["2d-odd", "2d-64", "3d-odd"],
)
def test_shape_backward_and_gradient_reach_first_conv(long_skip, block, spatial_dims, size):
    torch.manual_seed(0)
    model = UNet(
        spatial_dims, in_channels=2, out_channels=3, channels=TINY, long_skip=long_skip, block=block
    )
    x = torch.randn(2, 2, *size)
    out = model(x)
    assert out.shape == (2, 3, *size)
    out.square().mean().backward()
    first_conv = convs(model.encoder)[0]
    assert first_conv.in_channels == 2
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    # Every parameter takes part in the forward pass, whatever the skip mode.
    assert all(p.grad is not None for p in model.parameters())


def test_padding_is_zero_half_before_rest_after_and_cropped_back():
    """Documented behaviour: pad each dim to a multiple of 2**(levels-1), pad//2 before, the rest after."""
    torch.manual_seed(0)
    model = UNet(channels=TINY).eval()  # size multiple 4
    x = torch.randn(1, 1, 13, 22)  # 13 -> 16: (1, 2); 22 -> 24: (1, 1)
    expected = model(F.pad(x, [1, 1, 1, 2]))[:, :, 1:14, 1:23]
    assert model.size_multiple == 4
    torch.testing.assert_close(model(x), expected)


# --------------------------------------------------------------------------------------------------------
# Long skips: per-level modes and the information path.


def test_per_level_list_builds_one_merge_per_level_shallowest_first():
    model = UNet(channels=(4, 8, 16, 32), long_skip=["none", "concat", "add"])
    assert model.long_skip == ("none", "concat", "add")
    # Decoder stages run deep to shallow, so stage k serves skip level len-1-k.
    merges = [type(stage.merge) for stage in model.decoder.stages]
    assert merges == [AddSkip, ConcatSkip, NoSkip]
    block_in = [convs(stage.block)[0].in_channels for stage in model.decoder.stages]
    assert block_in == [16, 2 * 8, 4]
    assert model(torch.randn(2, 1, 19, 23)).shape == (2, 2, 19, 23)


def test_concat_at_one_level_changes_only_that_levels_block():
    all_add = UNet(channels=(4, 8, 16, 32), long_skip="add")
    one_concat = UNet(channels=(4, 8, 16, 32), long_skip=("add", "concat", "add"))
    shapes_add = [(n, p.shape) for n, p in all_add.named_parameters()]
    shapes_cat = [(n, p.shape) for n, p in one_concat.named_parameters()]
    differing = [(a, c) for a, c in zip(shapes_add, shapes_cat, strict=True) if a != c]
    # Level 1 (channels 8) is decoder stage 1 (deep to shallow); only its first conv's input grows 8 -> 16.
    assert differing == [
        (
            ("decoder.stages.1.block.body.0.weight", torch.Size([8, 8, 3, 3])),
            ("decoder.stages.1.block.body.0.weight", torch.Size([8, 16, 3, 3])),
        )
    ]


@pytest.mark.parametrize(
    "long_skip",
    [
        ("none", "none", "none"),
        ("concat", "concat", "concat"),
        ("add", "add", "add"),
        ("none", "concat", "add"),
    ],
)
def test_decoder_uses_a_skip_feature_iff_its_level_has_a_skip(long_skip):
    """Replacing an encoder skip feature changes the output exactly when that level's skip is not 'none'."""
    torch.manual_seed(0)
    model = UNet(channels=(4, 8, 16, 32), long_skip=long_skip).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(2, 1, 24, 16))
        reference = model.decoder(features)
        for level, mode in enumerate(long_skip):
            replaced = list(features)
            replaced[level] = torch.randn_like(features[level]) * 3
            changed = not torch.allclose(model.decoder(replaced), reference)
            assert changed == (mode != "none"), f"level {level} ({mode})"
        # The bottleneck path always exists.
        replaced = [*features[:-1], torch.randn_like(features[-1])]
        assert not torch.allclose(model.decoder(replaced), reference)


def test_merge_modules_channel_arithmetic_and_values():
    x_up, skip = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert set(LONG_SKIPS) == {"concat", "add", "none"}
    assert ConcatSkip(3).out_channels == 6 and AddSkip(3).out_channels == 3 and NoSkip(3).out_channels == 3
    cat = ConcatSkip(3)(x_up, skip)
    torch.testing.assert_close(cat[:, :3], skip)  # skip first, as in Ronneberger's figure
    torch.testing.assert_close(cat[:, 3:], x_up)
    torch.testing.assert_close(AddSkip(3)(x_up, skip), x_up + skip)
    assert NoSkip(3)(x_up, skip) is x_up
    assert all(n_params(cls(3)) == 0 for cls in LONG_SKIPS.values())


def test_decoder_rejects_wrong_number_of_features():
    decoder = Decoder(2, TINY)
    with pytest.raises(ValueError, match="expected 3 encoder features, got 2"):
        decoder([torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)])


def test_encoder_features_shallowest_first():
    features = Encoder(3, 1, TINY)(torch.randn(1, 1, 8, 12, 16))
    assert [tuple(f.shape) for f in features] == [(1, 4, 8, 12, 16), (1, 8, 4, 6, 8), (1, 16, 2, 3, 4)]


# --------------------------------------------------------------------------------------------------------
# Parameter accounting.


def counts(**kwargs) -> dict[str, int]:
    with torch.device("meta"):
        return UNet(**kwargs).parameter_counts()


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_parameter_relations_default_channels(block):
    channels = (32, 64, 128, 256, 512)
    cat, add, none = (counts(long_skip=m, block=block) for m in ("concat", "add", "none"))
    for c in (cat, add, none):
        assert c["encoder"] + c["decoder"] + c["skips"] + c["head"] == c["total"]
    assert cat["total"] > add["total"] == none["total"]
    assert add["skips"] == none["skips"] == 0
    # Concat doubles the input of each decoder level's first 3x3 conv (C -> 2C inputs, no bias under batch
    # norm): 9*C*C extra weights per level. A residual block additionally needs a 1x1 projection 2C -> C
    # (2*C*C weights) and its BatchNorm (2*C) where the add/none block has an identity shortcut.
    extra = sum(9 * c * c + (2 * c * c + 2 * c if block == "residual" else 0) for c in channels[:-1])
    assert cat["skips"] == extra
    assert cat["total"] - add["total"] == extra
    assert (
        cat["encoder"] == add["encoder"] and cat["decoder"] == add["decoder"] and cat["head"] == add["head"]
    )
    # The encoder (~4.7M) and the rest of the decoder are untouched; sum(9*C^2) = 783,360 is ~10% of ~7.8M.
    assert 0.09 < extra / cat["total"] < 0.14


def test_skip_parameters_only_for_concat_levels():
    c = counts(channels=(4, 8, 16, 32), long_skip=("add", "concat", "none"))
    assert c["skips"] == 9 * 8 * 8


def test_ronneberger_configuration_is_exact():
    with torch.device("meta"):
        model = UNet(in_channels=1, out_channels=2, channels=(64, 128, 256, 512, 1024), norm=None)
    # The paper's layer list (Ronneberger et al. 2015, Fig. 1), with same-padded 3x3 convs:
    widths = [64, 128, 256, 512, 1024]
    paper = []  # (layer, in, out, kernel) in network order
    c_in = 1
    for w in widths:  # contracting path, incl. the bottleneck
        paper += [("conv", c_in, w, 3), ("conv", w, w, 3)]
        c_in = w
    for w in reversed(widths[:-1]):  # expanding path: up-conv 2x2 halving channels, concat, two 3x3 convs
        paper += [("upconv", 2 * w, w, 2), ("conv", 2 * w, w, 3), ("conv", w, w, 3)]
    paper.append(("conv", 64, 2, 1))  # final 1x1 conv to the classes
    assert len(paper) == 23  # "In total the network has 23 convolutional layers."

    built = [
        (
            "upconv" if isinstance(m, nn.ConvTranspose2d) else "conv",
            m.in_channels,
            m.out_channels,
            m.kernel_size[0],
        )
        for m in convs(model)
    ]
    assert built == paper
    assert all(m.bias is not None for m in convs(model))
    assert all(m.stride == (2, 2) for m in convs(model) if isinstance(m, nn.ConvTranspose2d))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 18
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) for m in model.modules())

    expected = sum(c_in * c_out * k * k + c_out for _, c_in, c_out, k in paper)
    # By hand: contracting 18,842,048; expanding 9,176,576 + 2,294,528 + 573,824 + 143,552; 1x1 conv 130.
    assert expected == 31_030_658
    assert model.parameter_counts()["total"] == expected
    # The concat skips cost 9*C^2 weights at the first conv of each expanding level.
    assert model.parameter_counts()["skips"] == 9 * (64**2 + 128**2 + 256**2 + 512**2)


# --------------------------------------------------------------------------------------------------------
# Blocks.


def test_blocks_registry():
    assert {"plain": DoubleConv, "residual": ResidualDoubleConv}.items() <= BLOCKS.items()
    assert "dense" in BLOCKS
    assert not any(isinstance(m, ResidualDoubleConv) for m in UNet(channels=TINY).modules())
    residual = UNet(channels=TINY, block="residual")
    assert sum(isinstance(m, ResidualDoubleConv) for m in residual.modules()) == 5


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_residual_shortcut_identity_or_projection(spatial_dims):
    same = ResidualDoubleConv(8, 8, spatial_dims)
    assert isinstance(same.shortcut, nn.Identity)
    proj = ResidualDoubleConv(4, 8, spatial_dims, norm="batch")
    conv, norm = proj.shortcut
    conv_type = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    assert type(conv) is conv_type and conv.kernel_size == (1,) * spatial_dims
    assert (conv.in_channels, conv.out_channels) == (4, 8) and conv.bias is None
    assert isinstance(norm, nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)
    # In a residual UNet with "add", decoder blocks keep their width (identity); with concat they project.
    add = UNet(channels=TINY, block="residual", long_skip="add")
    cat = UNet(channels=TINY, block="residual", long_skip="concat")
    assert all(isinstance(s.block.shortcut, nn.Identity) for s in add.decoder.stages)
    assert all(not isinstance(s.block.shortcut, nn.Identity) for s in cat.decoder.stages)


def test_residual_block_adds_the_shortcut():
    """With the body's last conv zeroed, the block is ReLU(identity): the shortcut really is added."""
    block = ResidualDoubleConv(3, 3, 2, norm=None)
    last_conv = convs(block.body)[-1]
    nn.init.zeros_(last_conv.weight)
    nn.init.zeros_(last_conv.bias)
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(block(x), x.relu())


# --------------------------------------------------------------------------------------------------------
# Norm, upsample and dropout variants.


@pytest.mark.parametrize("norm", ["batch", "instance", "group", None])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
def test_norm_and_upsample_variants(norm, upsample):
    torch.manual_seed(0)
    model = UNet(channels=(4, 8, 12), norm=norm, upsample=upsample)
    out = model(torch.randn(2, 1, 21, 18))
    assert out.shape == (2, 2, 21, 18)
    out.mean().backward()
    norm_type = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d, "group": nn.GroupNorm, None: None}[
        norm
    ]
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))]
    block_convs = [m for m in convs(model.encoder) + convs(model.decoder) if m.kernel_size == (3, 3)]
    if norm_type is None:
        assert norms == []
        assert all(m.bias is not None for m in block_convs)
    else:
        assert norms and all(type(m) is norm_type for m in norms)
        assert all(m.affine for m in norms)
        # Block convs followed by a norm have no bias (the interp up-conv has no norm after it).
        assert all(m.bias is None for m in convs(model.encoder))
        assert all(m.bias is None for stage in model.decoder.stages for m in convs(stage.block))
    if norm == "group":
        assert {(m.num_channels, m.num_groups) for m in norms} == {(4, 4), (8, 8), (12, 6)}
    has_transpose = any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    has_resize = any(isinstance(m, nn.Upsample) for m in model.modules())
    assert (has_transpose, has_resize) == (upsample == "transpose", upsample == "interp")


@pytest.mark.parametrize(("channels", "groups"), [(4, 4), (6, 6), (7, 7), (9, 3), (12, 6), (64, 8), (1, 1)])
def test_group_count(channels, groups):
    assert group_count(channels) == groups


def test_interp_upsample_3d_is_trilinear_resize_then_conv():
    up = UNet(spatial_dims=3, channels=TINY, upsample="interp").decoder.stages[0].up
    resize, conv = up
    assert resize.mode == "trilinear" and resize.scale_factor == 2.0 and not resize.align_corners
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 8, (3, 3, 3))


def test_dropout_is_channel_dropout_in_every_block_and_only_in_training():
    model = UNet(spatial_dims=3, channels=TINY, dropout=0.5, block="residual")
    assert sum(isinstance(m, nn.Dropout3d) for m in model.modules()) == 5  # 3 encoder + 2 decoder blocks
    assert not any(isinstance(m, nn.Dropout3d) for m in UNet(spatial_dims=3, channels=TINY).modules())
    x = torch.randn(2, 1, 8, 8, 8)
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# --------------------------------------------------------------------------------------------------------
# Validation: every bad argument names the bad value and the allowed options.


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"long_skip": "cat"}, ["long_skip='cat'", "['add', 'concat', 'none']"]),
        ({"long_skip": ("concat", "cat")}, ["long_skip[1]='cat'", "['add', 'concat', 'none']"]),
        (
            {"long_skip": ("add",) * 3},
            ["long_skip has 3 entries", "channels=(4, 8, 16) needs 2", "shallowest first"],
        ),
        ({"long_skip": 5}, ["long_skip=5", "['add', 'concat', 'none']"]),
        ({"norm": "layer"}, ["norm='layer'", "['batch', 'group', 'instance', None]"]),
        ({"upsample": "nearest"}, ["upsample='nearest'", "['interp', 'transpose']"]),
        ({"spatial_dims": 1}, ["spatial_dims=1", "[2, 3]"]),
        ({"channels": (8,)}, ["channels=(8,)", "at least 2"]),
        ({"channels": (8, 0)}, ["channels[1]=0", "positive integer"]),
        ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout=-0.1", "[0, 1)"]),
        ({"in_channels": 0}, ["in_channels=0", "positive integer"]),
        ({"out_channels": 2.5}, ["out_channels=2.5", "positive integer"]),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, fragments):
    kwargs = {"channels": TINY, **kwargs}
    with pytest.raises(ValueError) as info:
        UNet(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_encoder_and_decoder_validate_too():
    with pytest.raises(ValueError, match=r"block='densest' is not one of \['dense', 'plain', 'residual'\]"):
        Encoder(2, 1, TINY, block="densest")
    with pytest.raises(ValueError, match=r"upsample='pixelshuffle'"):
        Decoder(2, TINY, upsample="pixelshuffle")


# --------------------------------------------------------------------------------------------------------
# Export-friendliness and docstring examples.


def test_scripted_and_exported_models_match_eager():
    torch.manual_seed(0)
    model = UNet(channels=TINY, long_skip=("none", "concat"), block="residual").eval()
    x = torch.randn(1, 1, 13, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still works
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize(
    "module",
    [unetseg.nets.layers, unetseg.nets.blocks, unetseg.nets.skips, unetseg.nets.unet],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.failed == 0
    if module is not unetseg.nets.layers:
        assert result.attempted > 0
