"""U-Net with a (pretrained) 2D encoder from segmentation-models-pytorch under the skip-configurable decoder.

Needs the ``[smp]`` extra (``pip install -c constraints.txt -e ".[smp]"``; on the CPU build of torch also
``python -m unetseg.compat.torchvision_cpu_shim install``, see ``docs/ablation.md``).
``segmentation_models_pytorch``
is imported when an :class:`EncoderUNet` is built, never at import of :mod:`unetseg.nets`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import partial
from types import ModuleType

import torch
from torch import Tensor, nn

from unetseg.nets.blocks import BLOCKS
from unetseg.nets.layers import UPSAMPLES, check_choice, conv_cls, conv_norm_act, upsample_layer
from unetseg.nets.skips import resolve_long_skip
from unetseg.nets.unet import (
    Decoder,
    _check_common,
    _check_positive_int,
    _num_params,
    constructor_args,
    crop_to,
    pad_to_multiple,
)

SMP_INSTALL_HINT = (
    'pip install -c constraints.txt -e ".[smp]", then on the CPU build of torch '
    "python -m unetseg.compat.torchvision_cpu_shim install (see docs/ablation.md)"
)


def import_smp() -> ModuleType:
    """Import ``segmentation_models_pytorch`` or raise ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module("segmentation_models_pytorch")
    except (ImportError, RuntimeError) as err:  # RuntimeError: torchvision's ops on the CPU build of torch
        raise ImportError(
            f"EncoderUNet needs segmentation-models-pytorch ({err}); install it with: {SMP_INSTALL_HINT}"
        ) from err


def _drop_unused_modules(encoder: nn.Module, in_channels: int, size_multiple: int) -> list[str]:
    """Replace the encoder's submodules that its forward never calls by ``nn.Identity()``; return their names.

    smp keeps the stages beyond ``depth`` (e.g. ResNet's ``layer4`` at depth 4): parameters without gradients
    that would count as encoder parameters and break DDP. Found with forward hooks on one small input (on the
    default device, so it also works inside ``torch.device("meta")``; in eval mode: BatchNorm stats stay).
    """
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod))) for m in encoder.modules()]
    size = max(64, 2 * size_multiple)
    training = encoder.training
    encoder.eval()  # no BatchNorm statistics update
    try:
        with torch.no_grad():  # on the default device: meta inside `with torch.device("meta")`
            encoder(torch.zeros(1, in_channels, size, size))
    finally:
        encoder.train(training)
        for hook in hooks:
            hook.remove()
    used = {id(p) for m in encoder.modules() if id(m) in called for p in m.parameters(recurse=False)}
    dropped: list[str] = []
    for name, module in list(encoder.named_modules()):
        if not name or id(module) in called or any(name.startswith(f"{d}.") for d in dropped):
            continue
        if any(True for _ in module.parameters()) and not any(id(p) in used for p in module.parameters()):
            parent_name, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, nn.Identity())
            dropped.append(name)
    return dropped


def default_decoder_channels(depth: int) -> tuple[int, ...]:
    """smp's Unet default ``(256, 128, 64, 32, 16)``, shallowest first and cut to ``depth`` levels."""
    return tuple(16 * 2**i for i in range(depth))


class EncoderUNet(nn.Module):
    """2D U-Net with an smp encoder (e.g. ``"resnet34"``, ``"efficientnet-b0"``, ``"tu-<timm name>"``) whose
    long skips are configurable exactly like :class:`~unetseg.nets.UNet`'s (``concat`` | ``add`` | ``none``).

    The encoder (``depth`` downsamplings) returns features ``f_1 ... f_depth`` at strides ``2 ... 2**depth``.
    Decoder level ``i`` (``i = depth - 1, ..., 1``, stride ``2**i``) is a :class:`~unetseg.nets.unet.Decoder`
    level of width ``decoder_channels[i]`` that merges skip ``f_i`` (projected by a 1x1 conv-norm-ReLU to that
    width when the encoder's width differs; these adapters count as skip parameters); level 0 upsamples to the
    input resolution without a skip (as smp's ``Unet``), then a 1x1 conv head.

    Args:
        spatial_dims: must be 2 (smp encoders are 2D); present so the CLI can link the data's value.
        in_channels: input channels (smp adapts the first conv, also for pretrained weights).
        out_channels: output channels (logits).
        encoder: smp encoder name (``segmentation_models_pytorch.encoders.get_encoder_names()``, or ``tu-*``).
        encoder_weights: ``None`` (random init) or smp's weights name, e.g. ``"imagenet"`` (downloaded once).
        encoder_depth: number of encoder downsamplings (2-5); the input is padded to a multiple of
            ``2 ** encoder_depth``.
        decoder_channels: decoder widths, **shallowest first**, one per level 0 (full resolution) to
            ``encoder_depth - 1``; ``None`` gives ``(16, 32, 64, 128, 256)`` cut to ``encoder_depth``.
        long_skip: one mode for all ``encoder_depth - 1`` skips or one per skip, shallowest (stride 2) first.
        block, norm, upsample, dropout: as for :class:`~unetseg.nets.UNet` (decoder blocks only).

    Example (with the ``[smp]`` extra)::

        net = EncoderUNet(in_channels=1, out_channels=3, encoder="resnet18", long_skip="add")
        net(torch.rand(2, 1, 50, 70)).shape  # torch.Size([2, 3, 50, 70])
    """

    #: Constructor argument that sets the net's width (used by the parameter-matched ablation).
    width_argument = "decoder_channels"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 2,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: Sequence[int] | None = None,
        long_skip: str | Sequence[str] = "concat",
        block: str = "plain",
        norm: str | None = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.init_args = constructor_args(EncoderUNet.__init__, locals())
        check_choice("spatial_dims", spatial_dims, [2])
        decoder_channels = _check_decoder_args(
            in_channels, out_channels, encoder_depth, upsample, decoder_channels, block, norm, dropout
        )
        smp = import_smp()
        names = smp.encoders.get_encoder_names()
        if not encoder.startswith("tu-") and encoder not in names:
            raise ValueError(
                f"encoder={encoder!r} is not an smp encoder; expected one of segmentation_models_pytorch"
                f".encoders.get_encoder_names() (e.g. {names[:6]}) or 'tu-<timm name>'"
            )
        self.encoder = smp.encoders.get_encoder(
            encoder, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights
        )
        _drop_unused_modules(self.encoder, in_channels, 2**encoder_depth)  # stages beyond encoder_depth
        encoder_channels = tuple(self.encoder.out_channels[1:])  # f_1 ... f_depth (drop the input itself)
        # Decoder levels 1 .. depth-1 over the encoder's deepest feature (the bottleneck).
        level_channels = (*decoder_channels[1:], encoder_channels[-1])
        self.long_skip = resolve_long_skip(long_skip, level_channels)
        _check_skip_features(encoder, encoder_channels[:-1], self.long_skip)
        self.decoder = Decoder(2, level_channels, self.long_skip, block, norm, dropout, upsample)
        # 1x1 adapters from the encoder's skip widths to the decoder's (only where a skip is used).
        self.adapters = nn.ModuleList(
            nn.Identity()
            if mode == "none" or c_enc == c_dec
            else conv_norm_act(c_enc, c_dec, 2, norm, kernel_size=1)
            for mode, c_enc, c_dec in zip(
                self.long_skip, encoder_channels[:-1], decoder_channels[1:], strict=True
            )
        )
        make_block = partial(BLOCKS[block], spatial_dims=2, norm=norm, dropout=dropout)
        self.final = nn.Sequential(  # level 0: up to the input resolution, no skip
            upsample_layer(upsample, level_channels[0], decoder_channels[0], 2),
            make_block(decoder_channels[0], decoder_channels[0]),
        )
        self.head = conv_cls(2)(decoder_channels[0], out_channels, kernel_size=1)
        self.spatial_dims = 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder_name = encoder
        self.encoder_channels = encoder_channels
        self.decoder_channels = tuple(decoder_channels)
        self.block = block
        self.size_multiple = 2**encoder_depth

    def forward(self, x: Tensor) -> Tensor:
        padded, starts = pad_to_multiple(x, self.size_multiple)
        features = self.encoder(padded)[1:]
        skips = [adapter(f) for adapter, f in zip(self.adapters, features[:-1], strict=True)]
        y = self.final(self.decoder([*skips, features[-1]]))
        return crop_to(self.head(y), starts, x.shape[2:])

    def layer_groups(self) -> dict[str, nn.Module]:
        """Parts in data-flow order: ``encoder.<child>`` (the smp encoder's top-level modules that have
        parameters), ``decoder.<i>`` (level ``i``, with its skip adapter), ``decoder.0`` and ``head``."""
        groups: dict[str, nn.Module] = {
            f"encoder.{name}": child
            for name, child in self.encoder.named_children()
            if any(True for _ in child.parameters())
        }
        last = len(self.decoder.stages)
        for j, stage in enumerate(self.decoder.stages):
            groups[f"decoder.{last - j}"] = nn.ModuleList([stage, self.adapters[last - j - 1]])
        groups["decoder.0"] = self.final
        groups["head"] = self.head
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """``encoder``, ``decoder``, ``skips`` (what exists only because skips feed the decoder, incl. the
        1x1 adapters), ``head`` and ``total``; the parts sum to ``total``."""
        skips = _num_params(self.adapters) + self.decoder.skip_parameter_count()
        decoder = _num_params(self.decoder) + _num_params(self.final) + _num_params(self.adapters)
        return {
            "encoder": _num_params(self.encoder),
            "decoder": decoder - skips,
            "skips": skips,
            "head": _num_params(self.head),
            "total": _num_params(self),
        }


def smp_available() -> bool:
    """True when ``segmentation_models_pytorch`` imports (the ``[smp]`` extra is installed and working)."""
    try:
        import_smp()
    except ImportError:
        return False
    return True


def _check_decoder_args(
    in_channels: int,
    out_channels: int,
    encoder_depth: int,
    upsample: str,
    decoder_channels: Sequence[int] | None,
    block: str,
    norm: str | None,
    dropout: float,
) -> Sequence[int]:
    """Check ``EncoderUNet``'s arguments; the decoder channels (default: one per level for the depth)."""
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("out_channels", out_channels)
    check_choice("encoder_depth", encoder_depth, [2, 3, 4, 5])
    check_choice("upsample", upsample, sorted(UPSAMPLES))
    if decoder_channels is None:
        decoder_channels = default_decoder_channels(encoder_depth)
    if not isinstance(decoder_channels, (list, tuple)) or len(decoder_channels) != encoder_depth:
        raise ValueError(
            f"decoder_channels={decoder_channels!r} must have encoder_depth={encoder_depth} entries "
            f"(one per decoder level, full resolution first)"
        )
    _check_common(2, decoder_channels, block, norm, dropout)
    return decoder_channels


def _check_skip_features(encoder: str, skip_channels: Sequence[int], long_skip: Sequence[str]) -> None:
    """A long skip needs an encoder feature to merge: 0-channel features (no such stride) need 'none'."""
    for i, (c, mode) in enumerate(zip(skip_channels, long_skip, strict=True)):
        if c == 0 and mode != "none":
            suggestion = ["none" if ch == 0 else m for ch, m in zip(skip_channels, long_skip, strict=True)]
            raise ValueError(
                f"encoder={encoder!r} has no stride-{2 ** (i + 1)} feature (0 channels), so "
                f"long_skip[{i}]={mode!r} has nothing to merge: give 'none' there, e.g. "
                f"long_skip={suggestion}"
            )
