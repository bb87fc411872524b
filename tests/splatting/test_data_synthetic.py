"""The synthetic multi-view generator: reproducible bytes, both readers agree on it, the held-out
split, renders of known configurations, surface points on the surfaces."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perception3d.errors import DataError
from splatting.data import SplatDataset, load_colmap, load_scene, load_transforms
from splatting.data.synthetic import (
    Box,
    Sphere,
    SyntheticScene,
    Texture,
    look_at,
    make_synthetic_scene,
    orbit_cameras,
    render_view,
    sample_surface_points,
    write_synthetic_scene,
)

OPTS = dict(seed=3, num_views=10, width=64, height=48, num_points=600, samples_per_side=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_synthetic_scene(tmp_path_factory.mktemp("syn") / "scene", **OPTS)


def test_layout_and_reproducible_bytes(generated, tmp_path):
    files = _files(generated)
    assert set(files) == {"transforms.json", "points3D.ply", "synthetic.json", "sparse/0/cameras.txt",
                          "sparse/0/images.txt", "sparse/0/points3D.txt"} | {f"images/{i:04d}.png" for i in range(10)}
    again = write_synthetic_scene(tmp_path / "again", **OPTS)
    assert _files(again) == files
    other = write_synthetic_scene(tmp_path / "other", **{**OPTS, "seed": 4})
    assert _files(other)["images/0000.png"] != files["images/0000.png"]
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(".partial" in p.name for p in tmp_path.iterdir())
    with Image.open(generated / "images" / "0000.png") as im:
        assert im.size == (64, 48) and im.mode == "RGB"


def test_exist_ok(generated, tmp_path):
    before = (generated / "images" / "0000.png").stat().st_mtime_ns
    assert write_synthetic_scene(generated, exist_ok=True, **OPTS) == generated
    assert (generated / "images" / "0000.png").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="exist_ok=True"):
        write_synthetic_scene(generated, **OPTS)
    with pytest.raises(FileExistsError, match="was not generated with"):
        write_synthetic_scene(generated, exist_ok=True, **{**OPTS, "num_views": 11})


def test_colmap_and_transforms_readers_agree(generated):
    colmap = load_colmap(generated)
    tjson = load_transforms(generated)
    assert load_scene(generated).format == "colmap"  # COLMAP wins the detection (it carries points)
    assert len(colmap.frames) == len(tjson.frames) == 10
    assert [f.name for f in colmap.frames] == [f"{i:04d}.png" for i in range(10)]
    assert [f.name for f in tjson.frames] == [f"images/{i:04d}.png" for i in range(10)]
    for a, b in zip(colmap.frames, tjson.frames):
        assert a.image_path == b.image_path
        np.testing.assert_allclose(a.camtoworld, b.camtoworld, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.K, b.K, atol=1e-6, rtol=0)
        assert (a.width, a.height, a.distortion) == (b.width, b.height, b.distortion) == (64, 48, None)
        R = a.camtoworld[:3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(colmap.points, tjson.points)
    np.testing.assert_array_equal(colmap.points_rgb, tjson.points_rgb)
    assert colmap.points.shape == (600, 3)
    meta = json.loads((generated / "transforms.json").read_text())
    assert meta["w"] == 64 and meta["h"] == 48 and meta["ply_file_path"] == "points3D.ply"


def test_cameras_look_at_the_scene_centre(generated):
    target = np.array(make_synthetic_scene(3).target)
    for f in load_colmap(generated).frames:
        p = f.viewmat @ np.append(target, 1.0)
        uvw = f.K @ p[:3]
        assert p[2] > 3.0  # in front, about 4.5 m away
        np.testing.assert_allclose(uvw[:2] / uvw[2], [32.0, 24.0], atol=1e-9)
        assert f.camtoworld[2, 0] == pytest.approx(0.0, abs=1e-12)  # horizontal image x axis: no roll
        assert f.camtoworld[2, 1] < 0  # image down points down in the world (z up)


def test_held_out_split_is_every_8th(generated):
    scene = load_scene(generated)
    test = SplatDataset(scene, "test")
    assert [f.name for f in test.frames] == ["0000.png", "0008.png"]
    train = SplatDataset(scene, "train")
    assert [f.name for f in train.frames] == [f"{i:04d}.png" for i in range(10) if i % 8]
    s = test[1]
    with Image.open(generated / "images" / "0008.png") as im:
        np.testing.assert_allclose(s.image.numpy(), np.asarray(im) / 255.0, atol=1e-7)
    assert s.name == "0008.png" and (s.width, s.height) == (64, 48)


def test_render_known_box_and_sphere():
    red = (0.8, 0.2, 0.1)
    scene = SyntheticScene(boxes=(Box((0.0, 0.0, 0.5), (1.0, 1.0, 1.0), 0.0, Texture("solid", red)),),
                           ground_radius=0.0, light_dir=(0.6, 0.0, 0.8), ambient=0.3,
                           background_top=(0.0, 0.0, 1.0), background_bottom=(1.0, 1.0, 0.0))
    W, H = 33, 25
    K = np.array([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]])
    img = render_view(scene, look_at((4.0, 0.0, 0.5), (0.0, 0.0, 0.5)), K, W, H, samples_per_side=3)
    assert img.shape == (H, W, 3)
    # the centre pixel sees the +x face (normal (1, 0, 0)): albedo * (0.3 + 0.7 * n.l), n.l = 0.6
    np.testing.assert_allclose(img[H // 2, W // 2], np.array(red) * (0.3 + 0.7 * 0.6), atol=1e-12)
    # the top-left pixel misses the box: with 1 sample per pixel, the gradient background at its ray's z
    c2w = look_at((4.0, 0.0, 0.5), (0.0, 0.0, 0.5))
    one = render_view(scene, c2w, K, W, H, samples_per_side=1)
    d = c2w[:3, :3] @ np.array([(0.5 - W / 2) / 30.0, (0.5 - H / 2) / 30.0, 1.0])
    w = 0.5 + 0.5 * d[2] / np.linalg.norm(d)
    np.testing.assert_allclose(one[0, 0], (1 - w) * np.array([1.0, 1.0, 0.0]) + w * np.array([0.0, 0.0, 1.0]),
                               atol=1e-12)
    np.testing.assert_allclose(one[H // 2, W // 2], img[H // 2, W // 2], atol=1e-12)
    # a sphere seen from +y: the ray through the principal point hits where the normal is (0, 1, 0)
    green = (0.1, 0.7, 0.2)
    sph = SyntheticScene(spheres=(Sphere((0.0, 0.0, 1.0), 0.5, Texture("solid", green)),), ground_radius=0.0,
                         light_dir=(0.0, 0.6, 0.8), ambient=0.3)
    img = render_view(sph, look_at((0.0, 5.0, 1.0), (0.0, 0.0, 1.0)), K, W, H, samples_per_side=1)
    np.testing.assert_allclose(img[H // 2, W // 2], np.array(green) * (0.3 + 0.7 * 0.6), atol=1e-12)
    # anti-aliasing: the box's left edge projects to u = 16.5 - 30 * 0.5 / 3.5 = 12.21, so 3 of the 4 sample
    # columns of pixel 12 hit the face and 1 the (plain white) background
    plain = SyntheticScene(boxes=scene.boxes, ground_radius=0.0, light_dir=(0.6, 0.0, 0.8), ambient=0.3)
    aa = render_view(plain, c2w, K, W, H, samples_per_side=4)
    face = np.array(red) * (0.3 + 0.7 * 0.6)
    np.testing.assert_allclose(aa[H // 2, 12], 0.75 * face + 0.25, atol=1e-12)
    np.testing.assert_allclose(aa[H // 2, 11], [1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(aa[H // 2, 13], face, atol=1e-12)


def test_ground_texture_is_seen_from_above():
    tex = Texture("checker", (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), scale=1.0)
    scene = SyntheticScene(ground_radius=10.0, ground_texture=tex, light_dir=(0, 0, 1), ambient=0.5)
    K = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    c2w = np.diag([1.0, -1.0, -1.0, 1.0])  # looking straight down from z = 10: x right, y down = -world y
    c2w[:3, 3] = (0.5, 0.5, 10.0)  # the centre of the ground cell (0, 0)
    img = render_view(scene, c2w, K, 100, 100, samples_per_side=1)
    # cell (0, 0) (floor sum even) has colour a; 10 px/m, so pixels 10 px away (cell (1, 0)) have colour b
    np.testing.assert_allclose(img[50, 50], [0.9] * 3, atol=1e-12)
    np.testing.assert_allclose(img[50, 60], [0.1] * 3, atol=1e-12)
    np.testing.assert_allclose(img[60, 60], [0.9] * 3, atol=1e-12)


def test_soft_checker_edges():
    tex = Texture("checker", (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), scale=1.0, softness=0.2)
    scene = SyntheticScene(ground_radius=10.0, ground_texture=tex, light_dir=(0, 0, 1), ambient=0.5)
    K = np.array([[200.0, 0, 49.5], [0, 200.0, 49.5], [0, 0, 1]])  # 0.05 m per pixel; pixel 49 on the axis
    c2w = np.diag([1.0, -1.0, -1.0, 1.0])
    c2w[:3, 3] = (1.0, 0.5, 10.0)  # looking down at the edge x = 1 between cells (0, 0) and (1, 0)
    row = render_view(scene, c2w, K, 100, 100, samples_per_side=1)[49, :, 0]
    assert row[49] == pytest.approx(0.5, abs=1e-12)  # on the edge: the mean of the two colours
    # 0.05 cells past the edge: smoothstep(0.05 / 0.2) = 0.15625, weight of b = 0.5 + 0.5 * 0.15625
    assert row[50] == pytest.approx(0.9 - 0.8 * (0.5 + 0.5 * 0.15625), abs=1e-12)
    assert row[48] == pytest.approx(0.9 - 0.8 * (0.5 - 0.5 * 0.15625), abs=1e-12)
    assert row[54] == pytest.approx(0.1, abs=1e-12) and row[44] == pytest.approx(0.9, abs=1e-12)
    assert np.all(np.abs(np.diff(row[40:60])) < 0.25)  # no jump anywhere along the row


def test_surface_points_lie_on_surfaces_and_match_renders():
    scene = make_synthetic_scene(seed=1)
    cams = orbit_cameras(4, 80, 60, seed=1)
    xyz, rgb = sample_surface_points(scene, cams, 80, 60, num_points=2000, seed=0)
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8 and xyz.shape == (2000, 3)
    p = xyz.astype(np.float64)
    on = np.abs(p[:, 2]) < 1e-5  # ground
    for s in scene.spheres:
        on |= np.abs(np.linalg.norm(p - s.centre, axis=1) - s.radius) < 1e-5
    for b in scene.boxes:
        c, sn = math.cos(b.yaw), math.sin(b.yaw)
        d = p - b.centre
        local = np.stack([c * d[:, 0] + sn * d[:, 1], -sn * d[:, 0] + c * d[:, 1], d[:, 2]], 1)
        local /= 0.5 * np.array(b.size)
        on |= np.abs(np.abs(local).max(1) - 1.0) < 1e-5
    assert on.all()
    assert (np.abs(p[:, 2]) < 1e-5).mean() < 0.9  # not only ground
    # points seen by camera 0 have the colour of the (1 sample per pixel) render at their projection
    xyz0, rgb0 = sample_surface_points(scene, cams[:1], 80, 60, num_points=500, seed=2)
    c2w, K = cams[0]
    img = np.round(np.clip(render_view(scene, c2w, K, 80, 60, samples_per_side=1), 0, 1) * 255)
    pc = (np.linalg.inv(c2w) @ np.c_[xyz0, np.ones(len(xyz0))].T)[:3]
    uv = (K @ pc)[:2] / pc[2]
    px = img[np.floor(uv[1]).astype(int), np.floor(uv[0]).astype(int)]
    assert np.median(np.abs(px - rgb0).max(1)) <= 2


def test_render_speed_and_determinism():
    scene = make_synthetic_scene(seed=0)
    c2w, K = orbit_cameras(1, 200, 150)[0]
    render_view(scene, c2w, K, 200, 150)  # compile / load the numba cache
    t = time.perf_counter()
    a = render_view(scene, c2w, K, 200, 150)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    np.testing.assert_array_equal(a, render_view(scene, c2w, K, 200, 150))
    assert 0.0 <= a.min() and a.max() <= 1.0 + 1e-12


def test_bad_options(tmp_path):
    with pytest.raises(DataError, match="Texture.kind='plaid'"):
        Texture("plaid")
    with pytest.raises(DataError, match="parallel to `up`"):
        look_at((0, 0, 5), (0, 0, 0))
    with pytest.raises(DataError, match="samples_per_side=0"):
        render_view(make_synthetic_scene(), np.eye(4), np.eye(3), 4, 4, samples_per_side=0)
    with pytest.raises(DataError, match="cannot place"):
        make_synthetic_scene(num_boxes=40)
