"""Cameras and calibration. OpenCV camera convention (x right, y down, z forward).

KITTI: a LiDAR point projects into image_2 as `x_img ~ P2 @ R0_rect @ Tr_velo_to_cam @ x_lidar`;
we fold `R0_rect @ Tr_velo_to_cam` into one 4x4 `T_cam_lidar` (LiDAR -> rectified camera).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perception3d.errors import DataError

__all__ = ["KittiCalibration", "project_points", "to_homogeneous"]


def to_homogeneous(points: np.ndarray) -> np.ndarray:
    """`[N, 3] -> [N, 4]` with a trailing 1."""
    return np.concatenate([points, np.ones((points.shape[0], 1), dtype=points.dtype)], axis=1)


def project_points(points_cam: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project camera-frame points `[N, 3]` with a 3x4 (or 3x3) projection matrix.

    Returns `(uv [N, 2] pixels, depth [N] metres)`; points with depth <= 0 get NaN pixels.
    """
    P = np.asarray(P, dtype=np.float64)
    if P.shape == (3, 3):
        P = np.concatenate([P, np.zeros((3, 1))], axis=1)
    x = to_homogeneous(np.asarray(points_cam, dtype=np.float64)) @ P.T
    depth = x[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = x[:, :2] / depth[:, None]
    uv[depth <= 1e-6] = np.nan
    return uv, np.asarray(points_cam)[:, 2]


@dataclass(frozen=True)
class KittiCalibration:
    """KITTI object calibration: `P2 [3, 4]`, `R0_rect [3, 3]`, `Tr_velo_to_cam [3, 4]` (float64)."""

    P2: np.ndarray
    R0_rect: np.ndarray
    Tr_velo_to_cam: np.ndarray

    def __post_init__(self):
        for name, shape in (("P2", (3, 4)), ("R0_rect", (3, 3)), ("Tr_velo_to_cam", (3, 4))):
            m = getattr(self, name)
            if np.asarray(m).shape != shape:
                raise DataError(f"KittiCalibration.{name}: expected shape {shape}, got {np.asarray(m).shape}")
            if not np.isfinite(m).all():
                raise DataError(f"KittiCalibration.{name}: contains NaN or inf")

    @property
    def T_cam_lidar(self) -> np.ndarray:
        """4x4 transform LiDAR -> rectified camera (`R0_rect @ Tr_velo_to_cam`)."""
        R0 = np.eye(4)
        R0[:3, :3] = self.R0_rect
        Tr = np.eye(4)
        Tr[:3, :4] = self.Tr_velo_to_cam
        return R0 @ Tr

    @property
    def T_lidar_cam(self) -> np.ndarray:
        return np.linalg.inv(self.T_cam_lidar)

    def lidar_to_cam(self, points_lidar: np.ndarray) -> np.ndarray:
        """`[N, 3]` LiDAR points -> rectified camera frame."""
        return (to_homogeneous(np.asarray(points_lidar, np.float64)) @ self.T_cam_lidar.T)[:, :3]

    def cam_to_lidar(self, points_cam: np.ndarray) -> np.ndarray:
        """`[N, 3]` rectified camera points -> LiDAR frame."""
        return (to_homogeneous(np.asarray(points_cam, np.float64)) @ self.T_lidar_cam.T)[:, :3]

    def lidar_to_image(self, points_lidar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[N, 3]` LiDAR points -> `(uv [N, 2] pixels in image_2, depth [N] metres)`."""
        return project_points(self.lidar_to_cam(points_lidar), self.P2)

    # --- KITTI text form -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "KittiCalibration":
        """Read a KITTI `calib/XXXXXX.txt` (keys `P2`, `R0_rect`, `Tr_velo_to_cam`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: calibration file not found")
        values: dict[str, np.ndarray] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if ":" not in line:
                raise DataError(f"{path}:{lineno}: expected 'KEY: v1 v2 ...', got {line!r}")
            key, rest = line.split(":", 1)
            try:
                values[key.strip()] = np.array([float(v) for v in rest.split()], dtype=np.float64)
            except ValueError:
                raise DataError(f"{path}:{lineno}: non-numeric value in {key.strip()!r}") from None
        shapes = {"P2": (3, 4), "R0_rect": (3, 3), "Tr_velo_to_cam": (3, 4)}
        mats = {}
        for key, shape in shapes.items():
            if key not in values:
                raise DataError(f"{path}: missing key {key!r} (expected {', '.join(shapes)})")
            if values[key].size != shape[0] * shape[1]:
                raise DataError(f"{path}: {key} has {values[key].size} values, expected {shape[0] * shape[1]}")
            mats[key] = values[key].reshape(shape)
        return cls(**mats)

    def to_file(self, path: str | Path) -> None:
        """Write in KITTI text form (P0-P3 all set to P2, as the generator has one camera)."""
        fmt = lambda m: " ".join(f"{v:.12e}" for v in np.asarray(m).reshape(-1))  # noqa: E731
        lines = [f"P{i}: {fmt(self.P2)}" for i in range(4)]
        lines += [f"R0_rect: {fmt(self.R0_rect)}", f"Tr_velo_to_cam: {fmt(self.Tr_velo_to_cam)}",
                  f"Tr_imu_to_velo: {fmt(np.eye(4)[:3])}"]
        Path(path).write_text("\n".join(lines) + "\n")
