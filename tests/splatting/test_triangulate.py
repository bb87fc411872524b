"""Triangulated initial points: DLT against known points, and SIFT matches on the synthetic scene
landing on its surfaces (ray-cast ground truth)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from splatting.data import SplatDataset, load_scene, write_synthetic_scene
from splatting.data.synthetic import cast_rays, make_synthetic_scene
from splatting.data.triangulate import triangulate_pair, triangulate_views


def _projection(c2w: np.ndarray, K: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(K @ np.linalg.inv(c2w)[:3])


def test_dlt_recovers_known_points():
    g = torch.Generator().manual_seed(0)
    K = np.array([[300.0, 0, 160], [0, 310.0, 120], [0, 0, 1]])
    c2w_a, c2w_b = np.eye(4), np.eye(4)
    angle = np.radians(20)
    c2w_b[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    c2w_b[:3, 3] = [-1.5, 0.2, 0.4]
    X = torch.rand(200, 3, generator=g, dtype=torch.float64) * torch.tensor([4.0, 3.0, 4.0]) + torch.tensor([-2.0, -1.5, 4.0])
    Pa, Pb = _projection(c2w_a, K), _projection(c2w_b, K)

    def project(P):
        h = X @ P[:, :3].T + P[:, 3]
        return h[:, :2] / h[:, 2:]

    got = triangulate_pair(Pa, Pb, project(Pa), project(Pb))
    assert got.dtype == torch.float32
    assert float((got.double() - X).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = write_synthetic_scene(tmp_path_factory.mktemp("tri") / "scene", seed=2, num_views=16, width=240,
                                 height=180, num_points=100)
    return SplatDataset(load_scene(root), "all", test_every=0)


def test_synthetic_matches_land_on_the_surfaces(synthetic):
    pts, rgb = triangulate_views(synthetic, num_features=1000, progress=False)
    assert pts.dtype == np.float32 and rgb.dtype == np.uint8 and pts.shape == rgb.shape and len(pts) > 200
    # ground truth: cast a ray from the nearest camera that sees the point towards it; the surface it
    # hits first must be the point itself (distance along the ray equal to the camera-point distance)
    c2ws = np.stack([f.camtoworld for f in synthetic.frames])
    centres = c2ws[:, :3, 3]
    dist = np.linalg.norm(pts[:, None] - centres[None], axis=-1)
    cam = dist.argmin(1)
    dirs = (pts - centres[cam]) / dist[np.arange(len(pts)), cam, None]
    t, hit, _ = cast_rays(make_synthetic_scene(seed=2), centres[cam], dirs)
    err = np.abs(np.where(hit >= 0, t, np.inf) - dist[np.arange(len(pts)), cam])
    scene_size = float(np.linalg.norm(centres - centres.mean(0), axis=1).max())
    # measured: median 0.4%, 90th percentile 1.5% of the scene size (about a pixel of disparity)
    assert np.median(err) < 0.01 * scene_size, np.median(err)
    assert np.mean(err < 0.02 * scene_size) > 0.85
    # the colours are the surfaces' colours (the images are what SIFT saw)
    _, _, true_rgb = cast_rays(make_synthetic_scene(seed=2), centres[cam], dirs)
    close = err < 0.01 * scene_size
    assert np.median(np.abs(rgb[close] / 255.0 - true_rgb[close]).max(1)) < 0.1


def test_one_view_is_an_error(synthetic):
    one = SplatDataset(synthetic.scene, "test", test_every=100)
    with pytest.raises(DataError, match="need at least 2"):
        triangulate_views(one, progress=False)
