"""perception3d.ops.voxelize against naive per-point Python loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from perception3d.ops.voxelize import (
    DynamicMeanVFE,
    MeanVFE,
    grid_shape,
    voxelize_dynamic,
    voxelize_hard,
)

VS = (0.5, 0.25, 0.5)  # dyadic sizes: boundary points are exact in float32
PR = (-2.0, -1.0, -1.0, 2.0, 1.0, 1.0)  # grid (Z, Y, X) = (4, 8, 8)


def make_cloud(seed: int, n: int = 600, c: int = 4) -> torch.Tensor:
    """Random cloud with duplicates, points exactly on voxel faces/range bounds, and outliers."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor(PR[:3])
    hi = torch.tensor(PR[3:])
    pts = torch.rand(n, c, generator=g)
    pts[:, :3] = lo - 0.3 + pts[:, :3] * (hi - lo + 0.6)  # some outside the range
    # clustered points so voxels get many points
    pts[: n // 4, :3] = pts[: n // 4, :3] * 0.1
    # points exactly on voxel boundaries and on the lower/upper range bounds
    k = n // 10
    size = torch.tensor(VS)
    idx = torch.randint(0, 9, (k, 3), generator=g).float()  # 0..8 inclusive: 8 is the upper bound
    pts[n // 4 : n // 4 + k, :3] = lo + idx * size
    # exact duplicates
    pts[-k:] = pts[n // 2 : n // 2 + k]
    perm = torch.randperm(n, generator=g)
    return pts[perm].contiguous()


def naive_voxel_index(p: np.ndarray) -> tuple[int, int, int] | None:
    """(z, y, x) of one point with float32 arithmetic like the library, None if out of range."""
    Z, Y, X = grid_shape(VS, PR)
    lo = np.array(PR[:3], np.float32)
    inv = np.float32(1.0) / np.array(VS, np.float32)
    x, y, z = (int(v) for v in np.floor((p[:3].astype(np.float32) - lo) * inv))
    if 0 <= x < X and 0 <= y < Y and 0 <= z < Z:
        return (z, y, x)
    return None


def naive_dynamic(points: torch.Tensor):
    order: dict[tuple, int] = {}
    p2v = []
    for p in points.numpy():
        key = naive_voxel_index(p)
        if key is None:
            p2v.append(-1)
            continue
        if key not in order:
            order[key] = len(order)
        p2v.append(order[key])
    return p2v, list(order)


def naive_hard(points: torch.Tensor, P: int, max_voxels: int):
    p2v, keys = naive_dynamic(points)
    keys = keys[:max_voxels]
    V = len(keys)
    voxels = np.zeros((V, P, points.shape[1]), np.float32)
    num = np.zeros(V, np.int64)
    for i, v in enumerate(p2v):
        if 0 <= v < V and num[v] < P:
            voxels[v, num[v]] = points[i].numpy()
            num[v] += 1
    return voxels, keys, num


@pytest.mark.parametrize("seed,P,max_voxels", [(0, 4, 1000), (1, 2, 1000), (2, 3, 40), (3, 64, 5)])
def test_hard_matches_naive(seed: int, P: int, max_voxels: int):
    pts = make_cloud(seed)
    voxels, coords, num = voxelize_hard(pts, VS, PR, P, max_voxels)
    ref_vox, ref_keys, ref_num = naive_hard(pts, P, max_voxels)
    assert coords.dtype == torch.int32 and num.dtype == torch.int32
    assert [tuple(c) for c in coords.tolist()] == ref_keys
    assert num.tolist() == ref_num.tolist()
    assert voxels.shape == ref_vox.shape
    assert np.array_equal(voxels.numpy(), ref_vox)


def test_dynamic_matches_naive():
    pts = make_cloud(4)
    p2v, coords = voxelize_dynamic(pts, VS, PR)
    ref_p2v, ref_keys = naive_dynamic(pts)
    assert p2v.dtype == torch.int64
    assert p2v.tolist() == ref_p2v
    assert [tuple(c) for c in coords.tolist()] == ref_keys
    assert (p2v == -1).sum().item() > 0  # the cloud really has out-of-range points


def test_deterministic():
    pts = make_cloud(5, n=5000)
    a = voxelize_hard(pts, VS, PR, 5, 10_000)
    b = voxelize_hard(pts.clone(), VS, PR, 5, 10_000)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(voxelize_dynamic(pts, VS, PR)[0], voxelize_dynamic(pts, VS, PR)[0])


def test_empty_and_all_outside():
    pts = torch.full((10, 4), 100.0)
    voxels, coords, num = voxelize_hard(pts, VS, PR, 4, 10)
    assert voxels.shape == (0, 4, 4) and coords.shape == (0, 3) and num.shape == (0,)
    p2v, coords = voxelize_dynamic(torch.zeros(0, 3), VS, PR)
    assert p2v.shape == (0,) and coords.shape == (0, 3)


def test_bad_input():
    pts = make_cloud(6, n=20)
    with pytest.raises(DataError, match="points"):
        voxelize_hard(pts[:, :2], VS, PR, 4, 10)
    with pytest.raises(DataError, match="points"):
        voxelize_hard(pts.long(), VS, PR, 4, 10)
    bad = pts.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="finite"):
        voxelize_dynamic(bad, VS, PR)
    with pytest.raises(DataError, match="voxel_size_m"):
        voxelize_hard(pts, (0.1, 0.0, 0.1), PR, 4, 10)
    with pytest.raises(DataError, match="pc_range_m"):
        voxelize_hard(pts, VS, (0, 0, 0, 1, -1, 1), 4, 10)
    with pytest.raises(DataError, match="max_points_per_voxel"):
        voxelize_hard(pts, VS, PR, 0, 10)


def test_mean_vfe_matches_naive():
    pts = make_cloud(7)
    voxels, coords, num = voxelize_hard(pts, VS, PR, 3, 1000)
    feats = MeanVFE()(voxels, num)
    p2v, _ = naive_dynamic(pts)
    ref = np.zeros((coords.shape[0], pts.shape[1]), np.float64)
    cnt = np.zeros(coords.shape[0])
    for i, v in enumerate(p2v):
        if v >= 0 and cnt[v] < 3:
            ref[v] += pts[i].numpy()
            cnt[v] += 1
    ref /= cnt[:, None]
    assert np.abs(feats.numpy() - ref).max() <= 1e-6


def test_dynamic_mean_vfe_matches_naive():
    pts = make_cloud(8)
    p2v, coords = voxelize_dynamic(pts, VS, PR)
    feats = DynamicMeanVFE()(pts, p2v, coords.shape[0])
    ref = np.zeros((coords.shape[0], pts.shape[1]), np.float64)
    cnt = np.zeros(coords.shape[0])
    for i, v in enumerate(p2v.tolist()):
        if v >= 0:
            ref[v] += pts[i].numpy()
            cnt[v] += 1
    ref /= cnt[:, None]
    assert np.abs(feats.numpy() - ref).max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_and_torch_path_agree(dtype):
    """The compiled CPU grouping and the vectorized torch path (used on GPU) give identical results."""
    from perception3d.ops import voxelize as vox

    pts = make_cloud(5, n=3000).to(dtype)
    Z, Y, X = grid_shape(VS, PR)
    a = vox._voxel_ids_cpu(pts, list(VS), list(PR), (Z, Y, X))
    b = vox._voxel_ids_torch(pts, list(VS), list(PR), (Z, Y, X))
    order_a, order_b = torch.argsort(a[0]), torch.argsort(b[0])  # point order differs by design
    for x, y in ((a[0][order_a], b[0][order_b]), (a[1][order_a], b[1][order_b]), (a[2][order_a], b[2][order_b])):
        assert torch.equal(x, y)
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
