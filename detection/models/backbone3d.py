"""SECOND-style sparse 3D backbone (the spconv baseline), producing a dense BEV feature map.

Layout follows OpenPCDet's ``VoxelBackBone8x`` (written here from the paper/config description):

==========  =================================================  ===================
stage       layers                                             stride (z, y, x)
==========  =================================================  ===================
input       SubM 3^3 (in -> c0) + BN + ReLU                    1, 1, 1
stage 1     1 x SubM block (c0)                                1, 1, 1
stage 2     SparseConv 3^3 s2 p1 (c0 -> c1) + 2 x SubM (c1)    2, 2, 2
stage 3     SparseConv 3^3 s2 p1 (c1 -> c2) + 2 x SubM (c2)    4, 4, 4
stage 4     SparseConv 3^3 s2 p(0,1,1) (c2 -> c3) + 2 x SubM   8, 8, 8   (bev_stride=8)
            or s(2,1,1) p(0,1,1) when bev_stride=4             8, 4, 4
out         SparseConv (3,1,1) s(2,1,1) (c3 -> out_channels)   16, ., .
==========  =================================================  ===================

Every conv is followed by ``BatchNorm1d(eps=1e-3, momentum=0.01)`` and ReLU. The output sparse
tensor is densified and its z axis folded into channels: BEV ``[B, out_channels * Z', Y', X']``
(OpenPCDet's HeightCompression). For the KITTI grid ``(Z, Y, X) = (41, 1600, 1408)`` this gives
``[B, 256, 200, 176]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from perception3d.errors import ConfigError, DataError
from perception3d.sparse import SparseVoxels, spconv

__all__ = ["SparseBackbone3D"]


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm1d(c, eps=1e-3, momentum=0.01), nn.ReLU()]


def _subm(cin: int, cout: int, key: str) -> spconv.SparseSequential:
    return spconv.SparseSequential(
        spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key), *_bn_relu(cout)
    )


def _down(cin: int, cout: int, kernel, stride, padding, key: str) -> spconv.SparseSequential:
    return spconv.SparseSequential(
        spconv.SparseConv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False, indice_key=key),
        *_bn_relu(cout),
    )


def _out_size(size: Sequence[int], kernel, stride, padding) -> tuple[int, int, int]:
    k, s, p = (x if isinstance(x, (tuple, list)) else (x, x, x) for x in (kernel, stride, padding))
    return tuple((n + 2 * p[i] - k[i]) // s[i] + 1 for i, n in enumerate(size))  # type: ignore[return-value]


class SparseBackbone3D(nn.Module):
    """SECOND-style sparse backbone: voxel features -> dense BEV features.

    Args:
        in_channels: C_in, voxel feature size (e.g. 4 for a mean-VFE of x, y, z, intensity).
        spatial_shape: input grid ``(Z, Y, X)`` in voxels (e.g. ``(41, 1600, 1408)`` for KITTI
            with 0.05 x 0.05 x 0.1 m voxels; OpenPCDet adds 1 to Z).
        channels: widths ``(c0, c1, c2, c3)`` of the four stages.
        out_channels: width of the final z-collapsing conv.
        bev_stride: 8 (default, SECOND) or 4 (stage 4 down-samples z only).

    Call ``forward(voxels)`` with a :class:`SparseVoxels` of ``spatial_shape``; it returns
    ``(bev [B, out_channels * Z', Y / bev_stride, X / bev_stride], bev_stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_shape: Sequence[int],
        channels: Sequence[int] = (16, 32, 64, 64),
        out_channels: int = 128,
        bev_stride: int = 8,
    ) -> None:
        super().__init__()
        if len(tuple(spatial_shape)) != 3 or min(spatial_shape) <= 0:
            raise ConfigError(f"SparseBackbone3D.spatial_shape: expected 3 positive ints (Z, Y, X), got {spatial_shape!r}")
        if len(tuple(channels)) != 4:
            raise ConfigError(f"SparseBackbone3D.channels: expected 4 stage widths, got {channels!r}")
        if bev_stride not in (4, 8):
            raise ConfigError(f"SparseBackbone3D.bev_stride: expected 4 or 8, got {bev_stride!r}")
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.in_channels = int(in_channels)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.out_channels = int(out_channels)
        self.bev_stride = int(bev_stride)
        s4 = (2, 2, 2) if bev_stride == 8 else (2, 1, 1)

        self.conv_input = _subm(in_channels, c0, "subm1")
        self.conv1 = spconv.SparseSequential(_subm(c0, c0, "subm1"))
        self.conv2 = spconv.SparseSequential(
            _down(c0, c1, 3, 2, 1, "spconv2"), _subm(c1, c1, "subm2"), _subm(c1, c1, "subm2")
        )
        self.conv3 = spconv.SparseSequential(
            _down(c1, c2, 3, 2, 1, "spconv3"), _subm(c2, c2, "subm3"), _subm(c2, c2, "subm3")
        )
        self.conv4 = spconv.SparseSequential(
            _down(c2, c3, 3, s4, (0, 1, 1), "spconv4"), _subm(c3, c3, "subm4"), _subm(c3, c3, "subm4")
        )
        self.conv_out = _down(c3, out_channels, (3, 1, 1), (2, 1, 1), 0, "spconv_down2")

        shape = self.spatial_shape
        for k, s, p in ((3, 2, 1), (3, 2, 1), (3, s4, (0, 1, 1)), ((3, 1, 1), (2, 1, 1), 0)):
            shape = _out_size(shape, k, s, p)
        if min(shape) <= 0:
            raise ConfigError(f"SparseBackbone3D.spatial_shape: {spatial_shape!r} is too small (output {shape})")
        self.out_spatial_shape: tuple[int, int, int] = shape

    @property
    def bev_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the BEV map: ``(out_channels * Z', Y', X')``."""
        z, y, x = self.out_spatial_shape
        return (self.out_channels * z, y, x)

    def forward_sparse(self, voxels: SparseVoxels) -> SparseVoxels:
        """Run the sparse stages.

        Args:
            voxels: input with ``num_channels == in_channels`` and ``spatial_shape`` equal to the
                backbone's.

        Returns:
            Sparse output of the z-collapsing conv, spatial shape ``out_spatial_shape``.
        """
        if not isinstance(voxels, SparseVoxels):
            raise DataError(f"SparseBackbone3D: expected SparseVoxels, got {type(voxels).__name__}")
        if voxels.num_channels != self.in_channels:
            raise DataError(
                f"SparseBackbone3D: voxels.feats has {voxels.num_channels} channels, expected {self.in_channels}"
            )
        if voxels.spatial_shape != self.spatial_shape:
            raise DataError(
                f"SparseBackbone3D: voxels.spatial_shape {voxels.spatial_shape}, expected {self.spatial_shape}"
            )
        x = voxels.to_spconv()
        x = self.conv_input(x)
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = self.conv_out(x)
        return SparseVoxels.from_spconv(x)

    @staticmethod
    def to_bev(voxels: SparseVoxels) -> torch.Tensor:
        """Densify and fold z into channels.

        Args:
            voxels: sparse tensor with C channels and spatial shape ``(Z, Y, X)``.

        Returns:
            [B, C * Z, Y, X] dense BEV map (channel index ``c * Z + z``).
        """
        d = voxels.dense()  # [B, C, Z, Y, X]
        b, c, z, y, x = d.shape
        return d.view(b, c * z, y, x)

    def forward(self, voxels: SparseVoxels) -> tuple[torch.Tensor, int]:
        """Sparse stages followed by :meth:`to_bev`.

        Returns:
            bev: [B, out_channels * Z', Y', X'] float features.
            stride: BEV stride in input voxels along y and x (``bev_stride``).
        """
        return self.to_bev(self.forward_sparse(voxels)), self.bev_stride
