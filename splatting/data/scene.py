"""The common multi-view scene representation, the format auto-detection and the training dataset.

Every reader (`colmap`, `transforms_json`, `llff`) returns a `Scene`: a tuple of `CameraFrame`s
(camera -> world pose, pinhole intrinsics, optional OpenCV distortion, the image file) plus an
optional SfM point cloud. `SplatDataset` turns a scene into decoded, undistorted, downscaled images
for a Gaussian-splatting trainer.

Conventions (the toolkit's, see `perception3d/design.md`):

* camera axes: OpenCV (x right, y down, z forward); `camtoworld` maps camera to world coordinates;
  `viewmats` (world -> camera) are its inverse. Readers convert OpenGL/Blender (x right, y up,
  z backward) and LLFF (down, right, backward) poses on load.
* pixels: pixel `(u, v)` covers `[u, u + 1) x [v, v + 1)`, its centre is at `(u + 0.5, v + 0.5)`
  (the COLMAP and gsplat convention). Hence downscaling by an integer factor `f` with area averaging
  scales `fx, fy, cx, cy` by exactly `1 / f`.
* distortion: OpenCV `(k1, k2, p1, p2)`, or None when the camera has none (all-zero coefficients
  are stored as None).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from perception3d.errors import DataError

__all__ = [
    "CameraFrame",
    "Scene",
    "SplatSample",
    "SplatDataset",
    "MissingImagesWarning",
    "load_scene",
    "read_image",
    "undistort_image",
    "undistortion_grid",
    "undistortion_crop",
    "pose_problem",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
_SPLITS = ("train", "test", "all")


class MissingImagesWarning(UserWarning):
    """Some frames listed by a dataset have no image file; they were dropped from the scene."""


@dataclass(frozen=True, eq=False)
class CameraFrame:
    """One calibrated view.

    Attributes:
        name: the image's name as written in the source (e.g. "images/0001.jpg" in a
            transforms.json, "0001.jpg" in a COLMAP model); frames are sorted by it.
        image_path: resolved path of the image file.
        camtoworld: `float64 [4, 4]` camera -> world, OpenCV camera axes, world units.
        K: `float64 [3, 3]` pinhole intrinsics (pixels) at the full image resolution.
        width: full-resolution image width, pixels.
        height: full-resolution image height, pixels.
        distortion: OpenCV `(k1, k2, p1, p2)`, or None for an undistorted pinhole camera.
        split: the split the source assigns to this frame ("train", "val", "test"), or None when it
            assigns none (then `SplatDataset` holds out every `test_every`-th frame).
    """

    name: str
    image_path: Path
    camtoworld: np.ndarray
    K: np.ndarray
    width: int
    height: int
    distortion: tuple[float, float, float, float] | None = None
    split: str | None = None

    def __post_init__(self):
        c2w = np.asarray(self.camtoworld, np.float64)
        K = np.asarray(self.K, np.float64)
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise DataError(f"frame {self.name!r}: camtoworld must be a finite [4, 4] matrix; "
                            f"got shape {c2w.shape} (NaN/inf: {not np.isfinite(c2w).all()})")
        problem = pose_problem(c2w)
        if problem:
            raise DataError(f"frame {self.name!r}: camtoworld {problem}")
        if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise DataError(f"frame {self.name!r}: K must be a finite [3, 3] matrix with fx, fy > 0; got {K.tolist()}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise DataError(f"frame {self.name!r}: image size must be positive; got {self.width}x{self.height}")
        dist = self.distortion
        if dist is not None:
            dist = tuple(float(v) for v in dist)
            if len(dist) != 4 or not np.isfinite(dist).all():
                raise DataError(f"frame {self.name!r}: distortion must be 4 finite numbers (k1, k2, p1, p2); "
                                f"got {self.distortion}")
            if not any(dist):
                dist = None
        object.__setattr__(self, "camtoworld", c2w)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "distortion", dist)
        object.__setattr__(self, "image_path", Path(self.image_path))

    @property
    def viewmat(self) -> np.ndarray:
        """`float64 [4, 4]` world -> camera (the inverse of `camtoworld`)."""
        return np.linalg.inv(self.camtoworld)


@dataclass(frozen=True, eq=False)
class Scene:
    """A calibrated multi-view capture.

    Attributes:
        root: the dataset folder.
        frames: the frames whose image file exists, in the source's order.
        points: `float32 [P, 3]` world points (SfM points), or None.
        points_rgb: `uint8 [P, 3]` colours of `points`, or None.
        missing_images: names of the frames the source lists but whose image file does not exist
            (they are not in `frames`).
        bounds: `float64 [N, 2]` per-frame (near, far) depth bounds aligned with `frames` (LLFF), or None.
        format: "colmap", "transforms" or "llff" (the reader that made it).
    """

    root: Path
    frames: tuple[CameraFrame, ...]
    points: np.ndarray | None = None
    points_rgb: np.ndarray | None = None
    missing_images: tuple[str, ...] = ()
    bounds: np.ndarray | None = None
    format: str = ""

    def __post_init__(self):
        if len(self.frames) == 0:
            raise DataError(f"{self.root}: the scene has no frames")
        if self.points is not None:
            pts = np.asarray(self.points, np.float32)
            if pts.ndim != 2 or pts.shape[1] != 3:
                raise DataError(f"{self.root}: points must be [P, 3]; got shape {pts.shape}")
            if not np.isfinite(pts).all():
                raise DataError(f"{self.root}: points contain NaN or inf")
            object.__setattr__(self, "points", pts)
            if self.points_rgb is not None:
                rgb = np.asarray(self.points_rgb)
                if rgb.shape != pts.shape:
                    raise DataError(f"{self.root}: points_rgb must be [P, 3] like points {pts.shape}; got {rgb.shape}")
                object.__setattr__(self, "points_rgb", rgb.astype(np.uint8))
        elif self.points_rgb is not None:
            raise DataError(f"{self.root}: points_rgb given without points")
        if self.bounds is not None:
            b = np.asarray(self.bounds, np.float64)
            if b.shape != (len(self.frames), 2):
                raise DataError(f"{self.root}: bounds must be [N, 2] with N = {len(self.frames)} frames; got {b.shape}")
            object.__setattr__(self, "bounds", b)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "frames", tuple(self.frames))
        object.__setattr__(self, "missing_images", tuple(self.missing_images))


def finish_scene(source: Path, root: Path, frames: Sequence[CameraFrame], missing: Sequence[str], *,
                 points=None, points_rgb=None, bounds=None, fmt: str = "", image_dir: Path | None = None) -> Scene:
    """Build a `Scene` from a reader's frames, reporting the listed frames whose image is missing.

    Args:
        source: the file the frames were listed in (named in messages).
        root: the dataset folder.
        frames: frames whose image exists.
        missing: names of listed frames whose image does not exist.
        image_dir: where the images were looked for (named in the error), default `root`.

    Raises:
        DataError: the source lists no frame, or none of the listed images exists.
    """
    total = len(frames) + len(missing)
    if total == 0:
        raise DataError(f"{source}: lists no frames")
    if not frames:
        raise DataError(f"{source}: none of the {total} listed images exists "
                        f"(first listed: {missing[0]!r}, looked for under {image_dir or root})")
    if missing:
        first = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        warnings.warn(f"{source}: {len(missing)} of {total} listed images are missing and were dropped: {first}",
                      MissingImagesWarning, stacklevel=3)
    return Scene(root=root, frames=tuple(frames), points=points, points_rgb=points_rgb,
                 missing_images=tuple(missing), bounds=bounds, format=fmt)


def check_finite(values, what: str) -> np.ndarray:
    """`values` as a float64 array, or DataError naming `what` when it is not numeric or not finite."""
    try:
        arr = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what}: expected numbers; got {values!r}"[:300]) from None
    if not np.isfinite(arr).all():
        raise DataError(f"{what}: contains NaN or inf")
    return arr


#: tolerance of `pose_problem` on `R^T R - I` (real captures: ~1e-6; float32 poses: ~1e-7)
POSE_ROTATION_TOLERANCE = 1e-3


def pose_problem(c2w: np.ndarray) -> str | None:
    """What makes a finite `[4, 4]` camera -> world matrix no rigid pose, or None.

    A pose must be `[[R, t], [0, 0, 0, 1]]` with `R` a rotation (orthonormal, det +1): a last row
    other than `[0, 0, 0, 1]` (a projective matrix) or a scaled, sheared, mirrored or singular `R`
    would otherwise be rendered silently wrong (or fail to invert deep inside training).
    """
    c2w = np.asarray(c2w, np.float64)
    last = c2w[3]
    if np.abs(last - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
        return f"has last row {[float(v) for v in last]}; expected [0, 0, 0, 1] (a rigid camera -> world pose)"
    R = c2w[:3, :3]
    dev = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if dev > POSE_ROTATION_TOLERANCE or det <= 0:
        kind = ("singular" if abs(det) < 1e-9 else "mirrored (det < 0)" if det < 0
                else "scaled or sheared")
        return (f"has a rotation part that is not a rotation: {kind} (max |R^T R - I| = {dev:.3g}, det = {det:.3g}); "
                "expected an orthonormal 3x3 rotation with det +1")
    return None


def image_size(path: Path) -> tuple[int, int]:
    """`(width, height)` of an image file, reading only its header (PIL)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def check_image_size(path: Path, width: int, height: int, where: str) -> None:
    """DataError unless the image file's header says `width x height` (the size `where` states)."""
    iw, ih = image_size(path)
    if (iw, ih) != (int(width), int(height)):
        raise DataError(f"{path}: image is {iw}x{ih} px but {where} says {int(width)}x{int(height)}")


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------
def load_scene(path: str | Path, format: str | None = None, images: str | None = None) -> Scene:
    """Load a multi-view dataset, detecting its format.

    Looked for, in this order (a folder may hold several; COLMAP wins because it carries points):

    * COLMAP: `path/sparse/0/` or `path/sparse/` holding `cameras.{bin,txt}` (images in `path/images/`);
    * transforms.json: `path` is a `.json` file, or a folder with `transforms.json` or
      `transforms_{train,val,test}.json` (Blender, instant-ngp, nerfstudio);
    * LLFF: `path/poses_bounds.npy` (images in `path/images/`).

    Args:
        path: dataset folder (or a transforms json file).
        format: force "colmap", "transforms" or "llff" instead of detecting.
        images: the image folder under `path` for COLMAP and LLFF (e.g. "images_8"); None: their
            default (`images/`; for LLFF without one, its only `images*` folder).

    Raises:
        DataError: missing path, or no known layout (the message lists what was looked for).
    """
    from splatting.data.colmap import find_colmap_model, load_colmap
    from splatting.data.llff import load_llff
    from splatting.data.transforms_json import find_transforms_files, load_transforms

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset path does not exist")

    def transforms(p):
        if images is not None:
            raise DataError(f"{path}: a transforms.json scene names its own image files; the image folder "
                            f"{images!r} applies to COLMAP and LLFF scenes only")
        return load_transforms(p)

    def colmap(p):
        return load_colmap(p, images_dir=images or "images")

    def llff(p):
        return load_llff(p, images_dir=images)

    if format is not None:
        loaders = {"colmap": colmap, "transforms": transforms, "llff": llff}
        if format not in loaders:
            raise DataError(f"format={format!r}: expected one of {sorted(loaders)}")
        return loaders[format](path)
    if path.is_file():
        if path.suffix == ".json":
            return transforms(path)
        if path.name == "poses_bounds.npy":
            return llff(path.parent)
        raise DataError(f"{path}: expected a dataset folder, a transforms .json file or poses_bounds.npy")
    if find_colmap_model(path) is not None:
        return colmap(path)
    if find_transforms_files(path):
        return transforms(path)
    if (path / "poses_bounds.npy").is_file():
        return llff(path)
    raise DataError(f"{path}: unknown dataset layout; looked for sparse/0/cameras.{{bin,txt}} or "
                    "sparse/cameras.{bin,txt} (COLMAP), transforms.json or transforms_{train,val,test}.json "
                    "(Blender / instant-ngp / nerfstudio), poses_bounds.npy (LLFF)")


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def read_image(path: str | Path, background_rgb: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Decode an image file to `float32 [H, W, 3]` RGB in [0, 1].

    Grey images are repeated to 3 channels; 16-bit greys are scaled by 1/65535; images with an
    alpha channel (RGBA, LA, palette with transparency) are composited over `background_rgb`
    (straight alpha: `rgb * a + background * (1 - a)`; white by default, as 3DGS does for Blender).

    Raises:
        DataError: missing or undecodable file, naming it.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64) / (65535.0 if mode.startswith("I;16") else 1.0)
                arr = np.repeat(arr[..., None], 3, axis=2)
            elif mode == "F":
                arr = np.repeat(np.asarray(im, np.float64)[..., None], 3, axis=2)
            else:
                has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
                arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), np.float64) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.shape[-1] == 4:
        a = arr[..., 3:4]
        arr = arr[..., :3] * a + np.asarray(background_rgb, np.float64) * (1.0 - a)
    return arr.astype(np.float32)


def undistortion_grid(K: np.ndarray | torch.Tensor, distortion: Sequence[float], width: int,
                      height: int) -> torch.Tensor:
    """The sampling grid that undistorts a `width x height` image of a camera (for `undistort_image`).

    Output pixel `p` (centre `(u + 0.5, v + 0.5)`) samples the distorted input at
    `K distort(K^-1 p)`, with OpenCV's model: for normalised `(x, y)` and `r^2 = x^2 + y^2`,
    `x_d = x (1 + k1 r^2 + k2 r^4) + 2 p1 x y + p2 (r^2 + 2 x^2)`,
    `y_d = y (1 + k1 r^2 + k2 r^4) + p1 (r^2 + 2 y^2) + 2 p2 x y`.
    This is the map `kornia.geometry.calibration.undistort_image` builds (the tests check the two
    agree), computed here in float64 without importing kornia (about 5 s to import, and 20x slower
    to build the map for a 1920x1080 image on 2 cores).

    Returns:
        `float32 [1, H, W, 2]` normalised `(x, y)` for `grid_sample(..., align_corners=True)`.
    """
    K = np.asarray(K, np.float64)
    k1, k2, p1, p2 = (float(v) for v in distortion)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x = ((torch.arange(width, dtype=torch.float64) + 0.5 - cx) / fx)[None, :]
    y = ((torch.arange(height, dtype=torch.float64) + 0.5 - cy) / fy)[:, None]
    r2 = x * x + y * y
    radial = 1.0 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    # input pixel index i has its centre at i + 0.5; grid_sample(align_corners=True) maps i to -1 + 2 i / (n - 1)
    gx = (fx * xd + cx - 0.5) * (2.0 / max(width - 1, 1)) - 1.0
    gy = (fy * yd + cy - 0.5) * (2.0 / max(height - 1, 1)) - 1.0
    return torch.stack([gx, gy], -1).to(torch.float32)[None]


def undistortion_crop(grid: torch.Tensor) -> tuple[int, int, int, int]:
    """The pixel rectangle of an undistorted image that holds only real image content.

    Output pixels whose sample point (``grid``, from `undistortion_grid`) falls outside the input's
    pixel-centre range get black, or a blend with black, from `undistort_image`; a trainer would
    learn those strips as scene content (dark floaters in front of the cameras) and an evaluation
    would count them as errors no renderer can avoid. The rectangle is found by shrinking the image
    one row or column at a time, always on the side with the most invalid pixels, until none is
    left (for the fox capture at 1080x1920: a few pixels per side).

    Returns:
        ``(x0, y0, width, height)``.

    Raises:
        DataError: no pixel of the undistorted image maps inside the input.
    """
    valid = (grid[0].abs() <= 1.0).all(-1)
    top, bottom, left, right = 0, valid.shape[0], 0, valid.shape[1]
    while top < bottom and left < right:
        sub = valid[top:bottom, left:right]
        if bool(sub.all()):
            return left, top, right - left, bottom - top
        bad = [int((~sub[0]).sum()), int((~sub[-1]).sum()), int((~sub[:, 0]).sum()), int((~sub[:, -1]).sum())]
        side = int(np.argmax(bad))
        if side == 0:
            top += 1
        elif side == 1:
            bottom -= 1
        elif side == 2:
            left += 1
        else:
            right -= 1
    raise DataError("undistortion maps no output pixel inside the input image (distortion coefficients too large?)")


def undistort_image(image: torch.Tensor, K: np.ndarray | torch.Tensor, distortion: Sequence[float],
                    grid: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a distorted image to the ideal pinhole camera with the same `K`.

    Output pixel `p` takes the input at `distort(p)` (bilinear, like kornia's `undistort_image`, which
    this matches up to float rounding); points that map outside the input are black (0).

    Args:
        image: `float [H, W, C]`.
        K: `[3, 3]` intrinsics (centre of pixel `u` at `u + 0.5`).
        distortion: OpenCV `(k1, k2, p1, p2)`.
        grid: a precomputed `undistortion_grid(K, distortion, W, H)` (built here when None).

    Returns:
        `float [H, W, C]` undistorted image, same dtype.
    """
    H, W = image.shape[:2]
    if grid is None:
        grid = undistortion_grid(K, distortion, W, H)
    x = image.permute(2, 0, 1)[None]
    out = torch.nn.functional.grid_sample(x, grid.to(image.dtype), mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out[0].permute(1, 2, 0).contiguous()


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SplatSample:
    """One training view.

    Attributes:
        image: `float32 [H, W, 3]` RGB in [0, 1] (undistorted, downscaled).
        camtoworld: `float32 [4, 4]` camera -> world (OpenCV axes).
        K: `float32 [3, 3]` intrinsics at the downscaled resolution.
        width: W, pixels.
        height: H, pixels.
        name: the frame's name.
    """

    image: torch.Tensor
    camtoworld: torch.Tensor
    K: torch.Tensor
    width: int
    height: int
    name: str


class SplatDataset:
    """Images and cameras of one split of a `Scene`, ready for a splatting trainer.

    Frames are sorted by name. The held-out ("test") split is every `test_every`-th frame of that
    list (indices 0, 8, 16, ... for the default 8), the rest is "train"; `test_every=0` puts every
    frame in "train". When the scene assigns splits itself (Blender's `transforms_{train,val,test}.json`)
    and `use_scene_splits` is true, those are used instead: "train" = the train files' frames,
    "test" = the test files' frames (the val files' when there is no test file).

    Sparse views (`train_views=K`): the "train" split keeps only K of its frames, those at positions
    `round(linspace(0, n - 1, K))` (Python's round: halves to even) of its n frames in name order
    (the first, the last and evenly spaced between: the rule of RegNeRF / FreeNeRF / CoherentGS on
    LLFF); the held-out split is unchanged, so the views tested are never trained on.

    Each image is decoded (alpha composited over `background_rgb`), undistorted at full resolution
    when the camera has distortion (to the pinhole camera with the same `K`) and cropped to the
    rectangle where every pixel has real image content (`undistortion_crop`; the principal point
    shifts by the crop's corner, and `size` / `cameras` / samples report the cropped camera),
    downscaled by `downscale` with area averaging to `floor(W / f) x floor(H / f)` (the right/bottom remainder is cropped, so
    `fx, fy, cx, cy` scale by exactly `1 / f`), and cached in memory as float32.

    Args:
        scene: the scene.
        split: "train", "test" or "all".
        downscale: integer factor >= 1.
        test_every: hold out every n-th frame (0: none).
        use_scene_splits: use the scene's own splits when every frame has one.
        train_views: keep only this many training views (the sparse-view rule above); None: all.
        background_rgb: background for images with an alpha channel.
        cache: keep decoded images in memory.
    """

    def __init__(self, scene: Scene, split: str = "train", downscale: int = 1, test_every: int = 8,
                 use_scene_splits: bool = True, background_rgb: Sequence[float] = (1.0, 1.0, 1.0),
                 cache: bool = True, train_views: int | None = None):
        if split not in _SPLITS:
            raise DataError(f"split={split!r}: expected one of {_SPLITS}")
        if isinstance(downscale, bool) or not isinstance(downscale, numbers.Integral) or downscale < 1:
            raise DataError(f"downscale={downscale!r}: expected an integer >= 1")
        if isinstance(test_every, bool) or not isinstance(test_every, numbers.Integral) or test_every < 0:
            raise DataError(f"test_every={test_every!r}: expected an integer >= 0")
        self.scene = scene
        self.split = split
        self.downscale = int(downscale)
        self.test_every = int(test_every)
        self.background_rgb = tuple(float(v) for v in background_rgb)
        self.cache = cache
        ordered = sorted(scene.frames, key=lambda f: f.name)
        splits = [f.split for f in ordered]
        if split == "all":
            chosen = ordered
        elif use_scene_splits and all(s is not None for s in splits):
            test_name = "test" if "test" in splits else "val"
            chosen = [f for f in ordered if f.split == ("train" if split == "train" else test_name)]
        else:
            is_test = [self.test_every > 0 and i % self.test_every == 0 for i in range(len(ordered))]
            chosen = [f for f, t in zip(ordered, is_test) if t == (split == "test")]
        if train_views is not None and split == "train":
            if isinstance(train_views, bool) or not isinstance(train_views, numbers.Integral) or train_views < 1:
                raise DataError(f"train_views={train_views!r}: expected an integer >= 1 or None")
            if train_views > len(chosen):
                raise DataError(f"train_views={train_views}: the scene has only {len(chosen)} training views "
                                f"({len(ordered)} frames, test_every={self.test_every})")
            chosen = [chosen[int(round(i))] for i in np.linspace(0, len(chosen) - 1, int(train_views))]
        self.frames: tuple[CameraFrame, ...] = tuple(chosen)
        self._cache: dict[int, torch.Tensor] = {}
        self._grids: dict[tuple, tuple] = {}  # undistortion maps and crops, one per camera
        for f in self.frames:
            if f.width // self.downscale == 0 or f.height // self.downscale == 0:
                raise DataError(f"downscale={self.downscale}: frame {f.name!r} ({f.width}x{f.height}) "
                                "would have no pixels")

    def __len__(self) -> int:
        return len(self.frames)

    def _undistortion(self, frame: CameraFrame) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The undistortion grid of a distorted frame's camera and its valid crop (cached per camera)."""
        key = (frame.K.tobytes(), frame.distortion, frame.width, frame.height)
        if key not in self._grids:
            grid = undistortion_grid(frame.K, frame.distortion, frame.width, frame.height)
            try:
                self._grids[key] = grid, undistortion_crop(grid)
            except DataError as e:
                raise DataError(f"frame {frame.name!r} ({frame.image_path}), distortion {frame.distortion}: "
                                f"{e}") from None
        return self._grids[key]

    def _camera(self, frame: CameraFrame) -> tuple[np.ndarray, int, int]:
        """`(K, width, height)` of the full-resolution image the dataset serves (after the undistortion crop)."""
        if frame.distortion is None:
            return frame.K, frame.width, frame.height
        x0, y0, w, h = self._undistortion(frame)[1]
        K = frame.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return K, w, h

    def _K(self, frame: CameraFrame) -> np.ndarray:
        K = self._camera(frame)[0].copy()
        K[:2] /= self.downscale
        return K

    def size(self, i: int) -> tuple[int, int]:
        """`(width, height)` of sample `i` at the downscaled resolution."""
        _, w, h = self._camera(self.frames[i])
        return w // self.downscale, h // self.downscale

    def _load(self, frame: CameraFrame) -> torch.Tensor:
        arr = read_image(frame.image_path, self.background_rgb)
        if arr.shape[:2] != (frame.height, frame.width):
            raise DataError(f"{frame.image_path}: image is {arr.shape[1]}x{arr.shape[0]} px but its camera "
                            f"({self.scene.format or 'dataset'} file) says {frame.width}x{frame.height}")
        img = torch.from_numpy(arr)
        if frame.distortion is not None:
            grid, (x0, y0, w, h) = self._undistortion(frame)
            img = undistort_image(img, frame.K, frame.distortion, grid=grid)[y0:y0 + h, x0:x0 + w].contiguous()
        f = self.downscale
        if f > 1:
            H, W = (img.shape[0] // f) * f, (img.shape[1] // f) * f
            x = img[:H, :W].permute(2, 0, 1)[None]
            img = torch.nn.functional.avg_pool2d(x, kernel_size=f)[0].permute(1, 2, 0).contiguous()
        return img

    def preload(self) -> "SplatDataset":
        """Decode (undistort, downscale) every image of the split now, into the cache.

        A trainer calls this before its first step, so that an image that cannot be decoded (a
        truncated or corrupt PNG / JPEG whose header still reads) is a `DataError` naming the file
        before any work, not a failure in the middle of a run. Returns `self`.
        """
        for i in range(len(self)):
            img = self._load(self.frames[i])
            if self.cache:
                self._cache[i] = img
        return self

    def __getitem__(self, i: int) -> SplatSample:
        n = len(self.frames)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a {self.split} split of {n} frames")
        i %= n
        frame = self.frames[i]
        img = self._cache.get(i)
        if img is None:
            img = self._load(frame)
            if self.cache:
                self._cache[i] = img
        return SplatSample(image=img, camtoworld=torch.from_numpy(frame.camtoworld.astype(np.float32)),
                           K=torch.from_numpy(self._K(frame).astype(np.float32)),
                           width=int(img.shape[1]), height=int(img.shape[0]), name=frame.name)

    def cameras(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked cameras of the split: `(viewmats float32 [N, 4, 4] world -> camera, Ks float32 [N, 3, 3])`.

        `Ks` are at the downscaled resolution (`size(i)` gives each image's size).
        """
        if not self.frames:
            return torch.zeros(0, 4, 4), torch.zeros(0, 3, 3)
        viewmats = np.stack([np.linalg.inv(f.camtoworld) for f in self.frames]).astype(np.float32)
        Ks = np.stack([self._K(f) for f in self.frames]).astype(np.float32)
        return torch.from_numpy(viewmats), torch.from_numpy(Ks)

    def scene_scale(self) -> float:
        """The 3DGS "scene extent": 1.1 x the largest distance of this split's camera centres from their mean.

        Returns 1.0 when that distance is zero (a single camera).
        """
        if not self.frames:
            raise DataError(f"scene_scale: the {self.split} split is empty")
        centres = np.stack([f.camtoworld[:3, 3] for f in self.frames])
        radius = float(np.linalg.norm(centres - centres.mean(0), axis=1).max())
        return 1.1 * radius if radius > 0 and math.isfinite(radius) else 1.0
