"""Pure-PyTorch networks: the configurable-skip UNet and its parts."""

from unetseg.nets.blocks import BLOCKS, DenseDoubleConv, DoubleConv, ResidualDoubleConv
from unetseg.nets.encoders import EncoderUNet
from unetseg.nets.skips import LONG_SKIPS, AddSkip, ConcatSkip, NoSkip
from unetseg.nets.unet import Decoder, Encoder, UNet

__all__ = [
    "BLOCKS",
    "LONG_SKIPS",
    "AddSkip",
    "ConcatSkip",
    "Decoder",
    "DenseDoubleConv",
    "DoubleConv",
    "Encoder",
    "EncoderUNet",
    "NoSkip",
    "ResidualDoubleConv",
    "UNet",
]
