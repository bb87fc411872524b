"""detection.models.backbone3d: shapes, thread-count invariance, agreement with spconv's kernels."""
from __future__ import annotations

import pytest
import torch

from detection.models.backbone3d import SparseBackbone3D
from perception3d.errors import ConfigError, DataError
from perception3d.sparse import SparseVoxels, spconv_native_cpu_kernels

GRID = (41, 160, 144)  # (Z, Y, X): a KITTI-like grid, cropped


def surface_voxels(seed: int, batch_size: int = 2, n: int = 1500, c: int = 4) -> SparseVoxels:
    """Active voxels on a wavy ground surface plus a few box-like clusters (LiDAR-like)."""
    g = torch.Generator().manual_seed(seed)
    Z, Y, X = GRID
    coords = []
    for b in range(batch_size):
        x = torch.randint(0, X, (n,), generator=g)
        y = torch.randint(0, Y, (n,), generator=g)
        ground = (8 + 3 * torch.sin(x / 17.0) + 2 * torch.cos(y / 23.0)).long()
        z = (ground + torch.randint(0, 3, (n,), generator=g) * (torch.rand(n, generator=g) < 0.2)).clamp(0, Z - 1)
        coords.append(torch.stack([torch.full_like(x, b), z, y, x], 1))
    coords = torch.unique(torch.cat(coords), dim=0).int()
    feats = torch.randn(coords.shape[0], c, generator=g)
    return SparseVoxels(feats, coords, GRID, batch_size)


@pytest.mark.parametrize("bev_stride,expected", [(8, (128 * 2, 20, 18)), (4, (128 * 2, 40, 36))])
def test_output_shapes(bev_stride, expected):
    torch.manual_seed(0)
    net = SparseBackbone3D(4, GRID, bev_stride=bev_stride).eval()
    assert net.bev_shape == expected
    with torch.no_grad():
        bev, stride = net(surface_voxels(0))
    assert stride == bev_stride
    assert bev.shape == (2,) + expected
    assert bev.abs().sum().item() > 0


def test_kitti_grid_bev_shape():
    net = SparseBackbone3D(4, (41, 1600, 1408))
    assert net.out_spatial_shape == (2, 200, 176)
    assert net.bev_shape == (256, 200, 176)


def _run(net, sv, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feats = sv.feats.clone().requires_grad_(True)
        net.zero_grad()
        bev, _ = net(SparseVoxels(feats, sv.coords, sv.spatial_shape, sv.batch_size))
        g = torch.randn(bev.shape, generator=torch.Generator().manual_seed(1))
        (bev * g).sum().backward()
        return bev.detach(), feats.grad, net.conv2[0][0].weight.grad.clone()
    finally:
        torch.set_num_threads(old)


def _double(sv: SparseVoxels) -> SparseVoxels:
    return SparseVoxels(sv.feats.double(), sv.coords, sv.spatial_shape, sv.batch_size)


def test_one_vs_two_threads_forward_float32():
    torch.manual_seed(0)
    net = SparseBackbone3D(4, GRID, channels=(8, 16, 16, 16), out_channels=16)
    sv = surface_voxels(1)
    a = _run(net, sv, 1)
    b = _run(net, sv, 2)
    assert (a[0] - b[0]).abs().max().item() <= 1e-4


def test_one_vs_two_threads_train_forward_backward():
    """float64: in float32, rounding differences between thread counts flip a few ReLU / BN
    decisions deep in the net and change single gradient entries by O(0.1); a scatter race
    (the bug fixed in perception3d.sparse) gives O(1) errors in float64 too."""
    torch.manual_seed(0)
    net = SparseBackbone3D(4, GRID, channels=(8, 16, 16, 16), out_channels=16).double()
    sv = _double(surface_voxels(1, n=500))
    a = _run(net, sv, 1)
    b = _run(net, sv, 2)
    assert (a[0] - b[0]).abs().max().item() <= 1e-8
    assert (a[1] - b[1]).abs().max().item() <= 1e-8
    assert (a[2] - b[2]).abs().max().item() <= 1e-8


def test_matches_spconv_native_single_thread():
    """Our patched kernels with 2 threads equal spconv's own kernels with 1 thread (their correct case)."""
    torch.manual_seed(0)
    net = SparseBackbone3D(4, GRID, channels=(8, 16, 16, 16), out_channels=16).double()
    sv = _double(surface_voxels(2, n=500))
    ours = _run(net, sv, 2)
    with spconv_native_cpu_kernels():
        ref = _run(net, sv, 1)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-8
    assert (ours[1] - ref[1]).abs().max().item() <= 1e-8
    assert (ours[2] - ref[2]).abs().max().item() <= 1e-8


def test_bad_input():
    net = SparseBackbone3D(4, GRID)
    sv = surface_voxels(3, n=50)
    with pytest.raises(DataError, match="channels"):
        net(SparseVoxels(sv.feats[:, :3], sv.coords, GRID, 2))
    with pytest.raises(DataError, match="spatial_shape"):
        net(SparseVoxels(sv.feats, sv.coords, (41, 160, 160), 2))
    with pytest.raises(ConfigError, match="bev_stride"):
        SparseBackbone3D(4, GRID, bev_stride=2)
