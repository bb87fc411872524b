"""Benchmark: SECOND-style sparse backbone, forward + backward, patched spconv vs spconv's own kernels.

* Input: a synthetic KITTI-sized LiDAR frame (see ``voxelize.synthetic_scan``), voxelized on the
  KITTI grid (X, Y, Z) = (1408, 1600, 41) with (0.05, 0.05, 0.1) m voxels, mean-VFE features,
  ~20k active voxels, batch 1.
* ``ms_ours``: ``detection.models.backbone3d.SparseBackbone3D`` (default widths) in train mode,
  forward + backward, with the perception3d.sparse CPU kernels and ``threads`` torch threads (2).
* ``ms_single_thread``: the same network with spconv's own CPU kernels
  (``spconv_native_cpu_kernels``: fix (a) kept, or backward would crash) and 1 torch thread, the
  only configuration in which they are correct.
* ``max_abs_err_vs_dense``: the conv types of the backbone (SubMConv3d 3^3, SparseConv3d 3^3 stride
  2, SparseConv3d (3,1,1) stride (2,1,1)), 16 -> 16 channels, ~4000 active voxels of a 48^3 crop,
  run with ``threads`` threads and compared with dense ``conv3d`` (forward; at the active output
  sites). The full 1408x1600x41 grid is too large for a dense reference.
* ``max_abs_diff_vs_single_thread``: max |BEV_ours - BEV_reference| of the backbone forward.
Ours and the reference alternate within each repeat; medians over ``repeats``.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from detection.models.backbone3d import SparseBackbone3D
from perception3d.ops.voxelize import MeanVFE, voxelize_hard
from perception3d.sparse import SparseVoxels, spconv, spconv_native_cpu_kernels

_spec = importlib.util.spec_from_file_location("_bench_voxelize", Path(__file__).with_name("voxelize.py"))
_vox = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vox)

GRID = (41, 1600, 1408)


def make_input(target_voxels: int = 20_000) -> SparseVoxels:
    pts = _vox.synthetic_scan(n_points=40_000, seed=1)
    voxels, coords, num = voxelize_hard(pts, _vox.VOXEL_SIZE_M, _vox.PC_RANGE_M, 5, target_voxels)
    feats = MeanVFE()(voxels, num)
    coords4 = torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.int32), coords], dim=1)
    return SparseVoxels(feats, coords4, GRID, 1)


def dense_check(threads: int) -> float:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    S = 48
    lin = torch.randperm(S**3, generator=g)[:4000]
    coords = torch.stack([torch.zeros_like(lin), lin // (S * S), (lin // S) % S, lin % S], 1).int()
    sv = SparseVoxels(torch.randn(4000, 16, generator=g), coords, (S, S, S), 1)
    convs = [
        (spconv.SubMConv3d(16, 16, 3, bias=False), dict(padding=1)),
        (spconv.SparseConv3d(16, 16, 3, stride=2, padding=1, bias=False), dict(stride=2, padding=1)),
        (spconv.SparseConv3d(16, 16, (3, 1, 1), stride=(2, 1, 1), bias=False), dict(stride=(2, 1, 1))),
    ]
    err = 0.0
    with torch.no_grad():
        for conv, kw in convs:
            out = SparseVoxels.from_spconv(conv(sv.to_spconv()))
            ref = F.conv3d(sv.dense(), conv.weight.permute(0, 4, 1, 2, 3), **kw)
            c = out.coords.long()
            err = max(err, (out.feats - ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]).abs().max().item())
    return err


def run(repeats: int = 5, quick: bool = False) -> dict:
    threads = 2
    torch.manual_seed(0)
    sv = make_input(1_500 if quick else 20_000)
    net = SparseBackbone3D(sv.num_channels, GRID).train()

    def step(n_threads: int):
        torch.set_num_threads(n_threads)
        feats = sv.feats.clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        bev, _ = net(SparseVoxels(feats, sv.coords, sv.spatial_shape, sv.batch_size))
        bev.square().mean().backward()
        return bev.detach()

    def ref_step():
        with spconv_native_cpu_kernels():
            return step(1)

    bev_ours, bev_ref = step(threads), ref_step()  # warm-up (numba compile, allocations)
    t_ours, t_ref = [], []
    for _ in range(max(1, repeats)):
        s = time.perf_counter()
        bev_ours = step(threads)
        t_ours.append(time.perf_counter() - s)
        s = time.perf_counter()
        bev_ref = ref_step()
        t_ref.append(time.perf_counter() - s)
    err_dense = dense_check(threads)
    return {
        "max_abs_err_vs_dense": err_dense,
        "max_abs_diff_vs_single_thread": (bev_ours - bev_ref).abs().max().item(),
        "ms_ours": round(statistics.median(t_ours) * 1e3, 2),
        "ms_single_thread": round(statistics.median(t_ref) * 1e3, 2),
        "threads": threads,
        "active_voxels": sv.num_voxels,
        "bev_shape": list(bev_ours.shape),
    }
