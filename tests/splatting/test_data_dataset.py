"""SplatDataset (splits, downscaling, undistortion, cameras) and the LLFF reader."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perception3d.errors import DataError
from splatting.data import CameraFrame, Scene, SplatDataset, load_llff, load_scene, undistort_image
from splatting.data.scene import undistortion_crop, undistortion_grid

# a camera with strong barrel distortion, pixel centres at (u + 0.5, v + 0.5)
W, H = 96, 72
K = np.array([[80.0, 0.0, 47.0], [0.0, 78.0, 37.5], [0.0, 0.0, 1.0]])
DIST = (-0.25, 0.05, 0.002, -0.001)


def pattern(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth checkerboard (period 24 px) over continuous pixel coordinates, values in [0.1, 0.9]."""
    return 0.5 + 0.4 * np.sin(2 * np.pi * u / 24.0) * np.sin(2 * np.pi * v / 24.0)


def undistort_normalised(xd: np.ndarray, yd: np.ndarray, dist, iters: int = 50):
    """Invert OpenCV's (k1, k2, p1, p2) distortion by fixed-point iteration (independent of the library)."""
    k1, k2, p1, p2 = dist
    x, y = xd.copy(), yd.copy()
    for _ in range(iters):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x, y = (xd - dx) / radial, (yd - dy) / radial
    return x, y


def distorted_capture():
    """(distorted image, ideal undistorted image), both float64 [H, W]."""
    uc, vc = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    ideal = pattern(uc, vc)
    x, y = undistort_normalised((uc - K[0, 2]) / K[0, 0], (vc - K[1, 2]) / K[1, 1], DIST)
    distorted = pattern(K[0, 0] * x + K[0, 2], K[1, 1] * y + K[1, 2])
    return distorted, ideal


def write_opencv_colmap(root: Path, image: np.ndarray) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "sparse" / "0").mkdir(parents=True)
    Image.fromarray(np.round(np.repeat(image[..., None], 3, 2) * 255).astype(np.uint8)).save(root / "images" / "d.png")
    params = " ".join(repr(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2], *DIST))
    (root / "sparse" / "0" / "cameras.txt").write_text(f"1 OPENCV {W} {H} {params}\n")
    (root / "sparse" / "0" / "images.txt").write_text("1 1 0 0 0 0 0 0 1 d.png\n\n")
    return root


def test_undistortion_recovers_the_ideal_image(tmp_path):
    distorted, ideal = distorted_capture()
    scene = load_scene(write_opencv_colmap(tmp_path, distorted))
    assert scene.frames[0].distortion == DIST
    out = SplatDataset(scene, "all")[0].image.numpy().astype(np.float64)
    m = 10  # compare away from the borders (where the distorted image has no data)
    err = np.abs(out[m:-m, m:-m, 0] - ideal[m:-m, m:-m])
    assert err.mean() < 0.004 and err.max() < 0.02, (err.mean(), err.max())
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    # the test can fail: without undistortion, or undistorting the wrong way, the error is 10x larger
    assert np.abs(distorted[m:-m, m:-m] - ideal[m:-m, m:-m]).mean() > 0.03
    img = torch.from_numpy(np.repeat(distorted[..., None], 3, 2).astype(np.float32))
    wrong = undistort_image(img, K, tuple(-c for c in DIST)).numpy()[m:-m, m:-m, 0]
    assert np.abs(wrong - ideal[m:-m, m:-m]).mean() > 0.03


def test_pincushion_undistortion_is_cropped_to_image_content(tmp_path):
    """k1 > 0 pulls the border's samples outside the input: those pixels are cropped away, not black."""
    global DIST
    barrel, DIST = DIST, (0.2, 0.05, 0.001, -0.001)
    try:
        distorted, ideal = distorted_capture()
        scene = load_scene(write_opencv_colmap(tmp_path, distorted))
    finally:
        DIST = barrel
    grid = undistortion_grid(K, scene.frames[0].distortion, W, H)
    x0, y0, w, h = undistortion_crop(grid)
    valid = (grid[0].abs() <= 1).all(-1).numpy()
    assert valid[y0:y0 + h, x0:x0 + w].all() and not valid.all()
    # tight: one more row or column on any side would take an invalid pixel
    assert not valid[y0 - 1, x0:x0 + w].all() and not valid[y0 + h, x0:x0 + w].all()
    assert not valid[y0:y0 + h, x0 - 1].all() and not valid[y0:y0 + h, x0 + w].all()
    ds = SplatDataset(scene, "all")
    s = ds[0]
    assert (s.width, s.height) == ds.size(0) == (w, h) and s.image.shape == (h, w, 3)
    np.testing.assert_allclose(s.K.numpy(), K - [[0, 0, x0], [0, 0, y0], [0, 0, 0]], rtol=1e-6)
    # the image is the ideal pinhole view of that rectangle, up to its edges (8-bit PNG, bilinear resampling)
    err = np.abs(s.image.numpy()[..., 0] - ideal[y0:y0 + h, x0:x0 + w])
    assert err.mean() < 0.004 and err.max() < 0.03, (err.mean(), err.max())
    assert max(err[0].max(), err[-1].max(), err[:, 0].max(), err[:, -1].max()) < 0.03
    viewmats, Ks = ds.cameras()
    torch.testing.assert_close(Ks[0], s.K)


def test_undistort_matches_kornia():
    from kornia.geometry.calibration import undistort_image as kornia_undistort

    img = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(0))
    Kk = torch.tensor(K, dtype=torch.float32)
    Kk[:2, 2] -= 0.5  # kornia: pixel centres at integers
    ref = kornia_undistort(img.permute(2, 0, 1)[None], Kk, torch.tensor(DIST, dtype=torch.float32))[0]
    ours = undistort_image(img, K, DIST)
    torch.testing.assert_close(ours, ref.permute(1, 2, 0), atol=2e-5, rtol=0)
    grid = undistortion_grid(K, DIST, W, H)
    assert grid.shape == (1, H, W, 2) and grid.dtype == torch.float32
    # zero distortion: the identity map (pixel centres onto themselves)
    same = undistort_image(img, K, (0.0, 0.0, 0.0, 0.0))
    torch.testing.assert_close(same, img, atol=1e-5, rtol=0)


def _frames(n: int, w: int = 65, h: int = 49, root: Path | None = None) -> list[CameraFrame]:
    out = []
    for i in range(n):
        c2w = np.eye(4)
        c2w[:3, 3] = (np.cos(i), np.sin(i), 0.1 * i)
        out.append(CameraFrame(name=f"{i:03d}.png", image_path=(root or Path("/nonexistent")) / f"{i:03d}.png",
                               camtoworld=c2w, K=np.array([[60.0, 0, 32.5], [0, 61.0, 24.5], [0, 0, 1]]),
                               width=w, height=h))
    return out


def test_splits_every_nth_frame():
    frames = _frames(20)[::-1]  # source order is not name order
    scene = Scene(Path("."), tuple(frames))
    test = SplatDataset(scene, "test")
    assert [f.name for f in test.frames] == ["000.png", "008.png", "016.png"]
    train = SplatDataset(scene, "train")
    assert len(train) == 17 and "008.png" not in [f.name for f in train.frames]
    assert [f.name for f in train.frames] == sorted(f.name for f in train.frames)
    assert [f.name for f in SplatDataset(scene, "test", test_every=5).frames] == ["000.png", "005.png", "010.png",
                                                                                 "015.png"]
    assert len(SplatDataset(scene, "train", test_every=0)) == 20 and len(SplatDataset(scene, "test", test_every=0)) == 0
    assert len(SplatDataset(scene, "all")) == 20


def test_downscale_area_average_and_K(tmp_path):
    frames = _frames(1, w=65, h=49, root=tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (49, 65, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "000.png")
    ds = SplatDataset(Scene(tmp_path, tuple(frames)), "all", downscale=4)
    s = ds[0]
    assert s.image.shape == (12, 16, 3) and (s.width, s.height) == (16, 12) and ds.size(0) == (16, 12)
    expected = pixels[:48, :64].astype(np.float64).reshape(12, 4, 16, 4, 3).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(s.image.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(s.K.numpy(), [[15.0, 0, 32.5 / 4], [0, 61.0 / 4, 24.5 / 4], [0, 0, 1]], rtol=1e-7)
    assert s.K.dtype == torch.float32 and s.camtoworld.dtype == torch.float32
    full = SplatDataset(Scene(tmp_path, tuple(frames)), "all")[0]
    np.testing.assert_allclose(full.image.numpy(), pixels / 255.0, atol=1e-7)


def test_cameras_and_scene_scale():
    frames = _frames(10)
    ds = SplatDataset(Scene(Path("."), tuple(frames)), "all", downscale=2)
    viewmats, Ks = ds.cameras()
    assert viewmats.shape == (10, 4, 4) and Ks.shape == (10, 3, 3) and viewmats.dtype == torch.float32
    c2w = torch.from_numpy(np.stack([f.camtoworld for f in frames])).float()
    torch.testing.assert_close(viewmats @ c2w, torch.eye(4).expand(10, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(Ks[3], torch.tensor([[30.0, 0, 16.25], [0, 30.5, 12.25], [0, 0, 1]]))
    centres = np.stack([f.camtoworld[:3, 3] for f in frames])
    expected = 1.1 * np.linalg.norm(centres - centres.mean(0), axis=1).max()
    assert ds.scene_scale() == pytest.approx(expected, rel=1e-12)
    two = [CameraFrame(n, Path(n), np.eye(4), np.eye(3), 1, 1) for n in ("a", "b")]
    two[1].camtoworld[:3, 3] = (2.0, 0.0, 0.0)  # centres at x = 0 and 2: mean 1, radius 1
    assert SplatDataset(Scene(Path("."), tuple(two)), "all").scene_scale() == pytest.approx(1.1)
    assert SplatDataset(Scene(Path("."), tuple(two[:1])), "all").scene_scale() == 1.0


def test_bad_arguments():
    scene = Scene(Path("."), tuple(_frames(3)))
    with pytest.raises(DataError, match="split='val'"):
        SplatDataset(scene, "val")
    with pytest.raises(DataError, match="downscale=0"):
        SplatDataset(scene, downscale=0)
    with pytest.raises(DataError, match="downscale=2.5"):
        SplatDataset(scene, downscale=2.5)
    with pytest.raises(DataError, match="downscale=100.*would have no pixels"):
        SplatDataset(scene, "all", downscale=100)
    with pytest.raises(IndexError):
        SplatDataset(scene, "all")[3]
    with pytest.raises(DataError, match=r"image file not found"):
        SplatDataset(scene, "all")[0]
    c2w = np.eye(4)
    c2w[0, 3] = np.nan
    with pytest.raises(DataError, match=r"frame 'x': camtoworld must be a finite"):
        CameraFrame("x", Path("x"), c2w, np.eye(3), 4, 4)
    with pytest.raises(DataError, match=r"frame 'x': K must be"):
        CameraFrame("x", Path("x"), np.eye(4), np.zeros((3, 3)), 4, 4)
    with pytest.raises(DataError, match="no frames"):
        Scene(Path("."), ())
    with pytest.raises(DataError, match="points must be"):
        Scene(Path("."), tuple(_frames(1)), points=np.zeros((4, 2)))


# ------------------------------------------------------------------------------------------------
# LLFF
# ------------------------------------------------------------------------------------------------
def _llff(root: Path, n: int = 2, img_wh=(40, 30), file_hw=(60, 80), focal=100.0) -> np.ndarray:
    rows = []
    for i in range(n):
        # OpenCV camera -> world we expect back: a yaw of 30 deg * i about world z, centre (i, 2, 3)
        a = np.radians(30 * i)
        right, down = np.array([np.cos(a), np.sin(a), 0]), np.array([0, 0, -1.0])
        fwd = np.array([-np.sin(a), np.cos(a), 0])
        # LLFF columns: down, right, backward, centre, (h, w, focal)
        pose = np.stack([down, right, -fwd, [i, 2.0, 3.0], [file_hw[0], file_hw[1], focal]], axis=1)
        rows.append(np.concatenate([pose.reshape(-1), [0.5 + i, 10.0 + i]]))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.zeros((img_wh[1], img_wh[0], 3), np.uint8)).save(root / "images" / f"IMG_{i:02d}.JPG")
    arr = np.asarray(rows)
    np.save(root / "poses_bounds.npy", arr)
    return arr


def test_llff_hand_made(tmp_path):
    _llff(tmp_path)
    scene = load_scene(tmp_path)
    assert scene.format == "llff" and [f.name for f in scene.frames] == ["IMG_00.JPG", "IMG_01.JPG"]
    np.testing.assert_allclose(scene.bounds, [[0.5, 10.0], [1.5, 11.0]])
    f = scene.frames[1]
    a = np.radians(30)
    np.testing.assert_allclose(f.camtoworld[:3, 0], [np.cos(a), np.sin(a), 0], atol=1e-15)  # right
    np.testing.assert_allclose(f.camtoworld[:3, 1], [0, 0, -1], atol=1e-15)  # down
    np.testing.assert_allclose(f.camtoworld[:3, 2], [-np.sin(a), np.cos(a), 0], atol=1e-15)  # forward
    np.testing.assert_allclose(f.camtoworld[:3, 3], [1, 2, 3])
    assert np.linalg.det(f.camtoworld[:3, :3]) == pytest.approx(1.0)
    # the images are half the size stored in the file (80x60): focal halved, principal point centred
    np.testing.assert_allclose(f.K, [[50, 0, 20], [0, 50, 15], [0, 0, 1]])
    assert (f.width, f.height) == (40, 30)


def test_llff_errors(tmp_path):
    arr = _llff(tmp_path, n=2)
    (tmp_path / "images" / "IMG_01.JPG").unlink()
    with pytest.raises(DataError, match=r"2 poses but 1 images"):
        load_llff(tmp_path)
    _llff(tmp_path, n=2, img_wh=(40, 40))
    with pytest.raises(DataError, match=r"IMG_00\.JPG: image is 40x40 px .* says 80x60"):
        load_llff(tmp_path)
    _llff(tmp_path, n=2)
    bad = arr.copy()
    bad[1, 3] = np.nan
    np.save(tmp_path / "poses_bounds.npy", bad)
    with pytest.raises(DataError, match=r"poses_bounds\.npy: contains NaN"):
        load_llff(tmp_path)
    np.save(tmp_path / "poses_bounds.npy", arr[:, :15])
    with pytest.raises(DataError, match=r"expected an \[N, 17\] array"):
        load_llff(tmp_path)


def test_llff_published_layout_reads_the_chosen_image_folder(tmp_path):
    """LLFF scenes as published: `images_4/` and `images_8/` beside `images/`; `images=` picks one,
    the intrinsics follow its size, and without `images/` the only `images*` folder is taken."""
    _llff(tmp_path, img_wh=(40, 30))                     # images/ at half the stored 80x60
    for name, (w, h) in (("images_4", (20, 15)), ("images_8", (10, 7))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name / f"IMG_{i:02d}.JPG")
    assert load_scene(tmp_path).frames[0].width == 40
    f = load_scene(tmp_path, images="images_4").frames[1]
    assert (f.width, f.height) == (20, 15)
    np.testing.assert_allclose(f.K, [[25, 0, 10], [0, 25, 7.5], [0, 0, 1]])
    with pytest.raises(DataError, match=r"images_2: image folder not found; image folders in .*: images, images_4, images_8"):
        load_scene(tmp_path, images="images_2")
    shutil.rmtree(tmp_path / "images")
    shutil.rmtree(tmp_path / "images_8")
    assert load_scene(tmp_path).frames[0].width == 20  # the only images* folder
