"""KITTI object reader: the real frame 000008 from ../shared/data, conversions, corrupt inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from perception3d.errors import DataError
from perception3d.geometry.camera import KittiCalibration
from perception3d.io.kitti import (
    KittiDataset,
    KittiLabels,
    camera_boxes_to_lidar,
    lidar_boxes_to_camera,
    read_label,
    write_label,
)

KITTI_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kitti"


def points_in_box_counts(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Reference point-in-rotated-box count, `[N, 3] x [M, 7] -> [M]` (independent of the library)."""
    d = points[None, :, :3] - boxes[:, None, :3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    lx = d[..., 0] * c + d[..., 1] * s
    ly = -d[..., 0] * s + d[..., 1] * c
    inside = ((np.abs(lx) <= boxes[:, 3:4] / 2) & (np.abs(ly) <= boxes[:, 4:5] / 2)
              & (np.abs(d[..., 2]) <= boxes[:, 5:6] / 2))
    return inside.sum(1)


@pytest.fixture
def real():
    if not (KITTI_ROOT / "training" / "velodyne" / "000008.bin").is_file():
        pytest.skip(f"real KITTI sample not found at {KITTI_ROOT}")
    return KittiDataset(KITTI_ROOT, "training")


def test_real_frame_000008(real):
    assert len(real) == 1 and real.ids == ["000008"]
    f = real[0]
    assert f.points_lidar.shape == (17238, 4) and f.points_lidar.dtype == np.float32
    assert f.image.shape == (375, 1242, 3) and f.image.dtype == np.uint8
    names = list(f.labels.names)
    assert names.count("Car") == 6 and names.count("DontCare") == 4
    assert f.labels.score is None
    np.testing.assert_allclose(f.labels.dims_hwl[1], [1.57, 1.50, 3.68])
    boxes, ids = f.gt_boxes()
    assert boxes.shape == (6, 7) and (ids == 0).all()
    assert np.isnan(f.boxes_lidar[f.labels.names == "DontCare"]).all()
    counts = points_in_box_counts(f.points_lidar, boxes.astype(np.float64))
    expected = np.array([1424, 1940, 878, 668, 53, 164])
    assert np.all(np.abs(counts - expected) <= 0.1 * expected), counts
    # heading: the standard KITTI extrinsics make yaw = -ry - pi/2 (up to the small calibration tilt)
    ry = f.labels.rotation_y[:6]
    err = np.angle(np.exp(1j * (boxes[:, 6] - (-ry - np.pi / 2))))
    assert np.abs(err).max() < 0.02
    # size: dx = l, dy = w, dz = h
    np.testing.assert_allclose(boxes[:, 3:6], f.labels.dims_hwl[:6][:, ::-1])


def test_real_frame_no_image_keeps_shape(real):
    f = KittiDataset(KITTI_ROOT, "training", ids=[8], load_image=False)[0]
    assert f.image is None and f.image_shape == (375, 1242)


def test_box_conversion_round_trip_real_calib(real):
    calib = real.calib(0)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-20, 20, (50, 3)), rng.uniform(0.5, 5, (50, 3)),
                            rng.uniform(-np.pi, np.pi, (50, 1))], 1)
    back = camera_boxes_to_lidar(lidar_boxes_to_camera(boxes, calib), calib)
    # exact inverse even for the real (slightly tilted, not exactly orthonormal) calibration
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    assert np.abs(np.angle(np.exp(1j * (back[:, 6] - boxes[:, 6])))).max() < 1e-9


def test_box_conversion_matches_geometry_boxes(real):
    import torch

    from perception3d.geometry.boxes import kitti_camera_to_boxes_lidar

    f = real[0]
    cam = f.labels.boxes_cam[:6].astype(np.float64)
    ours = camera_boxes_to_lidar(cam, f.calib)
    theirs = kitti_camera_to_boxes_lidar(torch.from_numpy(cam), f.calib).numpy()
    np.testing.assert_allclose(ours[:, :6], theirs[:, :6], atol=1e-6)
    assert np.abs(np.angle(np.exp(1j * (ours[:, 6] - theirs[:, 6])))).max() < 1e-6


# --- labels -------------------------------------------------------------------------------------
def test_label_write_read_round_trip(tmp_path):
    lab = KittiLabels(np.array(["Car", "Pedestrian"]), np.array([0.0, 0.5], np.float32), np.array([0, 2], np.int32),
                      np.array([0.1, -1.2], np.float32), np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32),
                      np.array([[1.5, 1.6, 3.9], [1.7, 0.6, 0.8]], np.float32),
                      np.array([[1, 1.7, 10], [-3, 1.6, 20]], np.float32), np.array([0.3, -2.0], np.float32),
                      np.array([0.9, 0.25], np.float32))
    p = tmp_path / "l.txt"
    write_label(p, lab)
    back = read_label(p)
    assert list(back.names) == ["Car", "Pedestrian"]
    np.testing.assert_allclose(back.loc_cam, lab.loc_cam, atol=5e-3)
    np.testing.assert_allclose(back.score, lab.score, atol=1e-4)
    np.testing.assert_array_equal(back.occluded, [0, 2])


def test_malformed_label_line(tmp_path):
    p = tmp_path / "000001.txt"
    p.write_text("Car 0.00 0 1.0 1 2 3 4 1.5 1.6 3.9 1 1.7 10 0.3\nCar 0.00 0 1.0 1 2 3 4 1.5 1.6 3.9 1 1.7\n")
    with pytest.raises(DataError) as exc:
        read_label(p)
    msg = str(exc.value)
    assert "000001.txt:2" in msg and "15 fields: type truncated occluded alpha x1 y1 x2 y2 h w l x y z" in msg
    p.write_text("Car 0.00 0 abc 1 2 3 4 1.5 1.6 3.9 1 1.7 10 0.3\n")
    with pytest.raises(DataError, match="000001.txt:1: non-numeric"):
        read_label(p)


# --- corrupt datasets ------------------------------------------------------------------------------
def _tiny_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "kitti"
    d = root / "training"
    for sub in ("velodyne", "calib", "label_2"):
        (d / sub).mkdir(parents=True)
    pts = np.random.default_rng(0).uniform(-5, 5, (100, 4)).astype(np.float32)
    pts.tofile(d / "velodyne" / "000000.bin")
    tr = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0]], float)
    P2 = np.array([[700, 0, 600, 0], [0, 700, 180, 0], [0, 0, 1, 0]], float)
    KittiCalibration(P2, np.eye(3), tr).to_file(d / "calib" / "000000.txt")
    (d / "label_2" / "000000.txt").write_text("Car 0.00 0 1.0 1 2 3 4 1.5 1.6 3.9 1 1.7 10 0.3\n")
    return root


def test_tiny_dataset_reads(tmp_path):
    root = _tiny_dataset(tmp_path)
    f = KittiDataset(root, load_image=False)[0]
    assert f.points_lidar.shape == (100, 4) and f.radar is None
    # exact axis swap: centre = (z, -x, -(y - h/2)), yaw = -ry - pi/2
    np.testing.assert_allclose(f.boxes_lidar[0], [10, -1, -1.7 + 0.75, 3.9, 1.6, 1.5, -0.3 - np.pi / 2], atol=1e-6)


@pytest.mark.parametrize("corruption,words", [
    ("bin_size", ["000000.bin", "multiple of 16"]),
    ("bin_nan", ["000000.bin", "NaN"]),
    ("bin_empty", ["000000.bin", "empty"]),
    ("no_calib", ["calib", "000000.txt", "not found"]),
    ("no_velodyne", ["velodyne", "000000.bin", "not found"]),
    ("bad_label", ["label_2", "000000.txt:1", "15 fields"]),
    ("no_image", ["image_2", "000000.png", "not found"]),
])
def test_corrupt_inputs(tmp_path, corruption, words):
    root = _tiny_dataset(tmp_path)
    d = root / "training"
    vel = d / "velodyne" / "000000.bin"
    load_image = False
    if corruption == "bin_size":
        vel.write_bytes(vel.read_bytes()[:-4])
    elif corruption == "bin_nan":
        a = np.fromfile(vel, np.float32)
        a[17] = np.nan
        a.tofile(vel)
    elif corruption == "bin_empty":
        vel.write_bytes(b"")
    elif corruption == "no_calib":
        (d / "calib" / "000000.txt").unlink()
    elif corruption == "no_velodyne":
        vel.unlink()
    elif corruption == "bad_label":
        (d / "label_2" / "000000.txt").write_text("Car 0 0 1.0 1 2 3 4\n")
    elif corruption == "no_image":
        load_image = True
    ds = KittiDataset(root, ids=["000000"], load_image=load_image)
    with pytest.raises(DataError) as exc:
        ds[0]
    for w in words:
        assert w in str(exc.value), str(exc.value)


def test_image_set_ids(tmp_path):
    root = _tiny_dataset(tmp_path)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val.txt").write_text("000000\n")
    assert KittiDataset(root, image_set="val").ids == ["000000"]
    with pytest.raises(DataError, match="train.txt"):
        KittiDataset(root, image_set="train")
    shutil.rmtree(root / "training")
    with pytest.raises(DataError, match="training"):
        KittiDataset(root)


def test_real_frame_passes_the_checks(real):
    """The reader's up-front checks (calibration matrices, label values, image header) accept real KITTI."""
    ds = KittiDataset(KITTI_ROOT, "training", check=True)
    ds.check(images="required")
    calib = ds.calib(0)
    assert np.abs(calib.R0_rect.T @ calib.R0_rect - np.eye(3)).max() < 1e-4


def test_check_lists_missing_files_at_construction(tmp_path):
    root = _tiny_dataset(tmp_path)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("000000\n000001\n000002\n")
    with pytest.raises(DataError) as exc:
        KittiDataset(root, image_set="train", load_image=False, check=True)
    msg = str(exc.value)
    assert "6 file(s) missing for the frames listed in" in msg and "train.txt" in msg
    assert "velodyne/ lacks 000001.bin, 000002.bin; calib/ lacks 000001.txt, 000002.txt" in msg
    ds = KittiDataset(root, image_set="train", load_image=False)  # lazily, as before: the first frame reads
    assert ds[0].points_lidar.shape == (100, 4)
