"""Synthetic KITTI-layout generator: ray caster, scenes, sensors, written dataset, reproducibility."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from perception3d.io.kitti import KittiDataset
from perception3d.synthetic.dataset import generate_frame, write_frame, write_kitti_dataset
from perception3d.synthetic.lidar import simulate_lidar
from perception3d.synthetic.raycast import GROUND, NO_HIT, raycast, raycast_reference
from perception3d.synthetic.scene import CLASS_SIZE_STATS, SceneConfig, generate_scene


def _wrap(a):
    return np.angle(np.exp(1j * a))


def _count_in_boxes(points: np.ndarray, boxes: np.ndarray, grow: float = 0.0) -> np.ndarray:
    d = points[None, :, :3].astype(np.float64) - boxes[:, None, :3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    lx, ly = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
    half = boxes[:, None, 3:6] / 2 + grow
    return ((np.abs(lx) <= half[..., 0]) & (np.abs(ly) <= half[..., 1]) & (np.abs(d[..., 2]) <= half[..., 2])).sum(1)


# --- ray caster ----------------------------------------------------------------------------------
def test_raycast_known_hits():
    centre = np.array([[10.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    half = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]])
    yaw = np.array([np.pi / 4, 0.0])
    e = np.deg2rad(-10.0)
    dirs = np.array([[1.0, 0, 0], [0, 1.0, 0], [np.cos(e), 0.0, np.sin(e)], [0, 0, 1.0],
                     [np.cos(e) * np.cos(-2.0), np.cos(e) * np.sin(-2.0), np.sin(e)]])
    plane = np.array([0, 0, 1.0, -1.73])
    for fn in (raycast, raycast_reference):
        h = fn(np.zeros((1, 3)), dirs, centre, half, yaw, plane, 80.0)
        # diamond-shaped (45 deg) box: its near corner is at x = 10 - sqrt(2)
        assert h.hit[0] == 0 and abs(h.t[0] - (10 - np.sqrt(2))) < 1e-9
        np.testing.assert_allclose(h.normal[0], [-np.sqrt(0.5), -np.sqrt(0.5), 0], atol=1e-9)
        assert h.hit[1] == 1 and abs(h.t[1] - 18.0) < 1e-9
        np.testing.assert_allclose(h.normal[1], [0, -1, 0], atol=1e-12)
        # the -10 deg ray passes below the box (z < -1 at its near corner) and meets the ground
        t_ground = 1.73 / np.sin(-e)
        assert h.hit[2] == GROUND and abs(h.t[2] - t_ground) < 1e-9
        assert h.hit[3] == NO_HIT and np.isinf(h.t[3])
        assert h.hit[4] == GROUND and abs(h.t[4] - t_ground) < 1e-9


def test_raycast_numba_matches_numpy_reference():
    rng = np.random.default_rng(0)
    B = 40
    centre = rng.uniform(-20, 20, (B, 3))
    half = rng.uniform(0.2, 3, (B, 3))
    yaw = rng.uniform(-3, 3, B)
    obj = np.repeat(np.arange(10), 4)
    dirs = rng.normal(size=(3000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = np.array([[0.5, -0.3, 6.0]])
    plane = np.array([0.01, 0.0, 1.0, -1.7]) / np.linalg.norm([0.01, 0, 1.0])
    a = raycast(origin, dirs, centre, half, yaw, plane, 60.0, obj, 10)
    b = raycast_reference(origin, dirs, centre, half, yaw, plane, 60.0, obj, 10, chunk=700)
    np.testing.assert_array_equal(a.hit, b.hit)
    assert (a.hit >= 0).sum() > 300 and (a.hit == GROUND).sum() > 300
    fin = np.isfinite(a.t)
    np.testing.assert_allclose(a.t[fin], b.t[fin], atol=1e-9)
    np.testing.assert_allclose(a.normal, b.normal, atol=1e-9)
    np.testing.assert_array_equal(a.obj_total, b.obj_total)
    # hit points lie on the surfaces
    p = origin + dirs[fin] * a.t[fin, None]
    g = a.hit[fin] == GROUND
    np.testing.assert_allclose(p[g] @ plane[:3], plane[3], atol=1e-9)


def test_lidar_noise_free_points_on_surfaces():
    scene = generate_scene(3)
    scan = simulate_lidar(scene, np.random.default_rng(0), noise=False)
    p = scan.points[:, :3].astype(np.float64)
    assert 15000 < len(p) < 40000
    on_ground = np.abs(p[:, 2] - scene.ground_z(p[:, :2])) < 1e-5
    assert on_ground.mean() > 0.3
    # object points lie on their tight boxes (float32 storage => 1e-5 relative)
    boxes = scene.boxes_lidar
    obj = scan.hit_obj >= 0
    inside = _count_in_boxes(p[obj], boxes, grow=1e-4)
    assert inside.sum() == obj.sum()


# --- scenes ----------------------------------------------------------------------------------------
def test_scene_counts_sizes_and_no_overlap():
    from perception3d.synthetic.scene import bev_overlaps

    counts = []
    for seed in range(20):
        s = generate_scene(seed)
        counts.append(len(s.boxes_lidar))
        for cls, stats in CLASS_SIZE_STATS.items():
            b = s.boxes_lidar[s.classes == cls]
            for k, (m, sd) in enumerate(stats):
                assert np.all(np.abs(b[:, 3 + k] - m) <= 2.5 * sd + 1e-9), (cls, k)
        for i in range(len(s.boxes_lidar)):
            assert not bev_overlaps(s.boxes_lidar[i], np.delete(s.boxes_lidar, i, 0)).any()
        # object parts fill their label box exactly (tight box)
        pr = s.prims
        for i in range(len(s.boxes_lidar)):
            sel = pr.obj == i
            c, sn = np.cos(s.boxes_lidar[i, 6]), np.sin(s.boxes_lidar[i, 6])
            rel = pr.centre[sel] - s.boxes_lidar[i, :3]
            lx, ly = c * rel[:, 0] + sn * rel[:, 1], -sn * rel[:, 0] + c * rel[:, 1]
            ext = np.stack([np.abs(lx) + pr.half[sel, 0], np.abs(ly) + pr.half[sel, 1],
                            np.abs(rel[:, 2]) + pr.half[sel, 2]], 1).max(0)
            np.testing.assert_allclose(ext, s.boxes_lidar[i, 3:6] / 2, atol=1e-9)
    assert min(counts) >= 5 and max(counts) <= 25 and len(set(counts)) > 5
    classes = np.concatenate([generate_scene(k).classes for k in range(5)])
    assert {"Car", "Pedestrian", "Cyclist"} <= set(classes)


# --- written dataset -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "kitti"
    t0 = time.perf_counter()
    write_kitti_dataset(root, 2, seed=7, val_fraction=0.5)
    return root, (time.perf_counter() - t0) / 2


def test_dataset_layout_and_readback(written):
    root, _ = written
    assert (root / "ImageSets" / "train.txt").read_text() == "000000\n"
    assert (root / "ImageSets" / "val.txt").read_text() == "000001\n"
    ds = KittiDataset(root, image_set="train")
    f = ds[0]
    assert f.image.shape == (375, 1242, 3)
    assert 15000 < len(f.points_lidar) < 45000
    assert f.radar is not None and f.radar.shape[1] == 6
    gen = generate_frame((7, 0))
    np.testing.assert_array_equal(f.points_lidar, gen.points_lidar)
    # labels round trip: camera form on disk -> LiDAR boxes equal the generated ones
    assert len(f.labels) == len(gen.boxes_lidar) >= 3
    d = f.boxes_lidar.astype(np.float64) - gen.boxes_lidar
    assert np.abs(d[:, :6]).max() < 1e-2
    assert np.abs(_wrap(d[:, 6])).max() < 1e-2
    # occlusion / truncation fields are KITTI-valued
    assert set(np.unique(f.labels.occluded)) <= {0, 1, 2, 3}
    assert np.all((f.labels.truncated >= 0) & (f.labels.truncated <= 1))
    # radar ids refer to label rows, object points lie near their boxes
    ids = f.radar[:, 5].astype(int)
    assert ids.min() >= -1 and ids.max() < len(f.labels)
    for k in np.unique(ids[ids >= 0]):
        dist = np.linalg.norm(f.radar[ids == k, :2] - f.boxes_lidar[k, :2], axis=1)
        assert dist.max() < 4.0


def test_points_in_labelled_boxes(written):
    root, _ = written
    for i in range(2):
        f = KittiDataset(root)[i]
        gen = generate_frame((7, i))
        boxes = f.boxes_lidar.astype(np.float64)
        counts = _count_in_boxes(f.points_lidar, boxes, grow=0.1)
        # every point the simulator put on an object falls inside its (slightly grown) label box
        assert np.all(counts >= gen.num_lidar_points), (counts, gen.num_lidar_points)
        near = (f.labels.names == "Car") & (f.labels.occluded == 0) & (np.hypot(boxes[:, 0], boxes[:, 1]) < 20)
        assert np.all(counts[near] > 100), counts[near]
        # 2D boxes from the instance mask lie within the projected 3D boxes (+-2 px)
        corners = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)])
        for k in np.flatnonzero(f.labels.truncated == 0):
            b = boxes[k]
            c, s = np.cos(b[6]), np.sin(b[6])
            loc = corners * b[3:6]
            pts = b[:3] + np.stack([c * loc[:, 0] - s * loc[:, 1], s * loc[:, 0] + c * loc[:, 1], loc[:, 2]], 1)
            uv, _ = f.calib.lidar_to_image(pts)
            x1, y1, x2, y2 = f.labels.bbox2d[k]
            assert x1 >= uv[:, 0].min() - 2 and x2 <= uv[:, 0].max() + 2
            assert y1 >= uv[:, 1].min() - 2 and y2 <= uv[:, 1].max() + 2


def test_reproducible_bytes(written, tmp_path):
    root, _ = written
    write_frame(tmp_path / "same", "000000", generate_frame((7, 0)))
    write_frame(tmp_path / "other", "000000", generate_frame((8, 0)))
    for sub, name in (("velodyne", "000000.bin"), ("image_2", "000000.png"), ("label_2", "000000.txt"),
                      ("radar", "000000.bin"), ("calib", "000000.txt")):
        ref = (root / "training" / sub / name).read_bytes()
        assert (tmp_path / "same" / sub / name).read_bytes() == ref, sub
        if sub != "calib":
            assert (tmp_path / "other" / sub / name).read_bytes() != ref, sub


def test_generation_time(written):
    _, per_frame_write = written
    generate_frame((7, 5))  # warm (numba cache, ray cache)
    t0 = time.perf_counter()
    generate_frame((7, 6))
    dt = time.perf_counter() - t0
    print(f"generate_frame: {dt:.2f} s; write_kitti_dataset: {per_frame_write:.2f} s/frame")
    assert dt < 5.0
