"""Sparse points for a posed capture that has none: SIFT matches between nearby views, triangulated
with the known cameras.

instant-ngp / nerfstudio ``transforms.json`` captures usually come without their SfM points, and
3DGS then starts from random Gaussians. This rebuilds what the SfM step would have given: per
training view, SIFT keypoints and descriptors (kornia, on the undistorted images the trainer sees);
each view is matched with its ``neighbours`` nearest views (camera centres, optical axes less than
60 degrees apart) by mutual nearest neighbours passing Lowe's ratio test; each match is
triangulated by linear DLT with the two known projection matrices and kept when it lies in front of
both cameras, reprojects within ``max_reproj_px`` in both, and its rays meet at more than
``min_angle_deg`` (narrower rays give unreliable depth). Its colour is the mean of the two pixels.

There are no tracks across more than two views: a 3D point seen in several pairs appears several
times, which only adds Gaussians in well-observed places (densification and pruning sort them
out). Wrong matches that happen to lie on the epipolar line survive the reprojection test; the
ratio test keeps them rare.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from perception3d.errors import DataError
from splatting.data.scene import SplatDataset

__all__ = ["triangulate_pair", "triangulate_views"]


def triangulate_pair(P1: torch.Tensor, P2: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Linear (DLT) triangulation of matched pixels.

    Args:
        P1, P2: ``[3, 4]`` projection matrices ``K [R | t]`` (world -> pixels).
        x1, x2: ``[M, 2]`` pixel coordinates of the same points in the two views.

    Returns:
        ``[M, 3]`` world points (the right singular vector of the 4x4 DLT system, dehomogenised).
    """
    P1, P2, x1, x2 = (t.double() for t in (P1, P2, x1, x2))
    A = torch.stack([x1[:, :1] * P1[2] - P1[0], x1[:, 1:] * P1[2] - P1[1],
                     x2[:, :1] * P2[2] - P2[0], x2[:, 1:] * P2[2] - P2[1]], dim=1)  # [M, 4, 4]
    X = torch.linalg.svd(A).Vh[:, -1]
    return (X[:, :3] / X[:, 3:]).float()


def _project(P: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = X @ P[:, :3].T + P[:, 3]
    return h[:, :2] / h[:, 2:].clamp(min=1e-9), h[:, 2]


def _sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel colours ``[M, 3]`` of ``image [H, W, 3]`` at pixel coordinates ``xy`` (centres at +0.5)."""
    H, W = image.shape[:2]
    ix = xy[:, 0].floor().long().clamp(0, W - 1)
    iy = xy[:, 1].floor().long().clamp(0, H - 1)
    return image[iy, ix]


def _pairs(camtoworlds: np.ndarray, neighbours: int) -> list[tuple[int, int]]:
    centres, axes = camtoworlds[:, :3, 3], camtoworlds[:, :3, 2]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    dist[axes @ axes.T < math.cos(math.radians(60.0))] = np.inf
    np.fill_diagonal(dist, np.inf)
    pairs = set()
    for i in range(len(centres)):
        for j in np.argsort(dist[i])[:neighbours]:
            if np.isfinite(dist[i, j]):
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


@torch.no_grad()
def triangulate_views(dataset: SplatDataset, neighbours: int = 4, num_features: int = 4000, ratio: float = 0.8,
                      max_reproj_px: float = 1.5, min_angle_deg: float = 2.0,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Triangulate SIFT matches between the views of ``dataset`` with its known cameras.

    Returns:
        ``(points float32 [M, 3], rgb uint8 [M, 3])``.

    Raises:
        DataError: fewer than two views, or no match survived the checks.
    """
    import kornia.feature as KF
    from tqdm import tqdm

    n = len(dataset)
    if n < 2:
        raise DataError(f"triangulate_views: {n} view(s) in the {dataset.split} split; need at least 2")
    sift = KF.SIFTFeature(num_features=num_features)
    feats = []
    for i in tqdm(range(n), desc="[init] SIFT", disable=not progress, leave=False):
        s = dataset[i]
        lafs, _, desc = sift(s.image.mean(-1)[None, None])
        # kornia's keypoints are in pixel-index coordinates; ours put pixel centres at +0.5
        feats.append((KF.get_laf_center(lafs)[0] + 0.5, desc[0]))
    camtoworlds = np.stack([f.camtoworld for f in dataset.frames]).astype(np.float64)
    viewmats, Ks = dataset.cameras()
    Ps = (Ks.double() @ viewmats[:, :3].double()).float()  # [n, 3, 4] world -> pixels
    cos_min = math.cos(math.radians(min_angle_deg))
    points, colours = [], []
    for i, j in tqdm(_pairs(camtoworlds, neighbours), desc="[init] triangulate", disable=not progress, leave=False):
        (k1, d1), (k2, d2) = feats[i], feats[j]
        if len(d1) == 0 or len(d2) == 0:
            continue
        _, idx = KF.match_smnn(d1, d2, ratio)
        if len(idx) == 0:
            continue
        x1, x2 = k1[idx[:, 0]], k2[idx[:, 1]]
        X = triangulate_pair(Ps[i], Ps[j], x1, x2)
        r1, z1 = _project(Ps[i], X)
        r2, z2 = _project(Ps[j], X)
        c1 = torch.from_numpy(camtoworlds[i, :3, 3]).float()
        c2 = torch.from_numpy(camtoworlds[j, :3, 3]).float()
        ray1 = torch.nn.functional.normalize(X - c1, dim=1)
        ray2 = torch.nn.functional.normalize(X - c2, dim=1)
        keep = ((z1 > 0) & (z2 > 0) & ((r1 - x1).norm(dim=1) < max_reproj_px) & ((r2 - x2).norm(dim=1) < max_reproj_px)
                & ((ray1 * ray2).sum(1) < cos_min) & torch.isfinite(X).all(1))
        if bool(keep.any()):
            points.append(X[keep])
            colours.append(0.5 * (_sample(dataset[i].image, x1[keep]) + _sample(dataset[j].image, x2[keep])))
    if not points:
        raise DataError(f"triangulate_views: no SIFT match between the {n} {dataset.split} views survived "
                        f"triangulation (ratio {ratio}, reprojection < {max_reproj_px} px, angle > {min_angle_deg} deg)")
    pts = torch.cat(points).numpy()
    rgb = (torch.cat(colours).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return pts, rgb
