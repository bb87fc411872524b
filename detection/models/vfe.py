"""Learned voxel feature encoders of the detectors: the PointPillars / DSVT pillar feature net."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from perception3d.errors import DataError
from perception3d.ops.voxelize import check_point_to_voxel, check_points, check_size_range

__all__ = ["PillarVFE"]


class PillarVFE(nn.Module):
    """PointPillars-style pillar feature net (stacked PFN layers) on dynamic voxels.

    Per point: its C input features, the offset of (x, y, z) to the mean of its voxel's points,
    and the offset to the voxel's geometric centre (C + 6 features). Each PFN layer is Linear (no
    bias) -> BatchNorm1d -> ReLU. A layer before the last has half its width and appends, to each
    point, the max of that half over the point's voxel; the last layer's max over the voxel's
    points (scatter ``amax``) is the voxel feature. One layer is the PointPillars encoder; DSVT
    uses two (``filters=(128, 128)``).

    With ``height_bins = K > 0`` each voxel feature is followed by its vertical profile (ours, not
    in PointPillars or DSVT): the voxel's height is cut into ``K`` equal bins, each point gives
    each bin a tent weight ``max(0, 1 - |z - c_k| / h)`` (``c_k`` the bin centre, ``h`` the bin
    height: linear interpolation onto the two nearest centres), and the voxel takes the max over its
    points per bin. The profile says which heights a pillar occupies, with sub-bin precision at its
    edges. A max-pooled PFN feature gives a pillar's top or bottom as one number; the top of a car,
    though, is a max over many pillars, which the convolutions and attention that follow (sums and
    averages) compute poorly from one number per pillar, and easily from per-height occupancies, as
    a voxel backbone's z levels provide them.

    With ``normalize_inputs`` the coordinates are rescaled before the first layer: (x, y, z) to
    ``[-1, 1]`` over ``pc_range_m``, both offsets in voxel sizes. Unscaled, the absolute
    coordinates (spread over tens of metres) outweigh the centimetre offsets that carry a voxel's
    inner geometry by two orders of magnitude in every channel at initialisation, and still after
    training (measurements: docs/experiments/dsvt_vs_second.md).

    Args:
        in_channels: C, point feature size (x, y, z first).
        filters: output width of each PFN layer (an int: one layer); the last is the voxel
            feature width. Layers before the last need an even width.
        voxel_size_m: ``(sx, sy, sz)`` in metres.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` in metres.
        normalize_inputs: rescale the coordinates as above.
        height_bins: ``K``, bins of the vertical profile appended to each voxel feature (0: none);
            the output has ``filters[-1] + K`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        filters: Union[int, Sequence[int]],
        voxel_size_m: Sequence[float],
        pc_range_m: Sequence[float],
        normalize_inputs: bool = False,
        height_bins: int = 0,
    ) -> None:
        super().__init__()
        vs, pr = check_size_range(voxel_size_m, pc_range_m)
        if height_bins < 0:
            raise DataError(f"PillarVFE.height_bins: expected a count >= 0, got {height_bins!r}")
        if in_channels < 3:
            raise DataError(f"PillarVFE.in_channels: expected >= 3 (x, y, z first), got {in_channels}")
        filters = (filters,) if isinstance(filters, int) else tuple(int(f) for f in filters)
        if not filters or min(filters) < 1 or any(f % 2 for f in filters[:-1]):
            raise DataError(f"PillarVFE.filters: expected positive widths, even before the last, got {filters!r}")
        self.in_channels = in_channels
        self.height_bins = int(height_bins)
        self.out_channels = filters[-1] + self.height_bins
        self.register_buffer("voxel_size", torch.tensor(vs), persistent=False)
        self.register_buffer("origin", torch.tensor(pr[:3]), persistent=False)
        self.register_buffer("range_centre", (torch.tensor(pr[:3]) + torch.tensor(pr[3:])) / 2, persistent=False)
        self.register_buffer("range_half", (torch.tensor(pr[3:]) - torch.tensor(pr[:3])) / 2, persistent=False)
        self.normalize_inputs = normalize_inputs
        widths = [f // 2 for f in filters[:-1]] + [filters[-1]]
        inputs = [in_channels + 6, *filters[:-1]]
        self.linears = nn.ModuleList(nn.Linear(i, w, bias=False) for i, w in zip(inputs, widths))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w, eps=1e-3, momentum=0.01) for w in widths)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before stacked layers name the one layer `linear` / `norm`
        for old, new in (("linear.", "linears.0."), ("norm.", "norms.0.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def point_features(
        self, points: torch.Tensor, point_to_voxel: torch.Tensor, coords: torch.Tensor
    ) -> torch.Tensor:
        """Augmented per-point features [M, C + 6] of the M points with ``point_to_voxel >= 0``
        (rescaled when ``normalize_inputs``)."""
        valid = point_to_voxel >= 0
        idx = point_to_voxel[valid]
        pts = points[valid]
        xyz = pts[:, :3]
        V = coords.shape[0]
        sums = xyz.new_zeros((V, 3)).index_add(0, idx, xyz)
        cnt = torch.bincount(idx, minlength=V).to(xyz.dtype).clamp(min=1.0)
        mean = sums / cnt.unsqueeze(1)
        vs = self.voxel_size.to(xyz)
        centre = (coords.flip(1).to(xyz.dtype) + 0.5) * vs + self.origin.to(xyz)
        if not self.normalize_inputs:
            return torch.cat([pts, xyz - mean[idx], xyz - centre[idx]], dim=1)
        absolute = (xyz - self.range_centre.to(xyz)) / self.range_half.to(xyz)
        return torch.cat([absolute, pts[:, 3:], (xyz - mean[idx]) / vs, (xyz - centre[idx]) / vs], dim=1)

    def forward(self, points: torch.Tensor, point_to_voxel: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Encode each voxel.

        Args:
            points: [N, C] points (x, y, z, ...), metres.
            point_to_voxel: [N] int64 voxel index per point, -1 for dropped points
                (from :func:`voxelize_dynamic`).
            coords: [V, 3] int32 voxel coordinates ``(z, y, x)``.

        Returns:
            [V, filters[-1] + height_bins] voxel features (zeros for a voxel without points).
        """
        check_points(points)
        check_point_to_voxel(points, point_to_voxel, "PillarVFE")
        if points.shape[1] != self.in_channels:
            raise DataError(f"PillarVFE.points: expected {self.in_channels} channels, got {points.shape[1]}")
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise DataError(f"PillarVFE.coords: expected [V, 3] (z, y, x), got {tuple(coords.shape)}")
        h = self.point_features(points, point_to_voxel, coords)
        idx = point_to_voxel[point_to_voxel >= 0]
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            h = torch.relu(norm(linear(h)))  # [M, w]
            pooled = h.new_zeros((coords.shape[0], h.shape[1]))
            pooled = pooled.scatter_reduce(0, idx.unsqueeze(1).expand_as(h), h, "amax", include_self=False)
            if i == len(self.linears) - 1:
                break
            h = torch.cat([h, pooled[idx]], dim=1)
        if not self.height_bins:
            return pooled
        return torch.cat([pooled, self.height_profile(points, point_to_voxel, coords)], dim=1)

    def height_profile(self, points: torch.Tensor, point_to_voxel: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """[V, height_bins] vertical profile of each voxel (see the class docstring); no gradient
        flows into the points, and a voxel without points gets zeros."""
        valid = point_to_voxel >= 0
        idx = point_to_voxel[valid]
        K = self.height_bins
        bin_h = self.voxel_size[2] / K
        bottom = coords[idx, 0].to(points.dtype) * self.voxel_size[2] + self.origin[2]
        u = (points[valid, 2] - bottom) / bin_h - 0.5  # position in bin-centre units
        lower = torch.floor(u)
        frac = u - lower
        profile = points.new_zeros(coords.shape[0] * K)
        for k, w in ((lower, 1.0 - frac), (lower + 1, frac)):
            inside = (k >= 0) & (k < K)
            profile.scatter_reduce_(0, idx[inside] * K + k[inside].long(), w[inside], "amax")
        return profile.view(-1, K)
