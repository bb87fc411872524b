"""transforms.json reader (Blender / instant-ngp / nerfstudio): OpenGL -> OpenCV on a hand-made
camera, intrinsics rules, Blender split files, alpha compositing, corrupt inputs, the real fox capture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perception3d.errors import DataError
from splatting.data import SplatDataset, load_scene, load_transforms
from splatting.data.scene import MissingImagesWarning

FOX = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fox"


def _png(path: Path, w: int, h: int, mode: str = "RGB", value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    c = len(mode)
    Image.fromarray(np.full((h, w, c), value, np.uint8).squeeze(), mode).save(path)


def _camera_at(z: float) -> list:
    """OpenGL camera -> world: at (0, 0, z), axes aligned with the world (looking down -z)."""
    return [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]]


def _write(root: Path, meta: dict, name: str = "transforms.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(meta))
    return root / name


def test_opengl_camera_converted_to_opencv(tmp_path):
    # Blender style: camera_angle_x only, file_path without extension, image size from the PNG header
    _png(tmp_path / "train" / "r_0.png", 40, 30)
    angle = 0.7
    frames = [{"file_path": "./train/r_0", "transform_matrix": _camera_at(5)}]
    _write(tmp_path, {"camera_angle_x": angle, "frames": frames})
    (frame,) = load_transforms(tmp_path).frames
    assert frame.image_path == (tmp_path / "train" / "r_0.png").resolve() and frame.name == "./train/r_0"
    f = 0.5 * 40 / math.tan(0.5 * angle)
    np.testing.assert_allclose(frame.K, [[f, 0, 20], [0, f, 15], [0, 0, 1]], rtol=1e-15)
    assert (frame.width, frame.height, frame.distortion, frame.split) == (40, 30, None, None)

    def project(p):
        pc = frame.viewmat @ np.append(p, 1.0)
        uvw = frame.K @ pc[:3]
        return uvw[:2] / uvw[2], pc[2]

    uv, depth = project([0.0, 0.0, 0.0])  # the origin: straight ahead, 5 m away
    np.testing.assert_allclose(uv, [20.0, 15.0], atol=1e-12)
    assert depth == pytest.approx(5.0)
    uv, _ = project([1.0, 0.0, 0.0])  # world +x is image right
    assert uv[0] == pytest.approx(20 + f / 5) and uv[1] == pytest.approx(15)
    uv, _ = project([0.0, 1.0, 0.0])  # world +y (the OpenGL camera's up) is image up
    assert uv[1] == pytest.approx(15 - f / 5) and uv[0] == pytest.approx(20)


def test_ngp_intrinsics_per_frame_override_and_distortion(tmp_path):
    _png(tmp_path / "a.jpg", 40, 30)
    _png(tmp_path / "b.jpg", 40, 30)
    meta = {"fl_x": 100.0, "fl_y": 90.0, "cx": 21.0, "cy": 14.0, "w": 40, "h": 30, "k1": 0.1, "k2": -0.01,
            "p1": 0.0, "p2": 0.001, "camera_angle_x": 3.0,  # ignored: fl_x wins
            "frames": [{"file_path": "a.jpg", "transform_matrix": _camera_at(1)},
                       {"file_path": "b.jpg", "transform_matrix": _camera_at(2)[:3], "fl_x": 80.0, "k1": 0.0,
                        "k2": 0.0, "p2": 0.0}]}
    _write(tmp_path, meta)
    a, b = load_scene(tmp_path).frames
    np.testing.assert_allclose(a.K, [[100, 0, 21], [0, 90, 14], [0, 0, 1]])
    assert a.distortion == (0.1, -0.01, 0.0, 0.001)
    np.testing.assert_allclose(b.K, [[80, 0, 21], [0, 90, 14], [0, 0, 1]])
    assert b.distortion is None
    np.testing.assert_allclose(b.camtoworld[:3, 3], [0, 0, 2])  # 3x4 matrices accepted


def test_blender_split_files(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        frames = []
        for i in range(n):
            _png(tmp_path / split / f"r_{i}.png", 8, 8, "RGBA", (255, 0, 0, 255))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": _camera_at(4 + i)})
        _write(tmp_path, {"camera_angle_x": 0.69, "frames": frames}, f"transforms_{split}.json")
    scene = load_scene(tmp_path)
    assert scene.format == "transforms" and [f.split for f in scene.frames] == ["train"] * 3 + ["val"] + ["test"] * 2
    assert [f.name for f in SplatDataset(scene, "test").frames] == ["./test/r_0", "./test/r_1"]
    assert len(SplatDataset(scene, "train")) == 3 and len(SplatDataset(scene, "all")) == 6
    # use_scene_splits=False: every 8th of the 6 sorted names (index 0) is held out instead
    assert [f.name for f in SplatDataset(scene, "test", use_scene_splits=False).frames] == ["./test/r_0"]


def test_alpha_composited_on_background(tmp_path):
    path = tmp_path / "img.png"
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> background
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[1, 0] = (0, 0, 255, 102)  # 40 % blue
    Image.fromarray(rgba, "RGBA").save(path)
    _write(tmp_path, {"fl_x": 2.0, "frames": [{"file_path": "img.png", "transform_matrix": _camera_at(1)}]})
    scene = load_transforms(tmp_path / "transforms.json")
    img = SplatDataset(scene, "all")[0].image
    np.testing.assert_allclose(img[0, 0].numpy(), [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(img[0, 1].numpy(), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(img[1, 0].numpy(), [0.6, 0.6, 1.0], atol=1e-6)
    black = SplatDataset(scene, "all", background_rgb=(0, 0, 0))[0].image
    np.testing.assert_allclose(black[1, 0].numpy(), [0, 0, 0.4], atol=1e-6)


@pytest.mark.parametrize("change, match", [
    ({"transform_matrix": [[1, 0, 0, 0], [0, float("nan"), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]},
     r"frames\[0\] \('a.png'\)\.transform_matrix: contains NaN"),
    ({"transform_matrix": [[1, 0, 0], [0, 1, 0]]}, r"expected 4x4 \(or 3x4\)"),
    ({"transform_matrix": "eye"}, r"transform_matrix: expected numbers"),
    ({"transform_matrix": None}, r"frames\[0\] \('a.png'\): missing 'transform_matrix'"),
    ({"fl_x": None}, r"no focal length; expected 'fl_x' or 'camera_angle_x'"),
    ({"fl_x": "big"}, r"frames\[0\]\.fl_x: expected a finite number"),
    ({"camera_model": "OPENCV_FISHEYE"}, r"camera model 'OPENCV_FISHEYE' is not supported"),
    ({"k3": 0.1}, r"only k1, k2, p1, p2"),
    ({"w": 40.5}, r"frames\[0\]\.w: expected a positive whole number"),
])
def test_bad_frames(tmp_path, change, match):
    _png(tmp_path / "a.png", 40, 30)
    frame = {"file_path": "a.png", "transform_matrix": _camera_at(1), "fl_x": 50.0}
    frame.update(change)
    frame = {k: v for k, v in frame.items() if v is not None}
    _write(tmp_path, {"frames": [frame]})
    with pytest.raises(DataError, match=match):
        load_transforms(tmp_path)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_scene(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"unknown dataset layout.*sparse/0.*transforms\.json.*poses_bounds\.npy"):
        load_scene(tmp_path)
    (tmp_path / "transforms.json").write_text('{"frames": [1, }')
    with pytest.raises(DataError, match=r"transforms\.json:1: not valid JSON"):
        load_scene(tmp_path)
    _write(tmp_path, {"frames": []})
    with pytest.raises(DataError, match="lists no frames"):
        load_scene(tmp_path)
    (tmp_path / "a.png").write_text("not an image")  # w/h missing: the header is read and fails
    _write(tmp_path, {"fl_x": 5.0, "frames": [{"file_path": "a.png", "transform_matrix": _camera_at(1)}]})
    with pytest.raises(DataError, match=r"a\.png: not a readable image"):
        load_scene(tmp_path)


def test_image_size_mismatch(tmp_path):
    _png(tmp_path / "a.png", 40, 30)
    frames = [{"file_path": "a.png", "transform_matrix": _camera_at(1)}]
    _write(tmp_path, {"fl_x": 5.0, "w": 80, "h": 60, "frames": frames})
    with pytest.raises(DataError, match=r"a\.png: image is 40x30 px but .*transforms\.json says w x h = 80x60"):
        load_scene(tmp_path)  # on load (the image header), not when training reaches the image


# ------------------------------------------------------------------------------------------------
# the real fox capture (../shared/data/fox): 67 frames listed, 50 images present, 1080x1920
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fox():
    if not (FOX / "transforms.json").is_file():
        pytest.skip(f"fox sample not found at {FOX}")
    with pytest.warns(MissingImagesWarning, match=r"17 of 67 listed images are missing.*'images/0005\.jpg'"):
        return load_scene(FOX)


def test_fox_frames(fox):
    assert fox.format == "transforms" and len(fox.frames) == 50 and len(fox.missing_images) == 17
    assert "images/0005.jpg" in fox.missing_images and all(f.image_path.is_file() for f in fox.frames)
    f = fox.frames[0]
    assert (f.width, f.height, f.name) == (1080, 1920, "images/0001.jpg")
    np.testing.assert_allclose(f.K, [[1375.52, 0, 554.558], [0, 1374.49, 965.268], [0, 0, 1]])
    assert f.distortion == (0.0578421, -0.0805099, -0.000980296, 0.00015575)
    R = f.camtoworld[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-6)
    # OpenGL -> OpenCV: the y and z columns are negated, x and the centre are kept
    np.testing.assert_allclose(f.camtoworld[:3, 0], [0.8926439112348871, 0.4464189982715247, -0.062425682580756266])
    np.testing.assert_allclose(f.camtoworld[:3, 1], [-0.08799600283226543, 0.03675452191179031, -0.995442519072023])
    np.testing.assert_allclose(f.camtoworld[:3, 3], [3.168359405609479, -5.4794898611466945, -0.9791660699008925])


def test_fox_dataset_downscaled_and_undistorted(fox):
    ds = SplatDataset(fox, "test", downscale=4)
    present = sorted(p.name for p in (FOX / "images").glob("*.jpg"))
    assert [f.name for f in ds.frames] == [f"images/{n}" for n in present[::8]]  # every 8th of the 50 present
    assert len(ds) == 7 and len(SplatDataset(fox, "train")) == 43
    s = ds[0]
    # undistorted, then cropped to the pixels with image content: x 7..1072, y 11..1912 of 1080x1920
    assert ds._undistortion(ds.frames[0])[1] == (7, 11, 1066, 1902)
    assert s.image.shape == (475, 266, 3) and s.image.dtype == torch.float32 and (s.width, s.height) == (266, 475)
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
    np.testing.assert_allclose(s.K.numpy(), [[1375.52 / 4, 0, (554.558 - 7) / 4], [0, 1374.49 / 4, (965.268 - 11) / 4],
                                             [0, 0, 1]], rtol=1e-6)
    # no black strips left by the undistortion along the edges (the uncropped image had them)
    assert float(s.image[[0, -1]].amax(-1).mean()) > 0.2 and float(s.image[:, [0, -1]].amax(-1).mean()) > 0.2
    # undistortion moved pixels (k1 = 0.058) but kept the picture: compare with the plain 4x block mean
    raw = torch.from_numpy(np.asarray(Image.open(FOX / "images" / "0001.jpg"), np.float32) / 255.0)[11:11 + 1900, 7:7 + 1064]
    plain = torch.nn.functional.avg_pool2d(raw.permute(2, 0, 1)[None], 4)[0].permute(1, 2, 0)
    diff = (s.image - plain).abs()
    assert float(diff[200:280, 100:170].mean()) < 0.005  # near the principal point distortion is tiny
    assert float(diff[:40].mean()) > 0.02  # near the edge it is not
    viewmats, Ks = ds.cameras()
    assert viewmats.shape == (7, 4, 4) and Ks.shape == (7, 3, 3)
    torch.testing.assert_close(viewmats[0] @ s.camtoworld, torch.eye(4), atol=1e-5, rtol=0)
    assert ds is not None and ds[0].image is s.image  # cached
