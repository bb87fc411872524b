"""Detection samples from a KITTI-layout dataset (real or synthetic), with seeded augmentation.

`DetectionDataset[i]` returns a `DetectionSample` (numpy): LiDAR points, the LiDAR-frame GT boxes of
the classes we detect, their labels, and the frame id. Augmentation (flip across the x axis, global
rotation about z, global scaling) draws from numpy's global generator, which the training engine
seeds per sample from `(seed, epoch, index)` (`perception3d.engine.data.fork_rng`), so a resumed
run sees exactly the same augmented samples as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from perception3d.errors import ConfigError, DataError
from perception3d.io.kitti import KittiDataset
from perception3d.io.kitti import BENCHMARK_CLASSES as CLASSES  # the classes detected and evaluated

__all__ = ["AugmentConfig", "DetectionSample", "DetectionDataset", "frame_targets", "read_split"]


@dataclass(frozen=True)
class AugmentConfig:
    """Global LiDAR augmentations applied at training time.

    Attributes:
        flip_y: randomly mirror across the x axis (y -> -y, yaw -> -yaw).
        rotation_rad: global rotation about z drawn uniformly from this range.
        scale: global scaling drawn uniformly from this range.
    """

    flip_y: bool = True
    rotation_rad: tuple[float, float] = (-0.785, 0.785)
    scale: tuple[float, float] = (0.95, 1.05)

    def __post_init__(self) -> None:
        for name in ("rotation_rad", "scale"):
            v = tuple(getattr(self, name))
            if len(v) != 2 or not all(math.isfinite(x) for x in v):
                raise ConfigError(f"data.augment.{name}: expected 2 finite numbers (low, high), got {list(v)}")
            if v[0] > v[1]:
                raise ConfigError(f"data.augment.{name}: expected (low, high) with low <= high, got {list(v)} "
                                  f"(reversed bounds?)")
        if self.scale[0] <= 0:
            raise ConfigError(f"data.augment.scale: expected scale factors > 0 (1: no scaling), got "
                              f"{list(self.scale)}")


@dataclass(frozen=True)
class DetectionSample:
    points: np.ndarray  # [N, 4] float32 x, y, z, intensity (LiDAR frame)
    gt_boxes: np.ndarray  # [M, 7] float32
    gt_labels: np.ndarray  # [M] int64 indices into CLASSES
    frame_id: str


def frame_targets(frame, classes: Sequence[str] = CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, labels and the index (into the frame's label list) of the objects of `classes`."""
    names = np.asarray(frame.labels.names)
    keep = np.flatnonzero(np.isin(names, classes))
    labels = np.array([classes.index(n) for n in names[keep]], dtype=np.int64)
    return np.asarray(frame.boxes_lidar, np.float32)[keep].reshape(-1, 7), labels, keep


def _augment(points: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    points = points.copy()
    boxes = boxes.copy()
    if cfg.flip_y and rng.random() < 0.5:
        points[:, 1] = -points[:, 1]
        boxes[:, 1] = -boxes[:, 1]
        boxes[:, 6] = -boxes[:, 6]
    angle = rng.uniform(*cfg.rotation_rad)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float32)
    points[:, :2] = points[:, :2] @ rot.T
    boxes[:, :2] = boxes[:, :2] @ rot.T
    boxes[:, 6] += angle
    scale = rng.uniform(*cfg.scale)
    points[:, :3] *= scale
    boxes[:, :6] *= scale
    boxes[:, 6] = (boxes[:, 6] + np.pi) % (2 * np.pi) - np.pi
    return points, boxes


def read_split(root: str | Path, split: str) -> list[str]:
    """Frame ids of `root/ImageSets/<split>.txt`, one per line.

    Raises:
        DataError: a missing, empty or non-text file, a line with more than one id, or an id listed
            twice, naming the file (and line).
    """
    ids_file = Path(root) / "ImageSets" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"{ids_file}: split file not found (expected one frame id per line)")
    try:
        text = ids_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{ids_file}: not a text file (byte {e.start}); expected one frame id per line") from None
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) > 1:
            raise DataError(f"{ids_file}:{lineno}: expected one frame id per line, got {line.strip()!r}")
        fid = f"{int(tok[0]):06d}" if tok[0].isdigit() else tok[0]
        if fid in first_line:
            raise DataError(f"{ids_file}:{lineno}: frame {tok[0]} is listed twice (first on line "
                            f"{first_line[fid]}); expected each frame once")
        first_line[fid] = lineno
        ids.append(fid)
    if not ids:
        raise DataError(f"{ids_file}: no frame ids listed (expected one frame id per line)")
    return ids


class DetectionDataset:
    """Training / evaluation samples from a KITTI-layout root.

    Args:
        root: folder holding `training/` and `ImageSets/`.
        split: ImageSets name (`train`, `val`, ...).
        pc_range_m: `(x0, y0, z0, x1, y1, z1)`; points outside are dropped, and so are GT boxes
            whose centre lies outside.
        augment: augmentation options, or None (evaluation).

    Raises:
        DataError: at construction, for a bad split file (`read_split`) or a listed frame whose files
            are missing or malformed (`KittiDataset.check`), naming the file.
    """

    def __init__(self, root: str | Path, split: str, pc_range_m: Sequence[float],
                 augment: AugmentConfig | None = None, classes: Sequence[str] = CLASSES):
        root = Path(root)
        ids = read_split(root, split)
        # every listed frame's files are checked now (missing, truncated, malformed labels and
        # calibrations, unreadable image headers), not when training reaches the frame
        self.kitti = KittiDataset(root, split="training", ids=ids, load_image=False)
        self.kitti.source = str(root / "ImageSets" / f"{split}.txt")
        self.kitti.check()
        self.pc_range = np.asarray(pc_range_m, dtype=np.float32)
        self.augment = augment
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.kitti)

    def _in_range(self, xyz: np.ndarray) -> np.ndarray:
        r = self.pc_range
        return ((xyz[:, 0] >= r[0]) & (xyz[:, 0] < r[3]) & (xyz[:, 1] >= r[1]) & (xyz[:, 1] < r[4])
                & (xyz[:, 2] >= r[2]) & (xyz[:, 2] < r[5]))

    def __getitem__(self, index: int) -> DetectionSample:
        frame = self.kitti[index]
        points = np.asarray(frame.points_lidar, np.float32)
        boxes, labels, _ = frame_targets(frame, self.classes)
        if self.augment is not None:
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
            points, boxes = _augment(points, boxes, rng, self.augment)
        points = points[self._in_range(points)]
        keep = self._in_range(boxes[:, :3])
        return DetectionSample(points, boxes[keep], labels[keep], str(frame.frame_id))
