"""COLMAP sparse models (binary and text), read and written from the documented format.

Format reference: https://colmap.github.io/format.html. Layout read by `load_colmap`::

    root/images/<name>                        the images (names as stored in images.{bin,txt})
    root/sparse/0/cameras.{bin,txt}           intrinsics, one entry per camera
    root/sparse/0/images.{bin,txt}            per image: world -> camera quaternion (qw, qx, qy, qz),
                                              translation (tx, ty, tz), camera id, name
    root/sparse/0/points3D.{bin,txt}          SfM points: xyz, rgb (optional)

(`root/sparse/` directly is accepted too; when both binary and text files are there the binary
model is read, as COLMAP does.) COLMAP cameras already use OpenCV axes and the half-pixel centre
convention of `splatting.data.scene`, so poses and intrinsics are taken over as they are:
`camtoworld = [R^T | -R^T t]` with `R` from the quaternion.

Supported camera models (anything else is a `DataError` naming the model):
SIMPLE_PINHOLE (f, cx, cy), PINHOLE (fx, fy, cx, cy), SIMPLE_RADIAL (f, cx, cy, k),
RADIAL (f, cx, cy, k1, k2), OPENCV (fx, fy, cx, cy, k1, k2, p1, p2).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_write_bytes, atomic_write_text
from splatting.data.scene import CameraFrame, Scene, check_finite, check_image_size, finish_scene

__all__ = [
    "CAMERA_MODELS",
    "SUPPORTED_MODELS",
    "ColmapCamera",
    "ColmapImage",
    "ColmapModel",
    "find_colmap_model",
    "read_colmap_model",
    "load_colmap",
    "write_colmap_text",
    "write_colmap_binary",
    "qvec_to_rotmat",
    "rotmat_to_qvec",
]

# model id -> (name, number of parameters), as in COLMAP's src/colmap/sensor/models.h
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_MODEL_IDS = {name: mid for mid, (name, _) in CAMERA_MODELS.items()}
SUPPORTED_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")


@dataclass(frozen=True)
class ColmapCamera:
    """One COLMAP camera: `model` name, image size (pixels) and the model's parameters."""

    camera_id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]

    def intrinsics(self, source: Path | str = "") -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
        """`(K float64 [3, 3], (k1, k2, p1, p2) or None)`; DataError for an unsupported model."""
        p = self.params
        if self.model == "SIMPLE_PINHOLE":
            fx = fy = p[0]
            cx, cy, dist = p[1], p[2], None
        elif self.model == "PINHOLE":
            fx, fy, cx, cy = p[:4]
            dist = None
        elif self.model == "SIMPLE_RADIAL":
            fx = fy = p[0]
            cx, cy, dist = p[1], p[2], (p[3], 0.0, 0.0, 0.0)
        elif self.model == "RADIAL":
            fx = fy = p[0]
            cx, cy, dist = p[1], p[2], (p[3], p[4], 0.0, 0.0)
        elif self.model == "OPENCV":
            fx, fy, cx, cy = p[:4]
            dist = tuple(p[4:8])
        else:
            raise DataError(f"{source}: camera {self.camera_id} uses the {self.model} camera model; "
                            f"supported models are {', '.join(SUPPORTED_MODELS)}")
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], np.float64)
        return K, (None if dist is None or not any(dist) else tuple(float(v) for v in dist))


@dataclass(frozen=True)
class ColmapImage:
    """One registered image: world -> camera rotation `qvec (qw, qx, qy, qz)`, translation `tvec`."""

    image_id: int
    qvec: tuple[float, float, float, float]
    tvec: tuple[float, float, float]
    camera_id: int
    name: str

    @property
    def camtoworld(self) -> np.ndarray:
        """`float64 [4, 4]` camera -> world (OpenCV axes)."""
        R = qvec_to_rotmat(np.asarray(self.qvec, np.float64))
        c2w = np.eye(4)
        c2w[:3, :3] = R.T
        c2w[:3, 3] = -R.T @ np.asarray(self.tvec, np.float64)
        return c2w


@dataclass(frozen=True)
class ColmapModel:
    """A sparse model as read from disk.

    Attributes:
        cameras: camera id -> camera.
        images: registered images, in file order.
        point_ids: `int64 [P]`; points: `float64 [P, 3]` world xyz; points_rgb: `uint8 [P, 3]`
            (empty arrays when there is no points3D file).
        folder: the model folder.
        binary: whether the binary files were read.
    """

    cameras: dict[int, ColmapCamera]
    images: tuple[ColmapImage, ...]
    point_ids: np.ndarray
    points: np.ndarray
    points_rgb: np.ndarray
    folder: Path
    binary: bool


# ------------------------------------------------------------------------------------------------
# rotations
# ------------------------------------------------------------------------------------------------
def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Unit quaternion `(w, x, y, z)` (normalised here) -> `float64 [3, 3]` rotation (Hamilton)."""
    q = np.asarray(qvec, np.float64)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """`[3, 3]` rotation -> unit quaternion `(w, x, y, z)` with `w >= 0` (Shepperd's method)."""
    R = np.asarray(R, np.float64)
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = np.array([0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s])
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = np.array([(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s])
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = np.array([(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s])
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = np.array([(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s])
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


# ------------------------------------------------------------------------------------------------
# binary reader
# ------------------------------------------------------------------------------------------------
class _Reader:
    """Little-endian cursor over a file's bytes; truncation is a DataError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise DataError(f"{self.path}: truncated: needs {size} more bytes at byte {self.pos}, "
                            f"file has {len(self.data)}")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def skip(self, nbytes: int) -> None:
        if nbytes < 0 or self.pos + nbytes > len(self.data):
            raise DataError(f"{self.path}: truncated: needs {nbytes} more bytes at byte {self.pos}, "
                            f"file has {len(self.data)}")
        self.pos += nbytes

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DataError(f"{self.path}: truncated: unterminated image name at byte {self.pos}")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{self.path}: image name at byte {self.pos} is not UTF-8") from None

    def count(self, what: str, min_record: int) -> int:
        """A uint64 record count, checked against the bytes left (each record >= `min_record` bytes)."""
        (n,) = self.read("Q")
        left = len(self.data) - self.pos
        if n * min_record > left:
            raise DataError(f"{self.path}: header says {n} {what}, which needs at least {n * min_record} bytes; "
                            f"the file has {left} after the count (truncated or not a COLMAP model file)")
        return n

    def check_end(self) -> None:
        if self.pos != len(self.data):
            raise DataError(f"{self.path}: {len(self.data) - self.pos} unexpected trailing bytes "
                            "(is this a COLMAP model file?)")


def _read_cameras_bin(path: Path) -> dict[int, ColmapCamera]:
    r = _Reader(path)
    n = r.count("cameras", 24 + 8 * 3)
    cams = {}
    for _ in range(n):
        cam_id, model_id, w, h = r.read("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise DataError(f"{path}: camera {cam_id} has unknown camera model id {model_id}; "
                            f"supported models are {', '.join(SUPPORTED_MODELS)}")
        name, nparams = CAMERA_MODELS[model_id]
        params = r.read("d" * nparams)
        if cam_id in cams:
            raise DataError(f"{path}: camera id {cam_id} appears twice; expected unique camera ids")
        cams[cam_id] = _camera(path, f"camera {cam_id}", cam_id, name, int(w), int(h), params)
    r.check_end()
    return cams


def _camera(path: Path, where: str, cam_id: int, model: str, w: int, h: int, params) -> ColmapCamera:
    """A camera after the checks COLMAP's own files always pass: positive size, finite parameters."""
    if w <= 0 or h <= 0 or w > 1 << 20 or h > 1 << 20:
        raise DataError(f"{path}: {where}: image size {w}x{h}; expected a positive width and height in pixels")
    params = tuple(float(v) for v in params)
    if not np.isfinite(params).all():
        raise DataError(f"{path}: {where}: NaN or inf in the {model} parameters {params}")
    return ColmapCamera(cam_id, model, w, h, params)


def _read_images_bin(path: Path) -> list[ColmapImage]:
    r = _Reader(path)
    n = r.count("images", 64 + 1 + 8)
    images = []
    for _ in range(n):
        image_id, qw, qx, qy, qz, tx, ty, tz, cam_id = r.read("I7dI")
        name = r.cstring()
        (n2d,) = r.read("Q")
        r.skip(24 * n2d)  # x, y (double), point3D_id (int64) per 2D point
        images.append(ColmapImage(image_id, (qw, qx, qy, qz), (tx, ty, tz), cam_id, name))
    r.check_end()
    return images


def _read_points_bin(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
    r = _Reader(path)
    n = r.count("points", 43)
    ids = np.empty(n, np.int64)
    xyz = np.empty((n, 3), np.float64)
    rgb = np.empty((n, 3), np.uint8)
    seen: dict[int, int] = {}  # image id -> the first point whose track names it
    for i in range(n):
        pid, x, y, z, cr, cg, cb, _err, track_len = r.read("Q3d3BdQ")
        start = r.pos
        r.skip(8 * track_len)  # image_id (int32), point2D_idx (int32) per track element
        for im in np.unique(np.frombuffer(r.data, "<i4", count=2 * track_len, offset=start)[0::2]).tolist():
            seen.setdefault(im, int(pid))
        ids[i] = pid
        xyz[i] = (x, y, z)
        rgb[i] = (cr, cg, cb)
    r.check_end()
    return ids, xyz, rgb, seen


# ------------------------------------------------------------------------------------------------
# text reader
# ------------------------------------------------------------------------------------------------
def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of every line, comments (#) blanked; UTF-8 errors are DataErrors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (is it a binary model named .txt?)") from None
    return [(i, "" if ln.lstrip().startswith("#") else ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]


def _numbers(path: Path, lineno: int, tokens: Sequence[str], kinds: str, expected: str) -> list:
    out = []
    try:
        for tok, kind in zip(tokens, kinds):
            out.append(int(tok) if kind == "i" else float(tok))
    except ValueError:
        raise DataError(f"{path}:{lineno}: non-numeric value; expected {expected}") from None
    if not np.isfinite([float(v) for v in out]).all():
        raise DataError(f"{path}:{lineno}: NaN or inf value; expected {expected}")
    return out


def _read_cameras_txt(path: Path) -> dict[int, ColmapCamera]:
    expected = "CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]"
    cams = {}
    for lineno, line in _data_lines(path):
        if not line:
            continue
        tok = line.split()
        if len(tok) < 4:
            raise DataError(f"{path}:{lineno}: expected {expected}; got {line!r}")
        model = tok[1]
        if model not in _MODEL_IDS:
            raise DataError(f"{path}:{lineno}: unknown camera model {model!r}; "
                            f"supported models are {', '.join(SUPPORTED_MODELS)}")
        nparams = CAMERA_MODELS[_MODEL_IDS[model]][1]
        if len(tok) != 4 + nparams:
            raise DataError(f"{path}:{lineno}: the {model} model takes {nparams} parameters; "
                            f"got {len(tok) - 4} in {line!r}")
        cam_id, w, h = _numbers(path, lineno, [tok[0], tok[2], tok[3]], "iii", expected)
        params = _numbers(path, lineno, tok[4:], "f" * nparams, expected)
        if cam_id in cams:
            raise DataError(f"{path}:{lineno}: camera id {cam_id} appears twice; expected unique camera ids")
        cams[cam_id] = _camera(path, f"line {lineno} (camera {cam_id})", cam_id, model, w, h, params)
    return cams


def _read_images_txt(path: Path) -> list[ColmapImage]:
    expected = "IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then a line of POINTS2D[] (may be empty)"
    lines = _data_lines(path)
    images = []
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        if not line:
            i += 1
            continue
        tok = line.split()
        if len(tok) < 10:
            raise DataError(f"{path}:{lineno}: expected {expected}; got {line!r}")
        vals = _numbers(path, lineno, tok[:9], "ifffffffi", expected)
        images.append(ColmapImage(vals[0], tuple(vals[1:5]), tuple(vals[5:8]), vals[8], " ".join(tok[9:])))
        if i + 1 < len(lines) and len(lines[i + 1][1].split()) % 3 != 0:
            raise DataError(f"{path}:{lines[i + 1][0]}: expected the POINTS2D line of image {vals[0]} "
                            "(X Y POINT3D_ID triples, may be empty); got "
                            f"{len(lines[i + 1][1].split())} values")
        i += 2  # the next line holds the image's 2D points, possibly empty
    return images


def _read_points_txt(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
    expected = "POINT3D_ID X Y Z R G B ERROR TRACK[] (IMAGE_ID POINT2D_IDX pairs)"
    ids, xyz, rgb = [], [], []
    seen: dict[int, int] = {}  # image id -> the line of the first point whose track names it
    for lineno, line in _data_lines(path):
        if not line:
            continue
        tok = line.split()
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise DataError(f"{path}:{lineno}: expected {expected}; got {len(tok)} values in {line[:120]!r}")
        vals = _numbers(path, lineno, tok[:7], "ifffiii", expected)
        if not all(0 <= c <= 255 for c in vals[4:7]):
            raise DataError(f"{path}:{lineno}: colour {vals[4:7]} outside 0..255")
        for im in _numbers(path, lineno, tok[8::2], "i" * ((len(tok) - 8) // 2), expected):
            seen.setdefault(im, lineno)
        ids.append(vals[0])
        xyz.append(vals[1:4])
        rgb.append(vals[4:7])
    return (np.asarray(ids, np.int64).reshape(-1), np.asarray(xyz, np.float64).reshape(-1, 3),
            np.asarray(rgb, np.uint8).reshape(-1, 3), seen)


# ------------------------------------------------------------------------------------------------
# model / scene
# ------------------------------------------------------------------------------------------------
def _has_model(folder: Path) -> bool:
    return (folder / "cameras.bin").is_file() or (folder / "cameras.txt").is_file()


def find_colmap_model(root: str | Path) -> Path | None:
    """The model folder of a COLMAP dataset root (`sparse/0`, else `sparse`), or None."""
    root = Path(root)
    for folder in (root / "sparse" / "0", root / "sparse"):
        if _has_model(folder):
            return folder
    return None


def read_colmap_model(folder: str | Path) -> ColmapModel:
    """Read `cameras`, `images` and (optional) `points3D` from a model folder (binary preferred).

    Raises:
        DataError: missing folder or files, truncated / malformed files (naming file and line), a
            record count the file cannot hold, duplicate camera / image ids or image names, a camera
            of no size or with NaN parameters, an image referring to an unknown camera, point tracks
            referring to unknown images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: COLMAP model folder not found")
    binary = (folder / "cameras.bin").is_file()
    ext = ".bin" if binary else ".txt"
    cam_path, img_path, pts_path = (folder / f"{n}{ext}" for n in ("cameras", "images", "points3D"))
    for p in (cam_path, img_path):
        if not p.is_file():
            raise DataError(f"{p}: COLMAP model file not found (a model needs cameras{ext} and images{ext})")
    if binary:
        cams, images = _read_cameras_bin(cam_path), _read_images_bin(img_path)
        pts = _read_points_bin(pts_path) if pts_path.is_file() else None
    else:
        cams, images = _read_cameras_txt(cam_path), _read_images_txt(img_path)
        pts = _read_points_txt(pts_path) if pts_path.is_file() else None
    ids: dict[int, str] = {}
    names: set[str] = set()
    for im in images:
        if im.camera_id not in cams:
            raise DataError(f"{img_path}: image {im.name!r} refers to camera {im.camera_id}, "
                            f"which is not in {cam_path.name} (cameras: {sorted(cams)})")
        check_finite(im.qvec + im.tvec, f"{img_path}: pose of image {im.name!r}")
        if np.linalg.norm(im.qvec) < 1e-12:
            raise DataError(f"{img_path}: image {im.name!r} has a zero quaternion")
        if im.image_id in ids:
            raise DataError(f"{img_path}: image id {im.image_id} appears twice ({ids[im.image_id]!r} and "
                            f"{im.name!r}); expected unique image ids")
        if im.name in names:  # one photo twice: double weight, or in both splits (a leak)
            raise DataError(f"{img_path}: image {im.name!r} is listed twice; expected each image once")
        ids[im.image_id] = im.name
        names.add(im.name)
    if pts is None:
        pts = (np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), {})
    unknown = sorted(set(pts[3]) - set(ids))
    if unknown:
        where = "line" if not binary else "point id"
        raise DataError(f"{pts_path}: point tracks refer to image id(s) {unknown[:5]} that are not in "
                        f"{img_path.name} (first at {where} {pts[3][unknown[0]]}); the points do not belong "
                        "to this model's images")
    check_finite(pts[1], f"{pts_path}: point coordinates")
    return ColmapModel(cams, tuple(images), pts[0], pts[1], pts[2], folder, binary)


def load_colmap(root: str | Path, images_dir: str = "images", model_dir: str | Path | None = None) -> Scene:
    """Load a COLMAP dataset as a `Scene`.

    Args:
        root: dataset folder.
        images_dir: image folder, relative to `root`.
        model_dir: model folder (default: `root/sparse/0`, else `root/sparse`).

    Returns:
        The scene; images that do not exist are dropped and listed in `missing_images` (with one
        warning). `points` are the model's points3D (None when the model has none).

    Raises:
        DataError: no model, an unsupported camera model (naming it and the file), malformed files,
            no image at all, an image whose header is unreadable or whose size is not its camera's.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    folder = Path(model_dir) if model_dir is not None else find_colmap_model(root)
    if folder is None:
        raise DataError(f"{root}: no COLMAP model; looked for sparse/0/cameras.{{bin,txt}} and "
                        "sparse/cameras.{bin,txt}")
    model = read_colmap_model(folder)
    cam_file = folder / ("cameras.bin" if model.binary else "cameras.txt")
    intr = {cid: cam.intrinsics(cam_file) for cid, cam in model.cameras.items()}
    image_root = root / images_dir
    img_file = folder / ("images.bin" if model.binary else "images.txt")
    frames, missing = [], []
    for im in model.images:
        path = image_root / im.name
        if not path.is_file():
            missing.append(im.name)
            continue
        cam = model.cameras[im.camera_id]
        K, dist = intr[im.camera_id]
        try:
            frame = CameraFrame(name=im.name, image_path=path.resolve(), camtoworld=im.camtoworld, K=K,
                                width=cam.width, height=cam.height, distortion=dist)
        except DataError as e:
            raise DataError(f"{img_file}: image {im.image_id} with camera {im.camera_id} of {cam_file.name}: "
                            f"{e}") from None
        check_image_size(path, cam.width, cam.height, f"camera {im.camera_id} of {cam_file}")
        frames.append(frame)
    has_pts = len(model.points) > 0
    return finish_scene(img_file, root, frames, missing,
                        points=model.points.astype(np.float32) if has_pts else None,
                        points_rgb=model.points_rgb if has_pts else None, fmt="colmap", image_dir=image_root)


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def _frame_camera(frame: CameraFrame) -> tuple[str, tuple[float, ...]]:
    K = frame.K
    if abs(K[0, 1]) > 0 or abs(K[1, 0]) > 0 or abs(K[2, 0]) > 0 or abs(K[2, 1]) > 0 or K[2, 2] != 1:
        raise DataError(f"frame {frame.name!r}: K {K.tolist()} is not a pinhole matrix COLMAP can store (skew?)")
    base = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    if frame.distortion is None:
        return "PINHOLE", base
    return "OPENCV", base + tuple(float(v) for v in frame.distortion)


def _model_rows(frames: Sequence[CameraFrame], image_names: Sequence[str] | None):
    if image_names is not None and len(image_names) != len(frames):
        raise DataError(f"image_names: expected {len(frames)} names (one per frame); got {len(image_names)}")
    cams: dict[tuple, int] = {}
    images = []
    for i, f in enumerate(frames):
        model, params = _frame_camera(f)
        key = (model, f.width, f.height, params)
        cam_id = cams.setdefault(key, len(cams) + 1)
        w2c = np.linalg.inv(f.camtoworld)
        q = rotmat_to_qvec(w2c[:3, :3])
        t = w2c[:3, 3]
        name = f.name if image_names is None else image_names[i]
        if not name or any(c.isspace() for c in name):
            raise DataError(f"frame {i}: image name {name!r} must be non-empty without whitespace for COLMAP")
        images.append((i + 1, tuple(float(v) for v in q), tuple(float(v) for v in t), cam_id, name))
    cam_rows = [(cid, model, w, h, params) for (model, w, h, params), cid in cams.items()]
    return cam_rows, images


def _points_arrays(points, points_rgb):
    if points is None:
        return np.zeros((0, 3)), np.zeros((0, 3), np.uint8)
    pts = check_finite(points, "points").reshape(-1, 3)
    if points_rgb is None:
        rgb = np.full(pts.shape, 128, np.uint8)
    else:
        rgb = np.asarray(points_rgb)
        if rgb.shape != pts.shape:
            raise DataError(f"points_rgb: expected shape {pts.shape} like points; got {rgb.shape}")
        rgb = rgb.astype(np.uint8)
    return pts, rgb


def _r(v: float) -> str:
    return repr(float(v))


def write_colmap_text(folder: str | Path, frames: Sequence[CameraFrame], points: np.ndarray | None = None,
                      points_rgb: np.ndarray | None = None, image_names: Sequence[str] | None = None) -> Path:
    """Write `cameras.txt`, `images.txt`, `points3D.txt` (COLMAP text model) into `folder`.

    Frames with equal intrinsics share a camera (PINHOLE, or OPENCV with distortion); image ids
    follow the frame order from 1; points get ids from 1, error 0 and empty tracks; images get no 2D
    points. Floats are written with full precision (`repr`), so a read gives back the same doubles.

    Args:
        folder: output model folder (created).
        frames: the cameras.
        points: `[P, 3]` world points, or None.
        points_rgb: `uint8 [P, 3]` (grey when None).
        image_names: names to store (relative to the dataset's `images/`); default `frame.name`.

    Returns:
        `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cam_rows, images = _model_rows(frames, image_names)
    pts, rgb = _points_arrays(points, points_rgb)
    lines = ["# Camera list with one line of data per camera:",
             "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
             f"# Number of cameras: {len(cam_rows)}"]
    lines += [" ".join([str(cid), model, str(w), str(h)] + [_r(p) for p in params])
              for cid, model, w, h, params in cam_rows]
    atomic_write_text(folder / "cameras.txt", "\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:",
             "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
             "#   POINTS2D[] as (X, Y, POINT3D_ID)",
             f"# Number of images: {len(images)}, mean observations per image: 0"]
    for iid, q, t, cid, name in images:
        lines.append(" ".join([str(iid)] + [_r(v) for v in q + t] + [str(cid), name]))
        lines.append("")
    atomic_write_text(folder / "images.txt", "\n".join(lines) + "\n")
    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
             f"# Number of points: {len(pts)}, mean track length: 0"]
    lines += [f"{i + 1} {_r(p[0])} {_r(p[1])} {_r(p[2])} {c[0]} {c[1]} {c[2]} 0.0"
              for i, (p, c) in enumerate(zip(pts, rgb.tolist()))]
    atomic_write_text(folder / "points3D.txt", "\n".join(lines) + "\n")
    return folder


def write_colmap_binary(folder: str | Path, frames: Sequence[CameraFrame], points: np.ndarray | None = None,
                        points_rgb: np.ndarray | None = None, image_names: Sequence[str] | None = None) -> Path:
    """Write `cameras.bin`, `images.bin`, `points3D.bin` (COLMAP binary model); same rules as
    `write_colmap_text`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cam_rows, images = _model_rows(frames, image_names)
    pts, rgb = _points_arrays(points, points_rgb)
    buf = [struct.pack("<Q", len(cam_rows))]
    for cid, model, w, h, params in cam_rows:
        buf.append(struct.pack("<iiQQ", cid, _MODEL_IDS[model], w, h) + struct.pack(f"<{len(params)}d", *params))
    atomic_write_bytes(folder / "cameras.bin", b"".join(buf))
    buf = [struct.pack("<Q", len(images))]
    for iid, q, t, cid, name in images:
        buf.append(struct.pack("<I7dI", iid, *q, *t, cid) + name.encode("utf-8") + b"\x00" + struct.pack("<Q", 0))
    atomic_write_bytes(folder / "images.bin", b"".join(buf))
    buf = [struct.pack("<Q", len(pts))]
    for i, (p, c) in enumerate(zip(pts.tolist(), rgb.tolist())):
        buf.append(struct.pack("<Q3d3BdQ", i + 1, *p, *c, 0.0, 0))
    atomic_write_bytes(folder / "points3D.bin", b"".join(buf))
    return folder
