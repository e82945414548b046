"""Networks: the configurable-skip UNet and its parts, in pure PyTorch.

``unet`` (Encoder + Decoder + head), ``skips`` (the long-skip merge modules and their registry),
``blocks`` (plain / residual / dense short skips), ``layers`` (dimension-generic layers, argument checks),
``encoders`` (smp encoders), ``build`` (a net from its class path and arguments). It imports torch only:
no Lightning and no other ``unetseg`` subpackage, so a net can be used and exported anywhere.
"""

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
