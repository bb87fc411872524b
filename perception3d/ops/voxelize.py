"""Point-cloud voxelization (hard and dynamic) and the parameter-free voxel encoders (means); the
learned encoders are the detectors' (`detection.models.vfe`).

Conventions (see ``perception3d/design.md``): ``voxel_size_m = (sx, sy, sz)`` and
``pc_range_m = (x0, y0, z0, x1, y1, z1)`` in metres, x/y/z order; voxel coordinates are returned
in ``(z, y, x)`` order as int32. The grid has ``(Z, Y, X) = round((hi - lo) / size)`` voxels and a
point ``p`` falls into voxel ``floor((p - lo) * (1 / size))``, computed in the points' dtype
(the same arithmetic as Open3D's ``ml.ops.voxelize``, so both agree on boundary points); a point
is *in range* when that voxel index lies inside the grid (so points exactly on the upper bound are
dropped).

Ordering (both functions, deterministic, independent of the device): voxels are numbered in the
order in which they first appear when the points are read in input order; within a voxel points
keep their input order. ``voxelize_hard`` keeps the first ``max_points_per_voxel`` points of each
voxel and the first ``max_voxels`` voxels in that order; the rest are dropped (the semantics of
the usual ``hard_voxelize`` of mmcv / OpenPCDet / spconv's PointToVoxel).

On CPU the grouping is one sequential pass of a compiled (numba) hash-table kernel; on other
devices it is vectorized torch (one stable sort of the in-range points plus small ops). Both give
identical results (tested), on the points' device.
"""
from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import torch
from torch import nn

from perception3d.errors import DataError

__all__ = [
    "grid_shape",
    "voxelize_hard",
    "voxelize_dynamic",
    "MeanVFE",
    "DynamicMeanVFE",
    "check_points",
    "check_size_range",
    "check_point_to_voxel",
]


def check_size_range(voxel_size_m: Sequence[float], pc_range_m: Sequence[float]) -> tuple[list, list]:
    try:
        vs = [float(v) for v in voxel_size_m]
        pr = [float(v) for v in pc_range_m]
    except (TypeError, ValueError):
        raise DataError(
            f"voxel_size_m / pc_range_m: expected numbers, got {voxel_size_m!r} / {pc_range_m!r}"
        ) from None
    if len(vs) != 3 or not all(v > 0 for v in vs):
        raise DataError(f"voxel_size_m: expected 3 positive sizes (sx, sy, sz) in m, got {voxel_size_m!r}")
    if len(pr) != 6 or not all(pr[i + 3] > pr[i] for i in range(3)):
        raise DataError(
            f"pc_range_m: expected (x0, y0, z0, x1, y1, z1) with x1 > x0, y1 > y0, z1 > z0, got {pc_range_m!r}"
        )
    return vs, pr


def grid_shape(voxel_size_m: Sequence[float], pc_range_m: Sequence[float]) -> tuple[int, int, int]:
    """Voxel grid size ``(Z, Y, X)`` for a voxel size and point-cloud range.

    Args:
        voxel_size_m: ``(sx, sy, sz)`` in metres.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` in metres.

    Returns:
        ``(Z, Y, X)`` = ``round((hi - lo) / size)`` per axis.
    """
    vs, pr = check_size_range(voxel_size_m, pc_range_m)
    x, y, z = (int(round((pr[i + 3] - pr[i]) / vs[i])) for i in range(3))
    return (z, y, x)


def check_points(points: torch.Tensor, name: str = "points") -> None:
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] < 3:
        raise DataError(
            f"{name}: expected a tensor [N, C] with C >= 3 (x, y, z first), got "
            f"{type(points).__name__} {tuple(getattr(points, 'shape', ()))}"
        )
    if not points.is_floating_point():
        raise DataError(f"{name}: expected a floating-point tensor, got {points.dtype}")
    if points.shape[0] > 0 and not bool(torch.isfinite(points[:, :3]).all()):
        raise DataError(f"{name}: x, y, z must be finite; found NaN or inf")


def _voxel_ids(
    points: torch.Tensor, voxel_size_m: Sequence[float], pc_range_m: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core grouping shared by hard and dynamic voxelization (numba on CPU, torch elsewhere).

    Returns:
        point_idx: [M] int64 indices of the in-range points (in an order that depends on the path).
        vox: [M] int64 voxel id (first-appearance order) of each entry of point_idx.
        slot: [M] int64 position of each point within its voxel (0, 1, ... in input order).
        coords: [V, 3] int32 (z, y, x) voxel coordinates in first-appearance order.
        counts: [V] int64 number of points per voxel.
    """
    vs, pr, shape = _prepare(points, voxel_size_m, pc_range_m)
    if points.device.type == "cpu":
        return _voxel_ids_cpu(points, vs, pr, shape)
    return _voxel_ids_torch(points, vs, pr, shape)


def _prepare(points, voxel_size_m, pc_range_m) -> tuple[list, list, tuple[int, int, int]]:
    """Validate the inputs; return voxel size, range and grid shape (Z, Y, X)."""
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] < 3:
        check_points(points)  # raises
    vs, pr = check_size_range(voxel_size_m, pc_range_m)
    Z, Y, X = grid_shape(vs, pr)
    if Z * Y * X >= 2**31:
        raise DataError(f"voxel grid (Z, Y, X) = {(Z, Y, X)} is too large (>= 2^31 voxels)")
    if not points.is_floating_point():
        check_points(points)  # raises
    return vs, pr, (Z, Y, X)


@numba.njit(cache=True, nogil=True)
def _nb_group(xyz, lo, inv_size, X, Y, Z):  # pragma: no cover - compiled
    # One pass in input order: voxel index with the same float arithmetic as the torch path,
    # first-appearance voxel ids from an open-addressing hash table keyed by the linear index.
    n = xyz.shape[0]
    size = 1
    while size < 2 * n + 2:
        size *= 2
    # (key, value) side by side; the hash keeps neighbouring voxels in neighbouring slots, so
    # the spatially coherent order of a LiDAR scan stays cache friendly
    table = np.full((size, 2), -1, dtype=np.int32)
    vox = np.full(n, -1, dtype=np.int64)
    slot = np.zeros(n, dtype=np.int64)
    coords = np.empty((n, 3), dtype=np.int32)
    counts = np.zeros(n, dtype=np.int64)
    nv = 0
    bad = False
    mask = size - 1
    for p in range(n):
        fx = np.floor((xyz[p, 0] - lo[0]) * inv_size[0])
        fy = np.floor((xyz[p, 1] - lo[1]) * inv_size[1])
        fz = np.floor((xyz[p, 2] - lo[2]) * inv_size[2])
        if not (np.isfinite(fx) and np.isfinite(fy) and np.isfinite(fz)):
            bad = True
            continue
        if fx < 0 or fy < 0 or fz < 0 or fx >= X or fy >= Y or fz >= Z:
            continue
        ix, iy, iz = int(fx), int(fy), int(fz)
        lin = (iz * Y + iy) * X + ix
        h = (lin ^ (lin >> 17)) & mask
        while table[h, 0] != -1 and table[h, 0] != lin:
            h = (h + 1) & mask
        if table[h, 0] == -1:
            table[h, 0] = lin
            table[h, 1] = nv
            coords[nv, 0] = iz
            coords[nv, 1] = iy
            coords[nv, 2] = ix
            nv += 1
        v = table[h, 1]
        vox[p] = v
        slot[p] = counts[v]
        counts[v] += 1
    return vox, slot, coords[:nv], counts[:nv], bad


def _group_cpu(points, vs, pr, shape):
    """numpy per-point voxel id (-1: out of range) and slot, voxel coords (z, y, x) and counts."""
    Z, Y, X = shape
    dt = points.dtype
    lo = torch.tensor(pr[:3], dtype=dt)
    inv_size = 1.0 / torch.tensor(vs, dtype=dt)
    xyz = points[:, :3].contiguous()
    if dt not in (torch.float32, torch.float64):
        xyz, lo, inv_size = xyz.double(), lo.double(), inv_size.double()
    vox, slot, coords, counts, bad = _nb_group(xyz.numpy(), lo.numpy(), inv_size.numpy(), X, Y, Z)
    if bad:
        check_points(points)  # raises the NaN / inf error
    return vox, slot, coords, counts


def _voxel_ids_cpu(points, vs, pr, shape):
    vox, slot, coords, counts = _group_cpu(points, vs, pr, shape)
    point_idx = np.flatnonzero(vox >= 0)
    return (torch.from_numpy(point_idx), torch.from_numpy(vox[point_idx]), torch.from_numpy(slot[point_idx]),
            torch.from_numpy(coords), torch.from_numpy(counts))


@numba.njit(cache=True, nogil=True)
def _nb_fill(points, vox, slot, voxels):  # pragma: no cover - compiled
    V, P, C = voxels.shape
    for p in range(points.shape[0]):
        v = vox[p]
        if v >= 0 and v < V and slot[p] < P:
            for c in range(C):
                voxels[v, slot[p], c] = points[p, c]


def _voxel_ids_torch(points, vs, pr, shape):
    Z, Y, X = shape
    dev = points.device
    lo = torch.tensor(pr[:3], dtype=points.dtype, device=dev)
    inv_size = 1.0 / torch.tensor(vs, dtype=points.dtype, device=dev)
    c = torch.floor((points[:, :3] - lo) * inv_size)  # [N, 3] (x, y, z) voxel index, float
    if points.shape[0] > 0 and not bool(torch.isfinite(c.sum())):
        check_points(points)  # exact NaN / inf check only when the cheap one trips
    hi = torch.tensor([X, Y, Z], dtype=points.dtype, device=dev)
    inside = ((c >= 0) & (c < hi)).all(dim=1)
    idx = inside.nonzero().squeeze(1)  # [M] in-range points, input order
    ci = c[idx].to(torch.int32)  # [M, 3] (x, y, z)
    lin = (ci[:, 2] * Y + ci[:, 1]) * X + ci[:, 0]  # [M] int32 linear voxel index
    lin_sorted, perm = torch.sort(lin, stable=True)  # grouped by voxel, input order inside
    m = lin_sorted.numel()
    if m == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, e, torch.zeros(0, 3, dtype=torch.int32, device=dev), e
    new_group = torch.ones(m, dtype=torch.bool, device=dev)
    torch.ne(lin_sorted[1:], lin_sorted[:-1], out=new_group[1:])
    starts = new_group.nonzero().squeeze(1)  # [U] start of each group in sorted order
    group = torch.cumsum(new_group, 0) - 1  # [M] group id (groups sorted by lin)
    # rank groups by first appearance: mark each group's first point in input order, count
    first = perm.index_select(0, starts)  # [U] index (among in-range points) of each group's first point
    is_first = torch.zeros(m, dtype=torch.int32, device=dev)
    is_first.index_fill_(0, first, 1)
    rank = (torch.cumsum(is_first, 0, dtype=torch.long) - 1).index_select(0, first)  # [U] voxel id
    vox = rank.index_select(0, group)  # [M]
    slot = torch.arange(m, device=dev) - starts.index_select(0, group)
    point_idx = idx.index_select(0, perm)
    inv = torch.empty_like(rank).scatter_(0, rank, torch.arange(rank.numel(), device=dev))  # group of voxel
    coords = ci.index_select(0, first.index_select(0, inv)).flip(1)  # [V, 3] (z, y, x)
    counts = torch.diff(starts, append=starts.new_tensor([m])).index_select(0, inv)
    return point_idx, vox, slot, coords, counts


def voxelize_hard(
    points: torch.Tensor,
    voxel_size_m: Sequence[float],
    pc_range_m: Sequence[float],
    max_points_per_voxel: int,
    max_voxels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard voxelization: a fixed-size, zero-padded point list per voxel.

    Voxels are ordered by first appearance in the input points; each keeps its first
    ``max_points_per_voxel`` points (input order) and only the first ``max_voxels`` voxels are
    returned. Points outside ``pc_range_m`` are dropped.

    Args:
        points: [N, C] float points, columns ``(x, y, z, ...)`` in metres.
        voxel_size_m: ``(sx, sy, sz)`` in metres.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` in metres.
        max_points_per_voxel: P, points kept per voxel.
        max_voxels: maximum number of voxels returned.

    Returns:
        voxels: [V, P, C] points per voxel, zero-padded.
        coords: [V, 3] int32 voxel coordinates ``(z, y, x)``.
        num_points: [V] int32 number of valid points in each voxel (1..P).
    """
    for name, v in (("max_points_per_voxel", max_points_per_voxel), ("max_voxels", max_voxels)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DataError(f"{name}: expected a positive int, got {v!r}")
    P = max_points_per_voxel
    C = points.shape[1]
    vs, pr, shape = _prepare(points, voxel_size_m, pc_range_m)
    if points.device.type == "cpu":
        vox, slot, coords, counts = _group_cpu(points, vs, pr, shape)
        V = min(coords.shape[0], max_voxels)
        voxels = points.new_zeros((V, P, C))
        _nb_fill(points.contiguous().numpy(), vox, slot, voxels.numpy())
        num_points = torch.from_numpy(np.minimum(counts[:V], P).astype(np.int32))
        return voxels, torch.from_numpy(coords[:V].copy()), num_points
    point_idx, vox, slot, coords, counts = _voxel_ids_torch(points, vs, pr, shape)
    V = min(coords.shape[0], max_voxels)
    # flat destination row of each point; dropped points go to a spare last row
    target = torch.where((vox < V) & (slot < P), vox * P + slot, V * P)
    voxels = points.new_zeros((V * P + 1, C))
    voxels.index_copy_(0, target, points.index_select(0, point_idx))
    voxels = voxels[:-1].view(V, P, C)
    num_points = counts[:V].clamp(max=P).to(torch.int32)
    return voxels, coords[:V], num_points


def voxelize_dynamic(
    points: torch.Tensor, voxel_size_m: Sequence[float], pc_range_m: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic voxelization: every in-range point mapped to its voxel, no caps.

    Args:
        points: [N, C] float points, columns ``(x, y, z, ...)`` in metres.
        voxel_size_m: ``(sx, sy, sz)`` in metres.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` in metres.

    Returns:
        point_to_voxel: [N] int64 voxel index of each point, -1 for points out of range.
        coords: [V, 3] int32 voxel coordinates ``(z, y, x)``, ordered by first appearance.
    """
    point_idx, vox, _, coords, _ = _voxel_ids(points, voxel_size_m, pc_range_m)
    p2v = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    p2v[point_idx] = vox
    return p2v, coords


class MeanVFE(nn.Module):
    """Mean of the points in each hard voxel (OpenPCDet's MeanVFE); no parameters."""

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        """Average the valid points of each voxel.

        Args:
            voxels: [V, P, C] zero-padded points per voxel (from :func:`voxelize_hard`).
            num_points: [V] number of valid points per voxel.

        Returns:
            [V, C] mean point of each voxel.
        """
        if voxels.dim() != 3 or num_points.shape != voxels.shape[:1]:
            raise DataError(
                f"MeanVFE: expected voxels [V, P, C] and num_points [V], got "
                f"{tuple(voxels.shape)} and {tuple(num_points.shape)}"
            )
        n = num_points.to(voxels.dtype).clamp(min=1.0).unsqueeze(1)
        return voxels.sum(dim=1) / n


def check_point_to_voxel(points: torch.Tensor, point_to_voxel: torch.Tensor, name: str) -> None:
    if point_to_voxel.dim() != 1 or point_to_voxel.shape[0] != points.shape[0]:
        raise DataError(
            f"{name}.point_to_voxel: expected shape [{points.shape[0]}] (one per point), got "
            f"{tuple(point_to_voxel.shape)}"
        )


class DynamicMeanVFE(nn.Module):
    """Mean of the points of each dynamic voxel (scatter mean); no parameters."""

    def forward(self, points: torch.Tensor, point_to_voxel: torch.Tensor, num_voxels: int) -> torch.Tensor:
        """Scatter-mean points into voxels.

        Args:
            points: [N, C] points.
            point_to_voxel: [N] int64 voxel index per point, -1 to ignore a point.
            num_voxels: V.

        Returns:
            [V, C] mean of the points of each voxel (zeros for a voxel without points).
        """
        check_point_to_voxel(points, point_to_voxel, "DynamicMeanVFE")
        valid = point_to_voxel >= 0
        idx = point_to_voxel[valid]
        pts = points[valid]
        sums = points.new_zeros((num_voxels, points.shape[1])).index_add(0, idx, pts)
        cnt = torch.bincount(idx, minlength=num_voxels).to(points.dtype).clamp(min=1.0)
        return sums / cnt.unsqueeze(1)
