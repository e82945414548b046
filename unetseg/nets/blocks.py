"""Convolution blocks used at every encoder and decoder level, chosen by name from :data:`BLOCKS`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unetseg.nets.layers import conv_norm_act, dropout_cls


class DoubleConv(nn.Module):
    """Two 3x3 convs: conv-norm-ReLU-conv-norm-ReLU (+ channel dropout if ``dropout > 0``).

    With ``norm=None`` the convs carry a bias and this is exactly one level of Ronneberger et al.'s U-Net
    (with same-padding).

    >>> import torch
    >>> DoubleConv(3, 8, spatial_dims=2)(torch.rand(2, 3, 10, 7)).shape
    torch.Size([2, 8, 10, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        norm: str | None = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers = [
            *conv_norm_act(in_channels, out_channels, spatial_dims, norm),
            *conv_norm_act(out_channels, out_channels, spatial_dims, norm),
        ]
        if dropout > 0:
            layers.append(dropout_cls(spatial_dims)(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ResidualDoubleConv(nn.Module):
    """Residual double conv: ReLU(conv-norm-ReLU-conv-norm(x) + shortcut(x)) (+ channel dropout).

    ``shortcut`` is ``nn.Identity()`` when ``in_channels == out_channels``, otherwise a 1x1 conv projection
    (followed by the norm, if any).

    >>> import torch
    >>> block = ResidualDoubleConv(3, 8, spatial_dims=3)
    >>> block(torch.rand(2, 3, 4, 5, 6)).shape, type(block.shortcut[0]).__name__
    (torch.Size([2, 8, 4, 5, 6]), 'Conv3d')
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        norm: str | None = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_norm_act(in_channels, out_channels, spatial_dims, norm),
            *conv_norm_act(out_channels, out_channels, spatial_dims, norm, act=False),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else conv_norm_act(in_channels, out_channels, spatial_dims, norm, kernel_size=1, act=False)
        )
        self.act = nn.ReLU(inplace=True)
        self.dropout: nn.Module = dropout_cls(spatial_dims)(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.act(self.body(x) + self.shortcut(x)))


class DenseDoubleConv(nn.Module):
    """Dense double conv (DenseNet): each 3x3 conv sees the concatenation of all previous feature maps.

    ``h1 = f1(x)``, ``h2 = f2([x, h1])`` (conv-norm-ReLU, growth rate ``g = max(1, out_channels // 2)`` each),
    then a 1x1 conv-norm-ReLU transition maps ``[x, h1, h2]`` (``in_channels + 2g``) to ``out_channels``
    (+ channel dropout). Huang et al. (2017) dense connectivity inside one block, as in FC-DenseNet.

    >>> import torch
    >>> block = DenseDoubleConv(3, 8, spatial_dims=3)
    >>> block(torch.rand(2, 3, 4, 5, 6)).shape, block.transition[0].in_channels
    (torch.Size([2, 8, 4, 5, 6]), 11)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        norm: str | None = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        growth = max(1, out_channels // 2)
        self.layers = nn.ModuleList(
            [
                conv_norm_act(in_channels, growth, spatial_dims, norm),
                conv_norm_act(in_channels + growth, growth, spatial_dims, norm),
            ]
        )
        self.transition = conv_norm_act(
            in_channels + 2 * growth, out_channels, spatial_dims, norm, kernel_size=1
        )
        self.dropout: nn.Module = dropout_cls(spatial_dims)(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.dropout(self.transition(torch.cat(features, dim=1)))


#: Block name -> class; every class takes ``(in_channels, out_channels, spatial_dims, norm, dropout)``.
BLOCKS: dict[str, type[nn.Module]] = {
    "plain": DoubleConv,
    "residual": ResidualDoubleConv,
    "dense": DenseDoubleConv,
}
