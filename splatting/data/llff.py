"""LLFF datasets (`poses_bounds.npy`, as in the NeRF "nerf_llff_data" scenes).

Layout::

    root/poses_bounds.npy      float [N, 17]: per image a row-major 3x5 matrix, then (near, far)
    root/images/               the N images; the i-th file in sorted order belongs to row i

Each 3x5 matrix is `[c0 c1 c2 | centre | (h, w, focal)]`: columns 0..2 are the camera axes in LLFF's
(down, right, backward) order, column 3 the camera centre (world), column 4 the height, width and
focal length (pixels) of the full-size images. In OpenCV axes: x = right = c1, y = down = c0,
z = forward = -c2. When the image files are smaller (e.g. `images_4/`), the focal length is scaled
by the image size ratio; the principal point is the image centre.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from perception3d.errors import DataError
from splatting.data.scene import IMAGE_EXTENSIONS, CameraFrame, Scene, check_finite, finish_scene, image_size

__all__ = ["llff_to_camtoworld", "load_llff"]


def llff_to_camtoworld(pose: np.ndarray) -> np.ndarray:
    """One LLFF `[3, 4]` (or `[3, 5]`) pose -> `float64 [4, 4]` OpenCV camera -> world."""
    pose = np.asarray(pose, np.float64)
    c2w = np.eye(4)
    c2w[:3, 0] = pose[:, 1]
    c2w[:3, 1] = pose[:, 0]
    c2w[:3, 2] = -pose[:, 2]
    c2w[:3, 3] = pose[:, 3]
    return c2w


def load_llff(root: str | Path, images_dir: str | None = None) -> Scene:
    """Load an LLFF dataset as a `Scene` (with `bounds [N, 2]` near/far per frame).

    Args:
        root: dataset folder holding `poses_bounds.npy`.
        images_dir: image folder relative to `root` (e.g. "images_4" for the 4x smaller copies);
            None: `images/`, or the only `images*` folder when there is no `images/`.

    Raises:
        DataError: missing/malformed `poses_bounds.npy` (not `[N, 17]`, NaN, a pose that is not a
            rotation, bounds other than 0 <= near < far), a different number of images than poses,
            images whose aspect ratio does not match the stored `h, w`.
    """
    root = Path(root)
    path = root / "poses_bounds.npy"
    if not path.is_file():
        raise DataError(f"{root}: poses_bounds.npy not found (not an LLFF dataset)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 17 or arr.shape[0] == 0:
        raise DataError(f"{path}: expected an [N, 17] array (3x5 pose + near, far per image); got shape {arr.shape}")
    arr = check_finite(arr, str(path))
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("images"))
    if images_dir is None:
        images_dir = "images" if "images" in folders or len(folders) != 1 else folders[0]
    image_root = root / images_dir
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found; image folders in {root}: "
                        f"{', '.join(folders) or 'none'} (choose one with data.images, e.g. data.images=images_8)")
    files = sorted(p for p in image_root.iterdir() if p.is_file() and p.suffix in IMAGE_EXTENSIONS)
    n = arr.shape[0]
    if len(files) != n:
        raise DataError(f"{path}: {n} poses but {len(files)} images in {image_root} "
                        "(the i-th sorted image belongs to the i-th row)")
    poses = arr[:, :15].reshape(n, 3, 5)
    bounds = arr[:, 15:17]
    bad = ~((bounds[:, 0] >= 0) & (bounds[:, 1] > bounds[:, 0]))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: row {i}: depth bounds (near, far) = ({bounds[i, 0]:g}, {bounds[i, 1]:g}); "
                        f"expected 0 <= near < far ({int(bad.sum())} of {n} rows are not)")
    frames = []
    for i, (pose, file) in enumerate(zip(poses, files)):
        h, w, focal = pose[:, 4]
        if h <= 0 or w <= 0 or focal <= 0:
            raise DataError(f"{path}: row {i}: (h, w, focal) must be positive; got {(h, w, focal)}")
        iw, ih = image_size(file)
        sx, sy = iw / w, ih / h
        if abs(sx - sy) > 0.01 * max(sx, sy) + 1.0 / min(iw, ih):
            raise DataError(f"{file}: image is {iw}x{ih} px but row {i} of {path.name} says {w:g}x{h:g}: "
                            "different aspect ratio")
        K = np.array([[focal * sx, 0.0, 0.5 * iw], [0.0, focal * sy, 0.5 * ih], [0.0, 0.0, 1.0]])
        try:
            frames.append(CameraFrame(name=file.name, image_path=file.resolve(), camtoworld=llff_to_camtoworld(pose),
                                      K=K, width=iw, height=ih, distortion=None))
        except DataError as e:
            raise DataError(f"{path}: row {i} (image {file.name}): {e}") from None
    return finish_scene(path, root, frames, [], bounds=bounds, fmt="llff")
