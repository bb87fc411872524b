"""COLMAP reader/writers: a hand-written model with known numbers, camera models, text <-> binary
round trips on a generated scene, corrupt inputs."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perception3d.errors import DataError
from splatting.data import (
    load_colmap,
    load_scene,
    read_colmap_model,
    write_colmap_binary,
    write_colmap_text,
)
from splatting.data.colmap import qvec_to_rotmat, rotmat_to_qvec
from splatting.data.scene import MissingImagesWarning
from splatting.data.synthetic import write_synthetic_scene


def _png(path: Path, w: int, h: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _model(root: Path, cameras: str, images: str, points: str | None = None) -> Path:
    folder = root / "sparse" / "0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cameras.txt").write_text(cameras)
    (folder / "images.txt").write_text(images)
    if points is not None:
        (folder / "points3D.txt").write_text(points)
    return folder


# camera 1 at world centre C = (1, 2, 3); world->camera rotation: 90 degrees about z, q = (cos 45, 0, 0, sin 45)
_S = math.sqrt(0.5)
CAMERAS = "# comment\n1 PINHOLE 64 48 50.0 60.0 32.0 24.0\n2 SIMPLE_PINHOLE 64 48 40 31 23\n"
IMAGES = (
    "# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
    f"1 {_S!r} 0 0 {_S!r} 2 -1 -3 1 a.png\n"
    "10.5 20.5 1 11.0 21.0 -1\n"
    "2 1 0 0 0 0 0 0 2 b.png\n"
    "\n"
)
POINTS = "# id x y z r g b err track\n1 0.5 -1.25 2 255 0 10 0.3 1 0\n7 1e-3 0 -4 1 2 3 0.0\n"


@pytest.fixture
def hand_model(tmp_path):
    _model(tmp_path, CAMERAS, IMAGES, POINTS)
    _png(tmp_path / "images" / "a.png", 64, 48)
    _png(tmp_path / "images" / "b.png", 64, 48)
    return tmp_path


def test_hand_written_model_exact(hand_model):
    scene = load_colmap(hand_model)
    assert scene.format == "colmap" and scene.missing_images == ()
    a, b = scene.frames
    assert a.name == "a.png" and a.image_path == (hand_model / "images" / "a.png").resolve()
    expected = np.array([[0.0, 1.0, 0.0, 1.0], [-1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(a.camtoworld, expected, atol=1e-12)
    np.testing.assert_allclose(a.K, [[50, 0, 32], [0, 60, 24], [0, 0, 1]], atol=0)
    assert (a.width, a.height, a.distortion) == (64, 48, None)
    np.testing.assert_allclose(b.camtoworld, np.eye(4), atol=0)
    np.testing.assert_allclose(b.K, [[40, 0, 31], [0, 40, 23], [0, 0, 1]], atol=0)
    # a point 2 m along the camera's optical axis projects to the principal point
    p_world = a.camtoworld @ np.array([0.0, 0.0, 2.0, 1.0])
    p_cam = a.viewmat @ p_world
    uvw = a.K @ p_cam[:3]
    np.testing.assert_allclose(uvw[:2] / uvw[2], [32.0, 24.0], atol=1e-12)
    np.testing.assert_allclose(scene.points, [[0.5, -1.25, 2.0], [1e-3, 0.0, -4.0]], rtol=1e-7)
    np.testing.assert_array_equal(scene.points_rgb, [[255, 0, 10], [1, 2, 3]])
    assert scene.points.dtype == np.float32 and scene.points_rgb.dtype == np.uint8


@pytest.mark.parametrize("line, K, dist", [
    ("SIMPLE_PINHOLE 64 48 50 30 20", [[50, 0, 30], [0, 50, 20]], None),
    ("PINHOLE 64 48 50 55 30 20", [[50, 0, 30], [0, 55, 20]], None),
    ("SIMPLE_RADIAL 64 48 50 30 20 -0.1", [[50, 0, 30], [0, 50, 20]], (-0.1, 0.0, 0.0, 0.0)),
    ("RADIAL 64 48 50 30 20 -0.1 0.02", [[50, 0, 30], [0, 50, 20]], (-0.1, 0.02, 0.0, 0.0)),
    ("OPENCV 64 48 50 55 30 20 -0.1 0.02 0.001 -0.002", [[50, 0, 30], [0, 55, 20]], (-0.1, 0.02, 0.001, -0.002)),
    ("OPENCV 64 48 50 55 30 20 0 0 0 0", [[50, 0, 30], [0, 55, 20]], None),
])
def test_camera_models(tmp_path, line, K, dist):
    _model(tmp_path, f"3 {line}\n", "1 1 0 0 0 0 0 0 3 a.png\n\n")
    _png(tmp_path / "images" / "a.png", 64, 48)
    (frame,) = load_colmap(tmp_path).frames
    np.testing.assert_allclose(frame.K[:2], K, atol=0)
    assert frame.distortion == dist


@pytest.mark.parametrize("model", ["OPENCV_FISHEYE 64 48 50 55 30 20 0.1 0 0 0", "FOV 64 48 50 55 30 20 0.9"])
def test_unsupported_model_text(tmp_path, model):
    _model(tmp_path, f"1 {model}\n", "1 1 0 0 0 0 0 0 1 a.png\n\n")
    _png(tmp_path / "images" / "a.png", 64, 48)
    name = model.split()[0]
    with pytest.raises(DataError, match=rf"cameras\.txt.*{name}"):
        load_colmap(tmp_path)


def test_unknown_model_name_and_id(tmp_path):
    _model(tmp_path, "1 MY_LENS 64 48 50\n", "")
    with pytest.raises(DataError, match=r"cameras\.txt:1: unknown camera model 'MY_LENS'"):
        read_colmap_model(tmp_path / "sparse" / "0")
    folder = tmp_path / "bin"
    folder.mkdir()
    # one OPENCV_FISHEYE camera (model id 5, 8 params) written by hand in the documented binary layout
    (folder / "cameras.bin").write_bytes(struct.pack("<QiiQQ8d", 1, 1, 5, 64, 48, 50, 50, 32, 24, 0.1, 0, 0, 0))
    (folder / "images.bin").write_bytes(struct.pack("<Q", 0))
    model = read_colmap_model(folder)
    assert model.cameras[1].model == "OPENCV_FISHEYE" and model.cameras[1].params[4] == 0.1
    with pytest.raises(DataError, match=r"cameras\.bin.*OPENCV_FISHEYE"):
        model.cameras[1].intrinsics(folder / "cameras.bin")
    (folder / "cameras.bin").write_bytes(struct.pack("<QiiQQ3d", 1, 1, 42, 64, 48, 50, 32, 24))
    with pytest.raises(DataError, match=r"cameras\.bin.*model id 42"):
        read_colmap_model(folder)


def test_corrupt_text_inputs(tmp_path):
    _model(tmp_path, CAMERAS, "1 nan 0 0 1 0 0 0 1 a.png\n\n")
    with pytest.raises(DataError, match=r"images\.txt:1: NaN"):
        read_colmap_model(tmp_path / "sparse" / "0")
    _model(tmp_path, CAMERAS, "1 1 0 0 0 0 0 0 9 a.png\n\n")
    with pytest.raises(DataError, match=r"refers to camera 9"):
        read_colmap_model(tmp_path / "sparse" / "0")
    _model(tmp_path, CAMERAS, "1 1 0 0 0 0 0 0 1 a.png\n2 1 0 0 0 0 0 0 1 b.png\n")
    with pytest.raises(DataError, match=r"images\.txt:2: expected the POINTS2D line"):
        read_colmap_model(tmp_path / "sparse" / "0")
    _model(tmp_path, "1 PINHOLE 64 48 50 60 32\n", "")
    with pytest.raises(DataError, match=r"cameras\.txt:1: the PINHOLE model takes 4 parameters; got 3"):
        read_colmap_model(tmp_path / "sparse" / "0")
    _model(tmp_path, CAMERAS, IMAGES, "1 0 0 0 300 0 0 0\n")
    with pytest.raises(DataError, match=r"points3D\.txt:1: colour"):
        read_colmap_model(tmp_path / "sparse" / "0")
    with pytest.raises(DataError, match="no COLMAP model"):
        load_colmap(tmp_path / "sparse")


def test_missing_images_dropped_with_one_warning(hand_model):
    (hand_model / "images" / "b.png").unlink()
    with pytest.warns(MissingImagesWarning, match=r"1 of 2 listed images are missing.*'b\.png'"):
        scene = load_colmap(hand_model)
    assert [f.name for f in scene.frames] == ["a.png"] and scene.missing_images == ("b.png",)
    (hand_model / "images" / "a.png").unlink()
    with pytest.raises(DataError, match=r"none of the 2 listed images exists"):
        load_colmap(hand_model)


def test_unreadable_image_names_file(hand_model):
    (hand_model / "images" / "a.png").write_text("this is not a png")
    with pytest.raises(DataError, match=r"a\.png: not a readable image"):
        load_colmap(hand_model)  # on load (the image header), not when training reaches the image


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    qs = rng.normal(size=(200, 4))
    qs[:4] = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # the trace <= 0 branches
    for q in qs:
        q = q / np.linalg.norm(q) * (1 if q[0] >= 0 else -1)
        R = qvec_to_rotmat(q)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(rotmat_to_qvec(R), q, atol=1e-12)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("colmap") / "scene"
    return write_synthetic_scene(root, seed=5, num_views=6, width=32, height=24, num_points=300, samples_per_side=1)


def test_text_binary_round_trip(generated, tmp_path):
    text = read_colmap_model(generated / "sparse" / "0")
    assert not text.binary and len(text.images) == 6 and len(text.points) == 300
    scene = load_colmap(generated)
    write_colmap_binary(tmp_path / "bin", scene.frames, scene.points, scene.points_rgb)
    binary = read_colmap_model(tmp_path / "bin")
    assert binary.binary
    assert binary.cameras == text.cameras
    assert [(i.name, i.camera_id) for i in binary.images] == [(i.name, i.camera_id) for i in text.images]
    np.testing.assert_allclose([i.qvec for i in binary.images], [i.qvec for i in text.images], atol=1e-14)
    np.testing.assert_allclose([i.tvec for i in binary.images], [i.tvec for i in text.images], atol=1e-14)
    np.testing.assert_array_equal(binary.points, text.points)
    np.testing.assert_array_equal(binary.points_rgb, text.points_rgb)
    # the text and binary writers, fed the same frames, store the same doubles
    write_colmap_text(tmp_path / "txt", scene.frames, scene.points, scene.points_rgb)
    text2 = read_colmap_model(tmp_path / "txt")
    assert text2.cameras == binary.cameras
    assert [i.qvec for i in text2.images] == [i.qvec for i in binary.images]
    assert [i.tvec for i in text2.images] == [i.tvec for i in binary.images]
    np.testing.assert_array_equal(text2.points, binary.points)
    b_frames = load_colmap(generated, model_dir=tmp_path / "bin").frames
    t_frames = load_colmap(generated, model_dir=tmp_path / "txt").frames
    for fb, ft, f0 in zip(b_frames, t_frames, scene.frames):
        np.testing.assert_array_equal(fb.camtoworld, ft.camtoworld)
        np.testing.assert_array_equal(fb.K, ft.K)
        np.testing.assert_allclose(fb.camtoworld, f0.camtoworld, atol=1e-14)


def test_binary_model_is_detected_and_preferred(generated, tmp_path):
    root = tmp_path / "root"
    (root / "sparse" / "0").mkdir(parents=True)
    (root / "images").symlink_to(generated / "images", target_is_directory=True)
    scene = load_colmap(generated)
    write_colmap_binary(root / "sparse" / "0", scene.frames, scene.points, scene.points_rgb)
    (root / "sparse" / "0" / "cameras.txt").write_text("1 FOV 1 1 1 1 1 1\n")  # ignored: binary is read
    loaded = load_scene(root)
    assert loaded.format == "colmap" and len(loaded.frames) == 6
    for a, b in zip(loaded.frames, scene.frames):
        np.testing.assert_allclose(a.camtoworld, b.camtoworld, atol=1e-14)
        np.testing.assert_array_equal(a.K, b.K)


def test_truncated_binary(generated, tmp_path):
    scene = load_colmap(generated)
    folder = write_colmap_binary(tmp_path / "bin", scene.frames, scene.points, scene.points_rgb)
    raw = (folder / "images.bin").read_bytes()
    (folder / "images.bin").write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"images\.bin: truncated"):
        read_colmap_model(folder)
    (folder / "images.bin").write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match=r"images\.bin: 1 unexpected trailing bytes"):
        read_colmap_model(folder)
