"""U-Net with a configurable long skip (``concat`` | ``add`` | ``none``) per level."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unetseg.nets.blocks import BLOCKS
from unetseg.nets.layers import (
    SPATIAL_DIMS,
    UPSAMPLES,
    check_choice,
    check_norm,
    conv_cls,
    maxpool_cls,
    upsample_layer,
)
from unetseg.nets.skips import LONG_SKIPS, resolve_long_skip


def _check_positive_int(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_common(
    spatial_dims: int, channels: Sequence[int], block: str, norm: str | None, dropout: float
) -> tuple[int, ...]:
    """Validate the arguments shared by Encoder/Decoder/UNet; return ``channels`` as a tuple."""
    check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)
    if not isinstance(channels, (list, tuple)) or len(channels) < 2:
        raise ValueError(
            f"channels={channels!r} must be a list/tuple of at least 2 positive integers "
            f"(one per encoder level, the last is the bottleneck)"
        )
    for i, c in enumerate(channels):
        _check_positive_int(f"channels[{i}]", c)
    check_choice("block", block, sorted(BLOCKS))
    check_norm(norm)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
    return tuple(channels)


def constructor_args(init: Callable[..., None], values: dict[str, Any]) -> dict[str, Any]:
    """The arguments of constructor ``init`` taken from its ``locals()``, tuples as lists (as YAML and
    checkpoints hold them). Nets keep them as ``init_args``, which checkpoints record (``net_config``)."""
    names = [name for name in inspect.signature(init).parameters if name != "self"]
    return {name: list(values[name]) if isinstance(values[name], tuple) else values[name] for name in names}


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, list[int]]:
    """Zero-pad every spatial dim of ``x`` up to a multiple of ``multiple`` (``pad // 2`` before, the rest
    after); also return the start of the original data in each dim (for :func:`crop_to`)."""
    pad: list[int] = []  # F.pad order: last dimension first
    starts: list[int] = []
    for size in x.shape[2:]:
        total = (multiple - size % multiple) % multiple
        starts.append(total // 2)
        pad = [total // 2, total - total // 2] + pad
    return F.pad(x, pad), starts


def crop_to(x: Tensor, starts: list[int], sizes: list[int]) -> Tensor:
    """Crop the spatial dims of ``x`` to ``sizes`` from ``starts`` (undoes :func:`pad_to_multiple`)."""
    for dim in range(len(sizes)):  # plain indexing: TorchScript rejects zip(strict=...)
        x = x.narrow(dim + 2, starts[dim], sizes[dim])
    return x


def level_crop(starts: list[int], sizes: list[int], level: int) -> tuple[list[int], list[int]]:
    """The crop of :func:`crop_to` at ``1 / 2**level`` of the full resolution: starts
    ``floor(start / 2**level)``, sizes ``ceil(size / 2**level)``. Level 0 is the full-resolution crop itself.

    >>> level_crop([3, 0], [9, 16], 2)
    ([0, 0], [3, 4])
    """
    factor = 2**level
    return [s // factor for s in starts], [-(-n // factor) for n in sizes]


def _num_params(module: nn.Module) -> int:
    """Number of parameters (works for modules on the meta device)."""
    return sum(p.numel() for p in module.parameters())


class Encoder(nn.Module):
    """Contracting path: level 0 is ``block(in_channels -> channels[0])``, level ``i`` is
    ``maxpool(2) -> block(channels[i-1] -> channels[i])``; the last level is the bottleneck.

    ``forward`` returns the feature of every level, shallowest first, bottleneck last.

    >>> import torch
    >>> [f.shape[1:] for f in Encoder(2, 1, (4, 8, 16))(torch.rand(2, 1, 16, 12))]
    [torch.Size([4, 16, 12]), torch.Size([8, 8, 6]), torch.Size([16, 4, 3])]
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        block: str = "plain",
        norm: str | None = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = _check_common(spatial_dims, channels, block, norm, dropout)
        _check_positive_int("in_channels", in_channels)
        make_block = partial(BLOCKS[block], spatial_dims=spatial_dims, norm=norm, dropout=dropout)
        pool = maxpool_cls(spatial_dims)
        stages: list[nn.Module] = [make_block(in_channels, channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            stages.append(nn.Sequential(pool(kernel_size=2), make_block(c_in, c_out)))
        self.stages = nn.ModuleList(stages)
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        features: list[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class DecoderStage(nn.Module):
    """One decoder level: ``block(merge(up(x), skip))``."""

    def __init__(self, up: nn.Module, merge: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.merge = merge
        self.block = block

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(self.merge(self.up(x), skip))


class Decoder(nn.Module):
    """Expanding path. Level ``i`` (run deep to shallow, ``i = len(channels) - 2, ..., 0``) upsamples
    ``channels[i+1] -> channels[i]``, merges the encoder's skip ``i`` with the long-skip module
    ``long_skip[i]`` (see :data:`~unetseg.nets.skips.LONG_SKIPS`) and applies
    ``block(merge.out_channels -> channels[i])``.

    ``long_skip`` is one mode for all levels or one per skip, **shallowest first**. ``forward`` takes the
    encoder's feature list (shallowest first, bottleneck last) and returns ``channels[0]`` features at the
    resolution of ``features[0]``.

    >>> import torch
    >>> enc = Encoder(2, 1, (4, 8, 16))
    >>> Decoder(2, (4, 8, 16), long_skip=("none", "concat"))(enc(torch.rand(2, 1, 16, 12))).shape
    torch.Size([2, 4, 16, 12])
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        long_skip: str | Sequence[str] = "concat",
        block: str = "plain",
        norm: str | None = "batch",
        dropout: float = 0.0,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        channels = _check_common(spatial_dims, channels, block, norm, dropout)
        check_choice("upsample", upsample, sorted(UPSAMPLES))
        self.long_skip = resolve_long_skip(long_skip, channels)
        self.block_factory = partial(BLOCKS[block], spatial_dims=spatial_dims, norm=norm, dropout=dropout)
        # Channel plan, in execution order (deep to shallow).
        in_channels = list(channels[1:])[::-1]
        self.skip_channels = list(channels[:-1])[::-1]
        modes = list(self.long_skip)[::-1]
        stages = []
        for c_in, c_skip, mode in zip(in_channels, self.skip_channels, modes, strict=True):
            merge = LONG_SKIPS[mode](c_skip)
            stages.append(
                DecoderStage(
                    up=upsample_layer(upsample, c_in, c_skip, spatial_dims),
                    merge=merge,
                    block=self.block_factory(merge.out_channels, c_skip),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.out_channels = channels[0]

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.levels(features, 1)[0]

    def levels(self, features: list[Tensor], num_levels: int = 1) -> list[Tensor]:
        """The outputs of the ``num_levels`` shallowest decoder levels, **shallowest first**: entry ``i`` is
        level ``i`` (``channels[i]`` features at ``1 / 2**i`` of the full resolution). Deep supervision reads
        the levels below full resolution; ``forward`` keeps only level 0."""
        if len(features) != len(self.stages) + 1:
            raise ValueError(f"expected {len(self.stages) + 1} encoder features, got {len(features)}")
        if not 1 <= num_levels <= len(self.stages):
            raise ValueError(
                f"num_levels={num_levels} must be in [1, {len(self.stages)}] (the decoder levels)"
            )
        x = features[-1]
        last = len(features) - 2
        first_kept = len(self.stages) - num_levels
        outputs: list[Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x, features[last - i])
            if i >= first_kept:
                outputs.insert(0, x)
        return outputs

    def skip_parameter_count(self) -> int:
        """Parameters that exist only because the skips feed the decoder.

        Per level: params(block as built) - params(same block built with ``in_channels=channels[i]``)
        + params(merge module). The reference blocks are built on the meta device (no memory).
        """
        total = 0
        for stage, c in zip(self.stages, self.skip_channels, strict=True):
            with torch.device("meta"):
                reference = self.block_factory(c, c)
            total += _num_params(stage.block) - _num_params(reference) + _num_params(stage.merge)
        return total


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with configurable long skips: ``Encoder + Decoder + head``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits; the head is a 1x1 conv).
        channels: features per encoder level; the last entry is the bottleneck. ``len(channels) - 1``
            levels are downsampled by 2x max pooling and there is one long skip per level above the
            bottleneck (including the full-resolution one).
        long_skip: ``"concat"`` (Ronneberger), ``"add"`` or ``"none"``, or a list/tuple with one mode per
            skip, **shallowest first** (entry 0 is the full-resolution skip).
        block: the block of every level, i.e. the short skips, a name in :data:`~unetseg.nets.blocks.BLOCKS`:
            ``"plain"`` (:class:`~unetseg.nets.blocks.DoubleConv`), ``"residual"`` (short additive skips,
            :class:`~unetseg.nets.blocks.ResidualDoubleConv`) or ``"dense"`` (short concatenating skips,
            :class:`~unetseg.nets.blocks.DenseDoubleConv`).
        norm: ``"batch"``, ``"instance"`` (affine), ``"group"`` (the largest group count <= 8 that divides
            the channels) or ``None`` (convs then carry a bias).
        upsample: ``"transpose"`` (2x2 up-conv, stride 2) or ``"interp"`` ((bi/tri)linear 2x resize then
            a 3x3 conv).
        dropout: channel dropout probability at the end of every block, in ``[0, 1)``.
        deep_supervision: add 1x1 conv heads (``ds_heads``) to the decoder levels below full resolution, as
            nnU-Net does; in training mode ``forward`` then returns a list of logits (see below).

    Any input size works: ``forward`` zero-pads every spatial dimension up to the next multiple of
    ``2 ** (len(channels) - 1)`` (``size_multiple``), with ``pad // 2`` before and the rest after, and crops
    the output back to the input's spatial size. Normalisation statistics see the padded zeros.

    **Deep supervision** follows nnU-Net: of the ``len(channels) - 1`` decoder levels, every level but the
    lowest (the one next to the bottleneck) gets a head, so levels ``0 .. len(channels) - 3`` are supervised
    (nnU-Net builds the lowest head too but gives its loss weight 0; here it is not built, so every head gets
    gradients and DDP finds no unused parameters). In training mode (``self.training``) ``forward`` returns
    one logits tensor per supervised level, **full resolution first**: entry ``i`` has ``1 / 2**i`` of the
    resolution, cropped like the full-resolution output (:func:`level_crop`: ``ceil(size / 2**i)`` per
    dimension; for input sizes that are multiples of ``size_multiple`` output pixel ``j`` covers exactly input
    pixels ``[j * 2**i, (j + 1) * 2**i)``). Entry 0 is what ``forward`` returns without deep supervision (the
    main ``head``). In eval mode, and in TorchScript/ONNX exports, ``forward`` returns that tensor alone, so
    inference, sliding windows, TTA and metrics do not change; :meth:`strip_deep_supervision` drops the heads
    for good. With 3 or fewer levels there is no level to supervise below full resolution: the list has one
    entry. :class:`unetseg.losses.DeepSupervisionLoss` weighs the levels.

    ``UNet(in_channels=1, out_channels=2, channels=(64, 128, 256, 512, 1024), norm=None)`` is exactly the
    network of Ronneberger et al. with same-padded convs (23 conv layers, 31,030,658 parameters).

    >>> import torch
    >>> UNet(spatial_dims=3, channels=(8, 16, 32))(torch.rand(1, 1, 20, 33, 17)).shape
    torch.Size([1, 2, 20, 33, 17])
    >>> UNet(channels=(8, 16, 32, 64), long_skip=("none", "concat", "add")).long_skip
    ('none', 'concat', 'add')
    >>> net = UNet(channels=(8, 16, 32, 64, 128), deep_supervision=True)
    >>> [tuple(y.shape) for y in net(torch.rand(1, 1, 37, 40))]  # training mode: levels 0, 1, 2
    [(1, 2, 37, 40), (1, 2, 19, 20), (1, 2, 10, 10)]
    >>> net.eval()(torch.rand(1, 1, 37, 40)).shape
    torch.Size([1, 2, 37, 40])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        long_skip: str | Sequence[str] = "concat",
        block: str = "plain",
        norm: str | None = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self.init_args = constructor_args(UNet.__init__, locals())
        channels = _check_common(spatial_dims, channels, block, norm, dropout)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        check_choice("upsample", upsample, sorted(UPSAMPLES))
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision={deep_supervision!r} must be true or false")
        self.long_skip = resolve_long_skip(long_skip, channels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.block = block
        self.size_multiple = 2 ** (len(channels) - 1)

        self.encoder = Encoder(spatial_dims, in_channels, channels, block, norm, dropout)
        self.decoder = Decoder(spatial_dims, channels, self.long_skip, block, norm, dropout, upsample)
        conv = conv_cls(spatial_dims)
        self.head = conv(channels[0], out_channels, kernel_size=1)
        # Deep supervision: heads on decoder levels 1 .. len(channels) - 3 (not the one at the bottleneck).
        self.deep_supervision = deep_supervision
        supervised = channels[1 : max(len(channels) - 2, 1)] if deep_supervision else ()
        self.ds_heads = nn.ModuleList(conv(c, out_channels, kernel_size=1) for c in supervised)

    def forward(self, x: Tensor) -> Tensor:
        # Annotated as the tensor that eval mode and the TorchScript/ONNX exports return (TorchScript compiles
        # only this path); in training mode with deep supervision it is the list of deep_supervision_outputs.
        if self.deep_supervision and self.training and not torch.jit.is_scripting():
            return self.deep_supervision_outputs(x)  # type: ignore[return-value]
        padded, starts = pad_to_multiple(x, self.size_multiple)
        return crop_to(self.head(self.decoder(self.encoder(padded))), starts, x.shape[2:])

    @torch.jit.unused
    def deep_supervision_outputs(self, x: Tensor) -> list[Tensor]:
        """Logits of every supervised decoder level, full resolution first (see the class docstring)."""
        padded, starts = pad_to_multiple(x, self.size_multiple)
        heads = [self.head, *self.ds_heads]
        features = self.decoder.levels(self.encoder(padded), len(heads))
        outputs = []
        for level, (head, feature) in enumerate(zip(heads, features, strict=True)):
            outputs.append(crop_to(head(feature), *level_crop(starts, list(x.shape[2:]), level)))
        return outputs

    def strip_deep_supervision(self) -> UNet:
        """Drop the deep-supervision heads (in place; returns ``self``): what inference and export keep.

        ``forward`` then returns one tensor in any mode, and ``init_args`` say ``deep_supervision=False``, so
        a checkpoint of the stripped net rebuilds it."""
        self.ds_heads = nn.ModuleList()
        self.deep_supervision = False
        self.init_args["deep_supervision"] = False
        return self

    def layer_groups(self) -> dict[str, nn.Module]:
        """The net's parts in data-flow order: ``encoder.<i>``, ``bottleneck``, ``decoder.<i>``, ``head``, and
        ``ds_heads`` (all deep-supervision heads, only when there are any).

        Level ``i`` is the resolution level (0 = full resolution) of both the encoder and the decoder; the
        decoder runs deep to shallow. A decoder level includes its upsampling and its skip merge.
        """
        *levels, bottleneck = self.encoder.stages
        groups: dict[str, nn.Module] = {f"encoder.{i}": stage for i, stage in enumerate(levels)}
        groups["bottleneck"] = bottleneck
        last = len(self.decoder.stages) - 1
        groups |= {f"decoder.{last - j}": stage for j, stage in enumerate(self.decoder.stages)}
        groups["head"] = self.head
        if len(self.ds_heads):
            groups["ds_heads"] = self.ds_heads
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: ``encoder`` (incl. bottleneck), ``decoder``, ``skips``, ``head``, ``ds_heads``
        (only with deep-supervision heads) and ``total``.

        ``skips`` counts the parameters that exist only because the long skips feed the decoder (see
        :meth:`Decoder.skip_parameter_count`; 0 for ``add``/``none``); ``decoder`` excludes them, so
        ``encoder + decoder + skips + head (+ ds_heads) == total``.
        """
        skips = self.decoder.skip_parameter_count()
        counts = {
            "encoder": _num_params(self.encoder),
            "decoder": _num_params(self.decoder) - skips,
            "skips": skips,
            "head": _num_params(self.head),
        }
        if len(self.ds_heads):
            counts["ds_heads"] = _num_params(self.ds_heads)
        return counts | {"total": _num_params(self)}
