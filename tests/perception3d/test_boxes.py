"""Tests for perception3d.geometry.boxes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from perception3d.geometry.boxes import (
    BOX_EDGES,
    box_corners,
    box_to_image_bbox,
    boxes_lidar_to_kitti_camera,
    kitti_camera_to_boxes_lidar,
    limit_period,
    points_in_boxes,
    points_in_boxes_count,
)
from perception3d.geometry.camera import KittiCalibration

KITTI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kitti" / "training"
FRAME = "000008"


def _standard_calib() -> KittiCalibration:
    """Idealised KITTI extrinsics: camera x = -lidar y, y = -lidar z, z = lidar x."""
    Tr = np.array([[0.0, -1.0, 0.0, 0.1], [0.0, 0.0, -1.0, -0.2], [1.0, 0.0, 0.0, -0.3]])
    P2 = np.array([[700.0, 0, 600, 0], [0, 700.0, 180, 0], [0, 0, 1, 0]])
    return KittiCalibration(P2=P2, R0_rect=np.eye(3), Tr_velo_to_cam=Tr)


def _tilted_calib() -> KittiCalibration:
    """The standard extrinsics followed by a 5 degree roll and 3 degree pitch of the camera."""
    base = _standard_calib()
    a, b = math.radians(5), math.radians(3)
    Rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    Tr = base.Tr_velo_to_cam.copy()
    Tr[:, :3] = Rz @ Rx @ Tr[:, :3]
    return KittiCalibration(P2=base.P2, R0_rect=np.eye(3), Tr_velo_to_cam=Tr)


def _random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.empty(n, 7, dtype=torch.float64)
    b[:, 0] = torch.rand(n, generator=g) * 40 + 5
    b[:, 1] = torch.rand(n, generator=g) * 20 - 10
    b[:, 2] = torch.rand(n, generator=g) * 2 - 1
    b[:, 3:6] = torch.rand(n, 3, generator=g) * 4 + 0.3
    b[:, 6] = torch.rand(n, generator=g) * 2 * math.pi - math.pi
    return b


# --- corners ---------------------------------------------------------------------------------
def test_box_corners_known_values():
    box = torch.tensor([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, math.pi / 2]], dtype=torch.float64)
    c = box_corners(box)
    assert c.shape == (1, 8, 3)
    # yaw 90 deg: heading along +y. Corner 0 = front-right-bottom: front = +y, right = +x.
    torch.testing.assert_close(c[0, 0], torch.tensor([2.0, 4.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(c[0, 6], torch.tensor([0.0, 0.0, 3.5], dtype=torch.float64))
    torch.testing.assert_close(c.mean(dim=1), box[:, :3])
    # Edge lengths: bottom/top edges alternate dy (0-1), dx (1-2); vertical edges are dz.
    lengths = torch.stack([(c[0, i] - c[0, j]).norm() for i, j in BOX_EDGES])
    expected = torch.tensor([2, 4, 2, 4, 2, 4, 2, 4, 1, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(lengths, expected)


def test_box_corners_bad_input():
    with pytest.raises(DataError, match=r"\[N, 7\]"):
        box_corners(torch.zeros(3, 6))
    with pytest.raises(DataError, match="torch.Tensor"):
        box_corners(np.zeros((3, 7)))


def test_limit_period():
    x = torch.tensor([-4.0, -math.pi, 0.0, math.pi, 7.0], dtype=torch.float64)
    y = limit_period(x)
    assert ((y >= -math.pi) & (y < math.pi)).all()
    torch.testing.assert_close(torch.sin(y), torch.sin(x))
    assert float(y[3]) == pytest.approx(-math.pi)
    assert np.allclose(limit_period(np.array([3 * math.pi / 2]), offset=0), [3 * math.pi / 2])


# --- camera converters -----------------------------------------------------------------------
def test_lidar_to_camera_standard_extrinsics():
    calib = _standard_calib()
    boxes = _random_boxes(50)
    cam = boxes_lidar_to_kitti_camera(boxes, calib)
    # Standard KITTI relation ry = -yaw - pi/2, dims (h, w, l) = (dz, dy, dx).
    torch.testing.assert_close(torch.sin(cam[:, 6]), torch.sin(-boxes[:, 6] - math.pi / 2))
    torch.testing.assert_close(torch.cos(cam[:, 6]), torch.cos(-boxes[:, 6] - math.pi / 2))
    torch.testing.assert_close(cam[:, 3:6], boxes[:, [5, 4, 3]])
    # Bottom centre = the LiDAR bottom centre mapped with the calibration.
    bottom = boxes[:, :3].clone()
    bottom[:, 2] -= boxes[:, 5] / 2
    torch.testing.assert_close(cam[:, :3], torch.as_tensor(calib.lidar_to_cam(bottom.numpy())))


@pytest.mark.parametrize("make_calib", [_standard_calib, _tilted_calib])
def test_camera_roundtrip(make_calib):
    calib = make_calib()
    boxes = _random_boxes(100, seed=1)
    back = kitti_camera_to_boxes_lidar(boxes_lidar_to_kitti_camera(boxes, calib), calib)
    torch.testing.assert_close(back[:, :6], boxes[:, :6], atol=1e-10, rtol=0)
    assert limit_period(back[:, 6] - boxes[:, 6]).abs().max() < 1e-10
    cam = boxes_lidar_to_kitti_camera(boxes, calib)
    cam2 = boxes_lidar_to_kitti_camera(kitti_camera_to_boxes_lidar(cam, calib), calib)
    torch.testing.assert_close(cam2[:, :6], cam[:, :6], atol=1e-10, rtol=0)


def test_tilted_heading_follows_the_box():
    """With a tilted camera, the camera-frame heading is the projection of the true heading."""
    calib = _tilted_calib()
    boxes = _random_boxes(20, seed=2)
    cam = boxes_lidar_to_kitti_camera(boxes, calib)
    front = boxes[:, :3] + torch.stack([torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6]),
                                        torch.zeros(20, dtype=torch.float64)], 1)
    d = torch.as_tensor(calib.lidar_to_cam(front.numpy()) - calib.lidar_to_cam(boxes[:, :3].numpy()))
    expected = torch.atan2(-d[:, 2], d[:, 0])
    assert limit_period(cam[:, 6] - expected).abs().max() < 1e-12


# --- points in boxes -------------------------------------------------------------------------
def test_points_in_boxes_matches_bruteforce():
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(7, seed=3)
    # Points scattered around the box centres so that many fall inside.
    owner = torch.randint(0, 7, (3000,), generator=g)
    pts = boxes[owner, :3] + (torch.rand(3000, 3, generator=g, dtype=torch.float64) - 0.5) * 1.5 * boxes[owner, 3:6]
    mask = points_in_boxes(pts, boxes, chunk_size=1000)
    assert mask.shape == (3000, 7)
    ref = torch.zeros_like(mask)
    for m in range(7):
        x, y, z, dx, dy, dz, yaw = boxes[m].tolist()
        for n in range(3000):
            px, py, pz = (pts[n] - boxes[m, :3]).tolist()
            lx = math.cos(yaw) * px + math.sin(yaw) * py
            ly = -math.sin(yaw) * px + math.cos(yaw) * py
            ref[n, m] = abs(lx) <= dx / 2 and abs(ly) <= dy / 2 and abs(pz) <= dz / 2
    assert torch.equal(mask, ref)
    assert int(ref.sum()) > 300  # the test exercises positive cases
    assert torch.equal(points_in_boxes_count(pts, boxes), ref.sum(0))


def test_points_in_boxes_known_case():
    box = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, math.pi / 4]])
    pts = torch.tensor([[1.3, 1.3, 0.0], [1.3, -1.3, 0.0], [0.0, 0.0, 1.5], [-1.3, -1.3, 0.9]])
    assert points_in_boxes(pts, box)[:, 0].tolist() == [True, False, False, True]


def test_points_in_boxes_bad_input():
    with pytest.raises(DataError, match="points"):
        points_in_boxes(torch.zeros(4, 2), torch.zeros(1, 7))


# --- real KITTI frame ------------------------------------------------------------------------
def _kitti_cars():
    if not (KITTI / "velodyne" / f"{FRAME}.bin").is_file():
        pytest.skip(f"KITTI sample {KITTI} not available")
    calib = KittiCalibration.from_file(KITTI / "calib" / f"{FRAME}.txt")
    rows = [line.split() for line in (KITTI / "label_2" / f"{FRAME}.txt").read_text().splitlines()
            if line.startswith("Car ")]
    truncated = [float(r[1]) for r in rows]
    bbox = torch.tensor([[float(v) for v in r[4:8]] for r in rows], dtype=torch.float64)
    # label: h w l (8-10), x y z (11-13), ry (14) -> (x, y, z, h, w, l, ry)
    cam = torch.tensor([[float(v) for v in r[11:14] + r[8:11]] + [float(r[14])] for r in rows],
                       dtype=torch.float64)
    return calib, cam, truncated, bbox


def test_kitti_points_in_car_boxes():
    calib, cam, _, _ = _kitti_cars()
    pts = np.fromfile(KITTI / "velodyne" / f"{FRAME}.bin", dtype=np.float32).reshape(-1, 4)
    boxes = kitti_camera_to_boxes_lidar(cam, calib)
    counts = points_in_boxes_count(torch.from_numpy(pts), boxes.float())
    expected = torch.tensor([1424, 1940, 878, 668, 53, 164], dtype=torch.float64)
    rel = (counts.double() - expected).abs() / expected
    assert rel.max() < 0.10, counts.tolist()
    back = boxes_lidar_to_kitti_camera(boxes, calib)
    torch.testing.assert_close(back[:, :6], cam[:, :6], atol=1e-9, rtol=0)
    assert limit_period(back[:, 6] - cam[:, 6]).abs().max() < 1e-9


def _iou_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_kitti_projected_boxes_match_labels():
    calib, cam, truncated, bbox = _kitti_cars()
    boxes = kitti_camera_to_boxes_lidar(cam, calib)
    proj = box_to_image_bbox(boxes, calib, (1242, 375))
    assert proj.shape == (6, 4) and torch.isfinite(proj).all()
    iou = _iou_2d(proj, bbox)
    untrunc = torch.tensor([t == 0 for t in truncated])
    assert untrunc.sum() == 4
    assert (iou[untrunc] > 0.7).all(), iou.tolist()


def test_box_to_image_bbox_behind_camera():
    calib = _standard_calib()
    # A box straddling the camera (x from -2 to 2 m), one fully behind, one in front.
    boxes = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0],
                          [-10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0],
                          [10.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]], dtype=torch.float64)
    out = box_to_image_bbox(boxes, calib, (1200, 360))
    assert torch.isfinite(out).all()
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # The straddling box fills the image at the near plane.
    assert out[0].tolist() == [0.0, 0.0, 1199.0, 359.0]
    # A box wholly in front: plain projection of its 8 corners.
    corners = box_corners(boxes[2:])[0].numpy()
    uv, _ = calib.lidar_to_image(corners)
    ref = [uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()]
    assert np.allclose(out[2].numpy(), np.clip(ref, 0, [1199, 359, 1199, 359]))
