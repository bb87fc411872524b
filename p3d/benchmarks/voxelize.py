"""Benchmark: ``perception3d.ops.voxelize.voxelize_hard`` vs ``open3d.ml.torch.ops.voxelize``.

A synthetic KITTI-sized LiDAR frame (~120k points, 64 beams over a ground plane with box-shaped
obstacles, x 0..70 m, y -40..40 m, z -3..1 m, plus intensity), voxel size (0.05, 0.05, 0.1) m.
Both run on the same points in the same process, alternating, with the process's torch thread
count; medians over ``repeats``. ``same_voxels`` checks that both produce the same set of voxel
coordinates (Open3D orders voxels by linear index, ours by first appearance, so sets are compared).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from perception3d.ops.voxelize import voxelize_hard

VOXEL_SIZE_M = (0.05, 0.05, 0.1)
PC_RANGE_M = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


def synthetic_scan(n_points: int = 120_000, seed: int = 0) -> torch.Tensor:
    """[N, 4] (x, y, z, intensity) LiDAR-like points: 64 beams hitting ground or box obstacles."""
    g = torch.Generator().manual_seed(seed)
    beams = 64
    elev = torch.linspace(math.radians(2.0), math.radians(-24.8), beams)
    az = (torch.rand(n_points, generator=g) - 0.5) * math.radians(120.0)
    el = elev[torch.randint(0, beams, (n_points,), generator=g)] + torch.randn(n_points, generator=g) * 1e-3
    h = 1.73  # sensor height
    r = torch.where(el < -1e-3, h / torch.tan(-el).clamp(min=1e-3), torch.full_like(el, 80.0)).clamp(max=80.0)
    # obstacles: 40 boxes; a ray stops at the first box whose distance band it crosses
    nb = 40
    bx = torch.rand(nb, generator=g) * 60 + 5
    by = (torch.rand(nb, generator=g) - 0.5) * 60
    bang = torch.atan2(by, bx)
    bdist = torch.sqrt(bx**2 + by**2)
    bwidth = 2.0 / bdist  # angular half width
    hit = (az[:, None] - bang[None, :]).abs() < bwidth[None, :]
    d = torch.where(hit, bdist[None, :], torch.full((1, nb), 1e9))
    dmin, _ = d.min(dim=1)
    r = torch.minimum(r, dmin + torch.rand(n_points, generator=g) * 0.5)
    x = r * torch.cos(el) * torch.cos(az)
    y = r * torch.cos(el) * torch.sin(az)
    z = (r * torch.sin(el)).clamp(min=-h) + torch.randn(n_points, generator=g) * 0.02
    inten = torch.rand(n_points, generator=g)
    return torch.stack([x, y, z, inten], dim=1).contiguous()


def run(repeats: int = 5, quick: bool = False) -> dict:
    import open3d.ml.torch as ml3d  # optional dependency: only here

    pts = synthetic_scan(5_000 if quick else 120_000)
    xyz = pts[:, :3].contiguous()
    row_splits = torch.tensor([0, pts.shape[0]], dtype=torch.int64)
    vs = torch.tensor(VOXEL_SIZE_M, dtype=torch.float32)
    lo = torch.tensor(PC_RANGE_M[:3], dtype=torch.float32)
    hi = torch.tensor(PC_RANGE_M[3:], dtype=torch.float32)
    max_points, max_voxels = 5, 200_000

    def ours():
        return voxelize_hard(pts, VOXEL_SIZE_M, PC_RANGE_M, max_points, max_voxels)

    def theirs():
        return ml3d.ops.voxelize(xyz, row_splits, vs, lo, hi, max_points, max_voxels)

    ours(), theirs()  # warm-up
    t_ours, t_o3d = [], []
    for _ in range(max(1, repeats)):
        s = time.perf_counter()
        _, coords, _ = ours()
        t_ours.append(time.perf_counter() - s)
        s = time.perf_counter()
        r = theirs()
        t_o3d.append(time.perf_counter() - s)
    a = {tuple(c) for c in coords.flip(1).tolist()}  # ours (z, y, x) -> (x, y, z)
    b = {tuple(c) for c in r.voxel_coords.tolist()}
    return {
        "points": int(pts.shape[0]),
        "ms_ours": round(statistics.median(t_ours) * 1e3, 3),
        "ms_open3d": round(statistics.median(t_o3d) * 1e3, 3),
        "voxels_ours": int(coords.shape[0]),
        "voxels_open3d": int(r.voxel_coords.shape[0]),
        "same_voxels": a == b,
        "threads": torch.get_num_threads(),
    }
