"""SECOND-style 2D BEV backbone ("RPN"): strided Conv-BN-ReLU stages, upsampled and concatenated.

Data flow: BEV features ``[B, C_in, H, W]`` -> stage ``i`` (one strided 3x3 conv, then
``layer_nums[i]`` 3x3 convs, all Conv-BN-ReLU) -> deblock ``i`` brings the stage output to a common
resolution (transposed conv for ``upsample_strides[i] >= 1``, strided conv for fractional strides)
-> concatenated along channels -> ``[B, sum(num_upsample_filters), H', W']``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["BEVBackbone"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1),
        nn.ReLU(inplace=True),
    ]


class BEVBackbone(nn.Module):
    """SECOND/PointPillars 2D backbone on dense BEV maps.

    Args:
        in_channels: channels ``C_in`` of the input BEV map.
        layer_nums: extra 3x3 convs per stage (after the stage's first, possibly strided, conv).
        layer_strides: stride of each stage's first conv (relative to the previous stage).
        num_filters: channels of each stage.
        upsample_strides: per stage, the resolution factor of its deblock: ``s >= 1`` upsamples by
            ``s`` (transposed conv), ``s < 1`` downsamples by ``round(1 / s)`` (strided conv).
            All deblock outputs must reach the same resolution.
        num_upsample_filters: output channels of each deblock.

    BatchNorm uses eps 1e-3 (as SECOND) and PyTorch's momentum 0.1 (SECOND's 0.01 suits long
    schedules; our CPU runs are short and evaluate after a few hundred steps).

    Attributes:
        out_channels: ``sum(num_upsample_filters)``, channels of the output.
        out_stride: output resolution divided into the input resolution (``H / H'``), a float
            (e.g. 1.0 with the defaults).

    Shapes:
        ``forward(x [B, C_in, H, W]) -> [B, out_channels, H * s, W * s]``, ``s = 1 / out_stride``;
        ``H`` and ``W`` must be divisible by the product of ``layer_strides``.
    """

    def __init__(
        self,
        in_channels: int,
        layer_nums: Sequence[int] = (5, 5),
        layer_strides: Sequence[int] = (1, 2),
        num_filters: Sequence[int] = (128, 256),
        upsample_strides: Sequence[float] = (1, 2),
        num_upsample_filters: Sequence[int] = (128, 128),
    ) -> None:
        super().__init__()
        n = len(layer_nums)
        if not (len(layer_strides) == len(num_filters) == len(upsample_strides) == len(num_upsample_filters) == n):
            raise ValueError(
                "BEVBackbone: layer_nums, layer_strides, num_filters, upsample_strides and "
                f"num_upsample_filters must have the same length, got {len(layer_nums)}, {len(layer_strides)}, "
                f"{len(num_filters)}, {len(upsample_strides)}, {len(num_upsample_filters)}")
        if n == 0:
            raise ValueError("BEVBackbone: needs at least one stage")
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        cin = in_channels
        cum_stride = 1.0
        out_factors = []
        for i in range(n):
            layers = _conv_bn_relu(cin, num_filters[i], layer_strides[i])
            for _ in range(layer_nums[i]):
                layers += _conv_bn_relu(num_filters[i], num_filters[i])
            self.blocks.append(nn.Sequential(*layers))
            cum_stride *= layer_strides[i]
            u = upsample_strides[i]
            if u >= 1:
                k = int(round(u))
                deblock = [nn.ConvTranspose2d(num_filters[i], num_upsample_filters[i], k, stride=k, bias=False)]
                out_factors.append(cum_stride / k)
            else:
                k = int(round(1.0 / u))
                deblock = [nn.Conv2d(num_filters[i], num_upsample_filters[i], k, stride=k, bias=False)]
                out_factors.append(cum_stride * k)
            deblock += [nn.BatchNorm2d(num_upsample_filters[i], eps=1e-3, momentum=0.1), nn.ReLU(inplace=True)]
            self.deblocks.append(nn.Sequential(*deblock))
            cin = num_filters[i]
        if len(set(out_factors)) != 1:
            raise ValueError(f"BEVBackbone: deblocks reach different strides {out_factors}; "
                             "choose upsample_strides so that all stages meet at one resolution")
        self.out_channels: int = int(sum(num_upsample_filters))
        self.out_stride: float = float(out_factors[0])
        self.total_stride: int = int(cum_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the stages and concatenates the deblocks.

        Args:
            x: ``[B, C_in, H, W]`` BEV features.

        Returns:
            ``[B, out_channels, H / out_stride, W / out_stride]``.
        """
        h, w = x.shape[-2:]
        if h % self.total_stride or w % self.total_stride:
            raise ValueError(f"BEVBackbone: input size {h}x{w} must be divisible by the total stride "
                             f"{self.total_stride} of layer_strides")
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        return torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]
