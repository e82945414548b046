"""Pure-PyTorch networks: the configurable-skip UNet and its parts."""

from unetseg.nets.blocks import BLOCKS, DoubleConv, ResidualDoubleConv
from unetseg.nets.skips import LONG_SKIPS, AddSkip, ConcatSkip, NoSkip
from unetseg.nets.unet import Decoder, Encoder, UNet

__all__ = [
    "BLOCKS",
    "LONG_SKIPS",
    "AddSkip",
    "ConcatSkip",
    "Decoder",
    "DoubleConv",
    "Encoder",
    "NoSkip",
    "ResidualDoubleConv",
    "UNet",
]
