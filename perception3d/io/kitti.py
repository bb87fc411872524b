"""KITTI 3D object reader (the standard on-disk layout) -> numpy frames.

Layout read::

    root/ImageSets/{train,val,...}.txt          frame ids, one per line (optional)
    root/{split}/velodyne/XXXXXX.bin            float32 [N, 4] x, y, z, reflectance (LiDAR frame)
    root/{split}/image_2/XXXXXX.png             left colour image
    root/{split}/calib/XXXXXX.txt               P0-P3, R0_rect, Tr_velo_to_cam
    root/{split}/label_2/XXXXXX.txt             one object per line (camera frame)
    root/{split}/radar/XXXXXX.bin               float32 [K, 6] (synthetic data only, optional)

Label boxes are converted to the toolkit's LiDAR box convention `(x, y, z, dx, dy, dz, yaw)`
(`perception3d/design.md`) through the calibration: the camera bottom-centre is mapped with
`T_lidar_cam` and raised by h/2 along LiDAR z; the heading `(cos ry, 0, -sin ry)` of the camera box
is matched in the LiDAR x-y plane (for the standard axis swap this is `yaw = -ry - pi/2`). The
convention is that of `geometry.boxes` (numpy here, so the reader needs no torch).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_write_text
from perception3d.geometry.camera import KittiCalibration
from perception3d.io.pointcloud import read_kitti_bin

__all__ = [
    "LABEL_FORMAT",
    "KittiLabels",
    "KittiFrame",
    "KittiDataset",
    "KITTI_CLASSES",
    "BENCHMARK_CLASSES",
    "read_label",
    "read_calib",
    "read_image",
    "read_image_shape",
    "write_label",
    "camera_boxes_to_lidar",
    "lidar_boxes_to_camera",
]

LABEL_FORMAT = "type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y"
_EXPECTED = f"15 fields: {LABEL_FORMAT} (16 with a trailing score)"
KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
BENCHMARK_CLASSES = ("Car", "Pedestrian", "Cyclist")  # the classes the KITTI benchmark evaluates
"""The object types of the KITTI object benchmark, spelled as in its label files."""


@dataclass(frozen=True)
class KittiLabels:
    """The objects of one KITTI label file, as parallel arrays (M objects).

    Values are float64, as the KITTI devkit parses them: in float32, a truncation written as 0.15
    would read as 0.15000000596 and fall out of the easy difficulty (`<= 0.15`).

    Attributes:
        names: `[M]` str, object type ("Car", "Pedestrian", "DontCare", ...).
        truncated: `[M]` float64 in [0, 1] (-1 for DontCare).
        occluded: `[M]` int32, 0 visible .. 3 unknown (-1 for DontCare).
        alpha: `[M]` float64 observation angle, radians.
        bbox2d: `[M, 4]` float64 (x1, y1, x2, y2) pixels in image_2.
        dims_hwl: `[M, 3]` float64 (height, width, length) metres.
        loc_cam: `[M, 3]` float64 bottom centre in the rectified camera frame, metres.
        rotation_y: `[M]` float64 rotation about camera +y, radians.
        score: `[M]` float64 detection score, or None for ground truth.
    """

    names: np.ndarray
    truncated: np.ndarray
    occluded: np.ndarray
    alpha: np.ndarray
    bbox2d: np.ndarray
    dims_hwl: np.ndarray
    loc_cam: np.ndarray
    rotation_y: np.ndarray
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.names.shape[0])

    @classmethod
    def empty(cls) -> "KittiLabels":
        z = np.zeros(0, np.float64)
        return cls(np.zeros(0, dtype="<U16"), z, np.zeros(0, np.int32), z, np.zeros((0, 4)), np.zeros((0, 3)),
                   np.zeros((0, 3)), z, None)

    @property
    def boxes_cam(self) -> np.ndarray:
        """`[M, 7]` KITTI camera boxes `(x, y, z, h, w, l, ry)` (bottom centre)."""
        return np.concatenate([self.loc_cam, self.dims_hwl, self.rotation_y[:, None]], axis=1)

    def select(self, mask: np.ndarray) -> "KittiLabels":
        """Subset by a boolean mask or index array."""
        return KittiLabels(self.names[mask], self.truncated[mask], self.occluded[mask], self.alpha[mask],
                           self.bbox2d[mask], self.dims_hwl[mask], self.loc_cam[mask], self.rotation_y[mask],
                           None if self.score is None else self.score[mask])


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file (byte {e.start} is not UTF-8 text); expected a KITTI {what} "
                        "file") from None


def _check_type(path: Path, lineno: int, name: str) -> None:
    if name in KITTI_CLASSES:
        return
    same_case = [c for c in KITTI_CLASSES if c.lower() == name.lower()]
    close = same_case or difflib.get_close_matches(name, KITTI_CLASSES, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"{path}:{lineno}: unknown object type {name!r}{hint}; expected one of the KITTI classes "
                    f"{', '.join(KITTI_CLASSES)} (case-sensitive)")


def read_label(path: str | Path) -> KittiLabels:
    """Parse a KITTI `label_2/XXXXXX.txt` file (or a result file: the same with a trailing score).

    Raises:
        DataError: naming `file:line` and what was expected, for a missing or non-text file, a line
            without 15 (16 with score) fields, a non-numeric / NaN value, an object type that is not
            one of `KITTI_CLASSES` (a case mismatch such as `car` gets "did you mean 'Car'"), and in
            ground truth (15 fields) a non-DontCare object with a size <= 0, `truncated` outside
            [0, 1] or `occluded` not one of 0, 1, 2, 3.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    names, rows, scores = [], [], []
    for lineno, line in enumerate(_read_text(path, "label").splitlines(), 1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) not in (15, 16):
            raise DataError(f"{path}:{lineno}: expected {_EXPECTED}; got {len(tok)} fields: {line.strip()!r}")
        _check_type(path, lineno, tok[0])
        try:
            vals = [float(t) for t in tok[1:]]
        except ValueError:
            raise DataError(f"{path}:{lineno}: non-numeric value; expected {_EXPECTED}; got {line.strip()!r}") \
                from None
        if not np.isfinite(vals).all():
            raise DataError(f"{path}:{lineno}: NaN or inf value; expected {_EXPECTED}")
        if len(tok) == 15 and tok[0] != "DontCare":
            _check_ground_truth(path, lineno, vals)
        names.append(tok[0])
        rows.append(vals[:14])
        scores.append(vals[14] if len(tok) == 16 else None)
    if not rows:
        return KittiLabels.empty()
    has_score = [s is not None for s in scores]
    if any(has_score) and not all(has_score):
        first = has_score.index(not has_score[0]) + 1
        raise DataError(f"{path}: some lines have a score (16 fields) and some do not (object {first} differs "
                        "from the first); expected all or none")
    a = np.asarray(rows, dtype=np.float64)
    return KittiLabels(
        names=np.asarray(names),
        truncated=a[:, 0],
        occluded=a[:, 1].astype(np.int32),
        alpha=a[:, 2],
        bbox2d=a[:, 3:7],
        dims_hwl=a[:, 7:10],
        loc_cam=a[:, 10:13],
        rotation_y=a[:, 13],
        score=np.asarray(scores, np.float64) if all(has_score) else None,
    )


def _check_ground_truth(path: Path, lineno: int, vals: list[float]) -> None:
    """The value ranges of a ground-truth object (not DontCare), which evaluation relies on."""
    truncated, occluded, dims = vals[0], vals[1], vals[7:10]
    if min(dims) <= 0:
        raise DataError(f"{path}:{lineno}: object size h w l = {' '.join(f'{d:g}' for d in dims)}; expected "
                        "sizes > 0 in metres (only DontCare lines carry -1)")
    if not 0.0 <= truncated <= 1.0:
        raise DataError(f"{path}:{lineno}: truncated = {truncated:g}; expected a fraction in [0, 1]")
    if occluded not in (0.0, 1.0, 2.0, 3.0):
        raise DataError(f"{path}:{lineno}: occluded = {occluded:g}; expected 0 (visible), 1, 2 or 3 (unknown)")


def write_label(path: str | Path, labels: KittiLabels, decimals: int = 2) -> None:
    """Write labels in KITTI text form (atomically): 2 decimals as the official label files,
    more for detections (OpenPCDet writes result files with 4); the score always gets 4."""
    lines = []
    for i in range(len(labels)):
        vals = [labels.truncated[i], labels.occluded[i], labels.alpha[i], *labels.bbox2d[i], *labels.dims_hwl[i],
                *labels.loc_cam[i], labels.rotation_y[i]]
        s = f"{labels.names[i]} {vals[0]:.2f} {int(vals[1])} " + " ".join(f"{v:.{decimals}f}" for v in vals[2:])
        if labels.score is not None:
            s += f" {labels.score[i]:.4f}"
        lines.append(s)
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


# ------------------------------------------------------------------------------------------------
# box conversions (through the calibration, not a hard-coded axis swap)
# ------------------------------------------------------------------------------------------------
def camera_boxes_to_lidar(boxes_cam: np.ndarray, calib: KittiCalibration) -> np.ndarray:
    """KITTI camera boxes `[M, 7] (x, y, z, h, w, l, ry)` (bottom centre) -> LiDAR boxes `[M, 7]`.

    Same convention as `geometry.boxes.kitti_camera_to_boxes_lidar` (and OpenPCDet): the bottom
    centre is mapped with `T_lidar_cam`, then raised by h/2 along LiDAR z; the yaw is the LiDAR
    x-y direction whose camera image has heading `(cos ry, 0, -sin ry)` in the camera x-z plane,
    so `lidar_boxes_to_camera` inverts this exactly for any calibration.

    Returns:
        `(x, y, z, dx=l, dy=w, dz=h, yaw)` float64, centre-based, LiDAR frame, yaw in [-pi, pi).
    """
    b = np.asarray(boxes_cam, np.float64).reshape(-1, 7)
    h, w, l, ry = b[:, 3], b[:, 4], b[:, 5], b[:, 6]
    centre = calib.cam_to_lidar(b[:, :3])
    centre[:, 2] += h / 2.0
    R = calib.T_cam_lidar[:3, :3]
    zero = np.zeros_like(ry)
    normal = np.stack([np.sin(ry), zero, np.cos(ry)], axis=1) @ R  # R^T n, n normal to the heading
    heading = np.stack([np.cos(ry), zero, -np.sin(ry)], axis=1) @ R
    dx, dy = -normal[:, 1], normal[:, 0]  # in-plane direction with R d perpendicular to n
    flip = dx * heading[:, 0] + dy * heading[:, 1] < 0
    dx, dy = np.where(flip, -dx, dx), np.where(flip, -dy, dy)
    yaw = _wrap(np.arctan2(dy, dx))
    return np.concatenate([centre, l[:, None], w[:, None], h[:, None], yaw[:, None]], axis=1)


def lidar_boxes_to_camera(boxes_lidar: np.ndarray, calib: KittiCalibration) -> np.ndarray:
    """LiDAR boxes `[M, 7] (x, y, z, dx, dy, dz, yaw)` -> KITTI camera boxes `[M, 7] (x, y, z, h, w, l, ry)`.

    The bottom centre (centre minus dz/2 along LiDAR z) is mapped with `T_cam_lidar`; the heading
    `(cos yaw, sin yaw, 0)` is rotated into the camera and `ry = atan2(-d_z, d_x)`, in [-pi, pi).
    """
    b = np.asarray(boxes_lidar, np.float64).reshape(-1, 7)
    bottom = b[:, :3].copy()
    bottom[:, 2] -= b[:, 5] / 2.0
    bottom_cam = calib.lidar_to_cam(bottom)
    R = calib.T_cam_lidar[:3, :3]
    heading = np.stack([np.cos(b[:, 6]), np.sin(b[:, 6]), np.zeros(len(b))], axis=1) @ R.T
    ry = _wrap(np.arctan2(-heading[:, 2], heading[:, 0]))
    return np.concatenate([bottom_cam, b[:, 5:6], b[:, 4:5], b[:, 3:4], ry[:, None]], axis=1)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Wrap radians into [-pi, pi)."""
    return angle - np.floor(angle / (2 * np.pi) + 0.5) * 2 * np.pi


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def read_calib(path: str | Path) -> KittiCalibration:
    """Read a KITTI `calib/XXXXXX.txt` and check that its matrices can be used.

    Raises:
        DataError: naming the file (and the matrix): missing or non-text file, a malformed row
            (non-numeric, wrong number of values, NaN), a missing key, a singular `R0_rect`,
            `Tr_velo_to_cam` (its rotation part) or `P2` (its left 3x3), or an `R0_rect` /
            `Tr_velo_to_cam` rotation part that is not a rotation.
    """
    path = Path(path)
    if path.is_file():
        _read_text(path, "calibration")  # a binary file: one clear error, not a UnicodeDecodeError
    try:
        calib = KittiCalibration.from_file(path)
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    parts = (("R0_rect", calib.R0_rect, "a rotation"), ("Tr_velo_to_cam", calib.Tr_velo_to_cam[:, :3],
             "a rigid transform [R | t], R a rotation"), ("P2", calib.P2[:, :3], "a camera projection K [I | t]"))
    for name, m, expected in parts:
        sv = np.linalg.svd(m, compute_uv=False)
        if not sv[-1] > 1e-9 * max(sv[0], 1e-300):
            raise DataError(f"{path}: {name} is singular (rank {int(np.sum(sv > 1e-9 * max(sv[0], 1e-300)))} "
                            f"of 3, values {' '.join(f'{v:g}' for v in np.asarray(m).reshape(-1))}); expected "
                            f"{expected}")
        if name != "P2":
            err = float(np.abs(m.T @ m - np.eye(3)).max())
            det = float(np.linalg.det(m))
            if err > 1e-2 or det < 0:
                found = (f"a reflection (determinant {det:.3g})" if err <= 1e-2 else
                         f"R^T R differs from the identity by up to {err:.3g}")
                raise DataError(f"{path}: the rotation part of {name} is not a rotation: {found}; expected "
                                f"{expected}")
    return calib


# ------------------------------------------------------------------------------------------------
# frames and the dataset
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KittiFrame:
    """One KITTI frame.

    Attributes:
        frame_id: e.g. "000008".
        points_lidar: `float32 [N, 4]` (x, y, z metres, reflectance).
        image: `uint8 [H, W, 3]` RGB, or None when not loaded.
        calib: the frame's calibration.
        labels: all label lines (DontCare included), in file order.
        boxes_lidar: `float32 [M, 7]` LiDAR boxes aligned with `labels`; DontCare rows are NaN.
        radar: `float32 [K, 6]` (x, y, z, radial velocity m/s, rcs, object id) or None.
    """

    frame_id: str
    points_lidar: np.ndarray
    image: np.ndarray | None
    calib: KittiCalibration
    labels: KittiLabels
    boxes_lidar: np.ndarray
    radar: np.ndarray | None = None
    image_shape: tuple[int, int] | None = field(default=None)  # (H, W) when known

    def gt_boxes(self, classes: Sequence[str] = BENCHMARK_CLASSES) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of the given classes: `(boxes [K, 7] float32, class ids [K] int64)`."""
        keep = np.isin(self.labels.names, list(classes))
        ids = np.array([list(classes).index(n) for n in self.labels.names[keep]], dtype=np.int64)
        return self.boxes_lidar[keep].astype(np.float32), ids


def _image_errors():
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def read_image_shape(path: Path) -> tuple[int, int]:
    """`(H, W)` of an image from its header (cheap: the pixels are not decoded).

    Raises:
        DataError: the file is missing or not a readable image, naming it.
    """
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except _image_errors() as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc}); expected a PNG") from None
    if w < 1 or h < 1:
        raise DataError(f"{path}: image of size {w} x {h}; expected a non-empty image")
    return h, w


def read_image(path: Path) -> np.ndarray:
    """Decode an image to `uint8 [H, W, 3]` RGB.

    Raises:
        DataError: the file is missing, not an image, or corrupt (e.g. truncated), naming it.
    """
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except _image_errors() as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); expected a PNG") from None


_LIST_AT_MOST = 5  # missing files named per kind in one error


class KittiDataset:
    """KITTI object dataset on disk, indexable by position.

    Args:
        root: dataset root holding `{split}/` and optionally `ImageSets/`.
        split: "training" or "testing" (testing frames have no labels).
        ids: frame ids (str or int); default: `image_set`'s list, else every `velodyne/*.bin`.
        image_set: name of `ImageSets/{image_set}.txt` to read the ids from.
        load_image: read `image_2` PNGs (the image shape is read either way).
        check: check every listed frame's files now (`check()`), so that bad data fails here and
            not in the middle of a run.

    Raises:
        DataError: a missing split folder or image set file; with `check`, see `check()`.
    """

    def __init__(self, root: str | Path, split: str = "training", ids: Sequence[str | int] | None = None,
                 image_set: str | None = None, load_image: bool = True, check: bool = False):
        self.root = Path(root)
        self.split = split
        self.dir = self.root / split
        self.load_image = load_image
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: KITTI split directory not found (expected root/{split}/velodyne, ...)")
        self.source = "the given ids"
        if ids is None and image_set is not None:
            f = self.root / "ImageSets" / f"{image_set}.txt"
            if not f.is_file():
                raise DataError(f"{f}: image set file not found")
            ids = _read_text(f, "image set").split()
            self.source = str(f)
        if ids is None:
            vdir = self.dir / "velodyne"
            if not vdir.is_dir():
                raise DataError(f"{vdir}: velodyne directory not found")
            ids = sorted(p.stem for p in vdir.glob("*.bin"))
            self.source = f"{vdir}/*.bin"
        self.ids = [f"{int(i):06d}" if isinstance(i, (int, np.integer)) or str(i).isdigit() else str(i)
                    for i in ids]
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, kind: str, frame_id: str) -> Path:
        """Path of `kind` in {velodyne, image_2, calib, label_2, radar} for a frame."""
        ext = {"velodyne": ".bin", "image_2": ".png", "calib": ".txt", "label_2": ".txt", "radar": ".bin"}[kind]
        return self.dir / kind / f"{frame_id}{ext}"

    def check(self, images: Literal["auto", "required", "present", "skip"] = "auto") -> None:
        """Check every listed frame's files, cheaply, before any work: what `__getitem__` would
        otherwise find only when it reaches the frame.

        Checks that the velodyne, calib and (for `training`) label_2 files exist, that each `.bin`
        (and radar `.bin`) has a whole number of points, parses every calibration and label file,
        and reads the header of the images (`images`: "required": every frame must have one, as
        `load_image=True` reads them; "present": a LiDAR-only dataset may have none, but where
        some frames have one every frame needs one, and their shape is read; "auto": "required"
        with `load_image`, else "present"). NaN points are found when a frame is read (that needs
        the whole file).

        Raises:
            DataError: one message listing every missing file (by kind), or the first malformed
                file (named, with the line where there is one).
        """
        if images == "auto":
            images = "required" if self.load_image else "present"
        kinds = ["velodyne", "calib"] + (["label_2"] if self.split != "testing" else [])
        if images == "required" or (images == "present" and any(self.path("image_2", f).is_file() for f in self.ids)):
            kinds.append("image_2")  # present for some frames: then for all of them
        missing = {k: [fid for fid in self.ids if not self.path(k, fid).is_file()] for k in kinds}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            parts = []
            for kind, fids in missing.items():
                names = [self.path(kind, f).name for f in fids[:_LIST_AT_MOST]]
                more = f" and {len(fids) - _LIST_AT_MOST} more" if len(fids) > _LIST_AT_MOST else ""
                parts.append(f"{kind}/ lacks {', '.join(names)}{more}")
            total = sum(len(v) for v in missing.values())
            raise DataError(f"{self.dir}: {total} file(s) missing for the frames listed in {self.source}: "
                            + "; ".join(parts))
        for fid in self.ids:
            for kind, n in (("velodyne", 4), ("radar", 6)):
                p = self.path(kind, fid)
                if kind == "radar" and not p.is_file():
                    continue
                size = p.stat().st_size
                if size % (4 * n) or (size == 0 and kind == "velodyne"):
                    raise DataError(f"{p}: size {size} bytes; expected a non-empty whole number of points of "
                                    f"{n} float32 ({4 * n} bytes each): the file is truncated or not a KITTI .bin")
        for i, fid in enumerate(self.ids):
            self.calib(i)
            if self.split != "testing" or self.path("label_2", fid).is_file():
                self.labels(i)
            ip = self.path("image_2", fid)
            if images != "skip" and ip.is_file():
                read_image_shape(ip)

    def calib(self, index: int) -> KittiCalibration:
        return read_calib(self.path("calib", self.ids[index]))

    def labels(self, index: int) -> KittiLabels:
        p = self.path("label_2", self.ids[index])
        if not p.is_file() and self.split == "testing":
            return KittiLabels.empty()
        return read_label(p)

    def __getitem__(self, index: int) -> KittiFrame:
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for {len(self)} frames")
        fid = self.ids[index]
        calib = self.calib(index)
        points = read_kitti_bin(self.path("velodyne", fid))
        image, shape = None, None
        ip = self.path("image_2", fid)
        if self.load_image:
            if not ip.is_file():
                raise DataError(f"{ip}: image not found (pass load_image=False to skip images)")
            image = read_image(ip)
            shape = image.shape[:2]
        elif ip.is_file():
            shape = read_image_shape(ip)
        labels = self.labels(index)
        boxes = camera_boxes_to_lidar(labels.boxes_cam, calib).astype(np.float32)
        boxes[labels.names == "DontCare"] = np.nan
        rp = self.path("radar", fid)
        radar = None
        if rp.is_file():
            radar = read_kitti_bin(rp, num_features=6) if rp.stat().st_size else np.zeros((0, 6), np.float32)
        return KittiFrame(fid, points, image, calib, labels, boxes, radar, shape)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
