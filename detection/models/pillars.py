"""PointPillars' pseudo-image (Lang et al., CVPR 2019): every pillar's feature written to its cell
of a dense bird's-eye-view map, for the 2D BEV backbone that follows (no 3D backbone)."""
from __future__ import annotations

import torch
from torch import nn

from perception3d.errors import ConfigError
from perception3d.sparse import SparseVoxels

__all__ = ["PillarScatter"]


class PillarScatter(nn.Module):
    """Scatter pillar features to a dense BEV map (empty cells are zero).

    Args:
        channels: C, the pillar feature width.
        grid_size: voxel grid ``(Z, Y, X)``; pillars have ``Z = 1``.

    ``forward(sv)`` takes :class:`SparseVoxels` with ``feats [V, C]`` and ``coords [V, 4]
    (b, 0, y, x)`` and returns ``(bev [B, C, Y, X], None)`` (channels-last memory), the signature of
    the other backbones.
    """

    def __init__(self, channels: int, grid_size: tuple[int, int, int]):
        super().__init__()
        if grid_size[0] != 1:
            raise ConfigError(f"PillarScatter: pillars need one voxel along z (voxel_size_m[2] equal to the z extent "
                              f"of pc_range_m), got a grid of {grid_size[0]} z voxels")
        self.channels = channels
        self.grid_size = tuple(grid_size)

    @property
    def bev_shape(self) -> tuple[int, int, int]:
        """``(C, Y, X)`` of the BEV map."""
        return (self.channels, self.grid_size[1], self.grid_size[2])

    def forward(self, sv: SparseVoxels) -> tuple[torch.Tensor, None]:
        _, Y, X = self.grid_size
        c = sv.coords.long()
        cells = sv.feats.new_zeros(sv.batch_size * Y * X, self.channels)
        cells[(c[:, 0] * Y + c[:, 2]) * X + c[:, 3]] = sv.feats
        return cells.view(sv.batch_size, Y, X, self.channels).permute(0, 3, 1, 2), None
