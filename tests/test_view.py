"""`p3d view`: headless screenshots through the real command, checked where the boxes project.

Every test runs the command as a subprocess (Open3D's offscreen renderer on Mesa's software
Vulkan, as a user without a display gets it) and reads back the PNG and the camera JSON saved
beside it; box edges are projected with that camera by the test itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open3d")

from p3d.viewer import _EDGES, Camera  # noqa: E402
from perception3d.geometry.boxes import box_corners  # noqa: E402
from perception3d.io.kitti import KittiDataset, camera_boxes_to_lidar, lidar_boxes_to_camera  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KITTI = REPO.parent / "shared" / "data" / "kitti"
needs_kitti = pytest.mark.skipif(not (KITTI / "training" / "velodyne" / "000008.bin").is_file(),
                                 reason="../shared/data/kitti (frame 000008) is not beside the repository")


def view(*args: str, display: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run([sys.executable, "-m", "p3d", "view", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def screenshot(tmp_path: Path, *args: str, name: str = "shot.png") -> tuple[np.ndarray, Camera]:
    out = tmp_path / name
    r = view(*args, "--screenshot", str(out), "--size", "960x540")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["screenshot"] == str(out)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    camera = Camera.read(out.with_suffix(".camera.json"))
    assert image.shape == (camera.height, camera.width, 3) == (540, 960, 3)
    return image, camera


def edge_samples(boxes_lidar: np.ndarray, camera: Camera, per_edge: int = 12) -> np.ndarray:
    """Pixels along the projected box edges (in front of the camera, inside the image)."""
    corners = box_corners(torch.as_tensor(boxes_lidar, dtype=torch.float64)).numpy()
    t = np.linspace(0.1, 0.9, per_edge)[:, None]
    pts = np.concatenate([corners[:, a][:, None] * (1 - t) + corners[:, b][:, None] * t
                          for a, b in _EDGES[:12]], axis=1).reshape(-1, 3)
    uv, z = camera.project(pts)
    keep = (z > 0.5) & (uv[:, 0] >= 3) & (uv[:, 0] < camera.width - 3) & (uv[:, 1] >= 3) & (uv[:, 1] < camera.height - 3)
    return uv[keep]


def fraction_near(mask: np.ndarray, uv: np.ndarray, radius: int = 2) -> float:
    """The fraction of pixels `uv` with a `mask` pixel within `radius`."""
    hits = [mask[max(int(v) - radius, 0):int(v) + radius + 1, max(int(u) - radius, 0):int(u) + radius + 1].any()
            for u, v in uv]
    return float(np.mean(hits))


def reddish(image: np.ndarray, min_red: int, max_green_blue: int) -> np.ndarray:
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return (r >= min_red) & (g <= max_green_blue) & (b <= max_green_blue) & (r - g >= 40) & (r - b >= 40)


@needs_kitti
def test_kitti_frame_with_its_boxes_headless(tmp_path):
    image, camera = screenshot(tmp_path, str(KITTI), "--frame", "000008")
    frame = KittiDataset(KITTI, ids=["000008"], load_image=False)[0]
    cars = frame.boxes_lidar[frame.labels.names == "Car"]
    assert len(cars) == 6
    uv = edge_samples(cars, camera)
    assert len(uv) > 200  # the default view shows the boxes
    gt = reddish(image, 170, 215)  # ground truth: Car red, lightened
    assert fraction_near(gt, uv) > 0.85
    # and box colour is where the boxes are, not elsewhere: far from every edge it is rare
    near = np.zeros(image.shape[:2], bool)
    for u, v in uv.astype(int):
        near[max(v - 12, 0):v + 13, max(u - 12, 0):u + 13] = True
    near[:70, :260] = True  # the legend
    assert gt[~near].mean() < 0.002
    assert gt.sum() > 1500


@needs_kitti
def test_predictions_in_class_colour_over_the_frame(tmp_path):
    """A predictions folder for frame 000008: one Car 2 m beside a real one, above --min-score; one below."""
    frame = KittiDataset(KITTI, ids=["000008"], load_image=False)[0]
    car = frame.boxes_lidar[frame.labels.names == "Car"][0].astype(np.float64)
    moved = car.copy()
    moved[1] += 4.0
    cam = lidar_boxes_to_camera(np.stack([moved, car]), frame.calib)
    pred = tmp_path / "predictions"
    pred.mkdir()
    lines = [f"Car -1 -1 0 0 0 50 50 {c[3]:.3f} {c[4]:.3f} {c[5]:.3f} {c[0]:.3f} {c[1]:.3f} {c[2]:.3f} {c[6]:.4f} {s}"
             for c, s in zip(cam, (0.9, 0.1))]
    (pred / "000008.txt").write_text("\n".join(lines) + "\n")
    image, camera = screenshot(tmp_path, str(KITTI), "--frame", "000008", "--pred", str(pred))
    shown = camera_boxes_to_lidar(cam[:1], frame.calib)
    red = reddish(image, 200, 110)  # predictions: full Car red
    assert fraction_near(red, edge_samples(shown, camera)) > 0.8
    # the one below --min-score (0.3) is not drawn: its edges (away from the real car) stay unpainted
    assert fraction_near(red, edge_samples(car[None], camera), radius=0) < 0.5


def test_point_cloud_and_gaussians(tmp_path):
    """A .pcd point cloud, and a 3DGS .ply as centres and as a splat render (our rasterizer)."""
    from perception3d.io.pointcloud import write_pcd
    from splatting.io import save_gaussian_ply

    rng = np.random.default_rng(0)
    pts = rng.uniform(-5, 5, (2000, 4)).astype(np.float32)
    write_pcd(tmp_path / "cloud.pcd", {"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "intensity": pts[:, 3]})
    image, _ = screenshot(tmp_path, str(tmp_path / "cloud.pcd"), "--color", "intensity", name="cloud.png")
    assert (image.sum(-1) > 150).sum() > 2000  # the points are drawn
    n = 400
    means = torch.as_tensor(rng.normal(0, 1, (n, 3)), dtype=torch.float32)
    sh0 = torch.zeros(n, 1, 3)
    sh0[:, 0, 0] = 1.5  # red: SH0 colour 0.5 + 0.282 * 1.5
    save_gaussian_ply(tmp_path / "g.ply", means, torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                      torch.full((n, 3), -2.0), torch.full((n,), 3.0), sh0, torch.zeros(n, 0, 3))
    centres, _ = screenshot(tmp_path, str(tmp_path / "g.ply"), name="centres.png")
    splat, camera = screenshot(tmp_path, str(tmp_path / "g.ply"), "--splat", "--camera",
                               str(tmp_path / "centres.camera.json"), name="splat.png")
    assert reddish(centres, 150, 100).sum() > 300
    # the splat render is our rasterizer's image of the same Gaussians from the saved camera
    from splatting.gaussians import Gaussians

    g = Gaussians.load_ply(tmp_path / "g.ply")
    with torch.no_grad():
        ref = g.render(torch.as_tensor(camera.world_to_camera, dtype=torch.float32)[None],
                       torch.as_tensor(camera.K, dtype=torch.float32)[None], camera.width, camera.height)[0][0]
    assert np.abs(splat - (ref.numpy() * 255 + 0.5).clip(0, 255).astype(int)).max() <= 1
    assert reddish(splat, 150, 100).sum() > 2000


@pytest.mark.parametrize("args, message", [
    (["no/such/folder", "--screenshot", "x.png"], "no/such/folder: no such file or folder"),
    (["README.md", "--screenshot", "x.png"], "README.md: unknown point-cloud extension"),
    (["tests", "--screenshot", "x.png", "--size", "big"], "--size 'big': expected WIDTHxHEIGHT"),
    (["tests", "--screenshot", "x.jpg"], "--screenshot x.jpg: expected a .png"),
    (["tests"], "no display to open a window on"),
    (["tests", "--screenshot", "x.png"], "tests: not a KITTI-layout root"),
    (["tests", "--screenshot", "x.png", "--camera", "README.md"], "README.md: expected a camera JSON"),
])
def test_bad_input_one_clear_error(args, message, tmp_path):
    r = view(*args)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (REPO / "x.png").exists()
