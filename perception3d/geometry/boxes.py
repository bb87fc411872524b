"""Box geometry: corners, KITTI-camera converters, points in boxes, image projections.

Boxes follow `perception3d/design.md`: `[N, 7] = (x, y, z, dx, dy, dz, yaw)` in the LiDAR frame,
`(x, y, z)` the box centre, `dx` the length along the heading, `yaw` about +z from +x towards +y.
KITTI camera boxes are `[N, 7] = (x, y, z, h, w, l, rotation_y)` with `(x, y, z)` the *bottom*
centre in the rectified camera frame (OpenCV axes: x right, y down, z forward) and `rotation_y`
about camera +y (0 = heading along camera +x).

All functions take and return torch tensors and follow the input's device and dtype (float64
is used internally where a calibration matrix is involved, and the result is cast back).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.geometry.camera import KittiCalibration

__all__ = [
    "BOX_EDGES",
    "box_corners",
    "boxes_lidar_to_kitti_camera",
    "kitti_camera_to_boxes_lidar",
    "points_in_boxes",
    "points_in_boxes_count",
    "limit_period",
    "box_to_image_bbox",
]

# Corner signs in the box frame (x along the heading, y to the left, z up). Bottom face first,
# counter-clockwise seen from above: front-right, front-left, rear-left, rear-right; then the top.
_CORNER_SIGNS = (
    (1.0, -1.0, -1.0), (1.0, 1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, -1.0),
    (1.0, -1.0, 1.0), (1.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (-1.0, -1.0, 1.0),
)

#: The 12 edges of a box as pairs of corner indices into `box_corners` output.
BOX_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 0),  # bottom
    (4, 5), (5, 6), (6, 7), (7, 4),  # top
    (0, 4), (1, 5), (2, 6), (3, 7),  # vertical
)


def _check_boxes(boxes, name: str = "boxes") -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        raise DataError(f"{name}: expected a torch.Tensor of shape [N, 7], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 7:
        raise DataError(f"{name}: expected shape [N, 7], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise DataError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    return boxes


def _check_points(points, name: str = "points") -> torch.Tensor:
    if not isinstance(points, torch.Tensor):
        raise DataError(f"{name}: expected a torch.Tensor of shape [N, >=3], got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] < 3:
        raise DataError(f"{name}: expected shape [N, >=3] (x, y, z, ...), got {tuple(points.shape)}")
    return points


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """The 8 corners of each box.

    Corner order (box frame: x along the heading, y left, z up): bottom face first, counter-
    clockwise seen from above, starting front-right: 0 (+x,-y,-z), 1 (+x,+y,-z), 2 (-x,+y,-z),
    3 (-x,-y,-z); then the top face in the same order: 4..7 = 0..3 with +z. Edges: `BOX_EDGES`.

    Args:
        boxes: `[N, 7]` LiDAR boxes `(x, y, z, dx, dy, dz, yaw)`, metres and radians.

    Returns:
        `[N, 8, 3]` corner coordinates in the LiDAR frame, metres (same dtype/device as boxes).
    """
    boxes = _check_boxes(boxes)
    signs = torch.tensor(_CORNER_SIGNS, dtype=boxes.dtype, device=boxes.device)  # [8, 3]
    local = signs[None] * (0.5 * boxes[:, None, 3:6])  # [N, 8, 3]
    c, s = torch.cos(boxes[:, 6])[:, None], torch.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return torch.stack([x, y, local[..., 2]], dim=-1) + boxes[:, None, :3]


def limit_period(angle, offset: float = 0.5, period: float = 2 * math.pi):
    """Wrap angles into `[-offset * period, (1 - offset) * period)`.

    With the defaults the result lies in `[-pi, pi)`; `offset=0` gives `[0, period)`.

    Args:
        angle: tensor, numpy array or float, radians.
        offset: fraction of the period below zero.
        period: the period, radians.

    Returns:
        Same type and shape as `angle`.
    """
    if isinstance(angle, torch.Tensor):
        return angle - torch.floor(angle / period + offset) * period
    return angle - np.floor(np.asarray(angle) / period + offset) * period


def _calib_matrix(calib: KittiCalibration, device, name: str = "calib") -> torch.Tensor:
    if not isinstance(calib, KittiCalibration):
        raise DataError(f"{name}: expected a KittiCalibration, got {type(calib).__name__}")
    return torch.as_tensor(calib.T_cam_lidar, dtype=torch.float64, device=device)


def boxes_lidar_to_kitti_camera(boxes: torch.Tensor, calib: KittiCalibration) -> torch.Tensor:
    """LiDAR boxes -> KITTI camera boxes `(x, y, z, h, w, l, rotation_y)`.

    The bottom centre (box centre minus `dz / 2` along LiDAR z) is mapped with
    `calib.T_cam_lidar`; the heading direction `(cos yaw, sin yaw, 0)` is rotated into the camera
    frame and `rotation_y = atan2(-d_z, d_x)` (KITTI's heading `(cos ry, 0, -sin ry)`), so any
    extrinsics whose camera y axis is roughly LiDAR -z work, not just the standard
    `ry = -yaw - pi/2`. Sizes: `h = dz`, `w = dy`, `l = dx`.

    Args:
        boxes: `[N, 7]` LiDAR boxes, metres / radians.
        calib: KITTI calibration (`T_cam_lidar` maps LiDAR to the rectified camera).

    Returns:
        `[N, 7]` camera boxes; `rotation_y` wrapped into `[-pi, pi)`.
    """
    boxes = _check_boxes(boxes)
    T = _calib_matrix(calib, boxes.device)
    b = boxes.to(torch.float64)
    bottom = b[:, :3].clone()
    bottom[:, 2] -= 0.5 * b[:, 5]
    xyz_cam = bottom @ T[:3, :3].T + T[:3, 3]
    heading = torch.stack([torch.cos(b[:, 6]), torch.sin(b[:, 6]), torch.zeros_like(b[:, 6])], dim=1)
    d = heading @ T[:3, :3].T
    ry = limit_period(torch.atan2(-d[:, 2], d[:, 0]))
    out = torch.cat([xyz_cam, b[:, 5:6], b[:, 4:5], b[:, 3:4], ry[:, None]], dim=1)
    return out.to(boxes.dtype)


def kitti_camera_to_boxes_lidar(boxes_cam: torch.Tensor, calib: KittiCalibration) -> torch.Tensor:
    """KITTI camera boxes `(x, y, z, h, w, l, rotation_y)` -> LiDAR boxes. Exact inverse of
    `boxes_lidar_to_kitti_camera`.

    The yaw is the LiDAR-plane direction `(cos yaw, sin yaw, 0)` whose image in the camera frame
    has the heading `rotation_y` in the camera x-z plane, i.e. it is perpendicular (after the
    rotation) to `(sin ry, 0, cos ry)` and points along `(cos ry, 0, -sin ry)`.

    Args:
        boxes_cam: `[N, 7]` KITTI camera boxes: bottom centre (metres, rectified camera frame),
            `h, w, l` (metres), `rotation_y` (radians).
        calib: KITTI calibration.

    Returns:
        `[N, 7]` LiDAR boxes `(x, y, z, dx, dy, dz, yaw)`; `yaw` wrapped into `[-pi, pi)`.
    """
    boxes_cam = _check_boxes(boxes_cam, "boxes_cam")
    T = _calib_matrix(calib, boxes_cam.device)
    b = boxes_cam.to(torch.float64)
    R = T[:3, :3]
    T_inv = torch.linalg.inv(T)  # not R^T: KITTI's stored rotations are not exactly orthonormal
    bottom = b[:, :3] @ T_inv[:3, :3].T + T_inv[:3, 3]
    h, w, l, ry = b[:, 3], b[:, 4], b[:, 5], b[:, 6]
    center = bottom.clone()
    center[:, 2] += 0.5 * h
    cr, sr = torch.cos(ry), torch.sin(ry)
    zero = torch.zeros_like(ry)
    # n . (R v) = (R^T n) . v, so these dot-product tests need R^T (not R^-1).
    normal_l = torch.stack([sr, zero, cr], dim=1) @ R  # R^T n: [N, 3]
    heading_l = torch.stack([cr, zero, -sr], dim=1) @ R  # R^T m
    # Direction in the LiDAR x-y plane perpendicular to normal_l's x-y part.
    dx_, dy_ = -normal_l[:, 1], normal_l[:, 0]
    flip = (dx_ * heading_l[:, 0] + dy_ * heading_l[:, 1]) < 0
    dx_ = torch.where(flip, -dx_, dx_)
    dy_ = torch.where(flip, -dy_, dy_)
    yaw = limit_period(torch.atan2(dy_, dx_))
    out = torch.stack([center[:, 0], center[:, 1], center[:, 2], l, w, h, yaw], dim=1)
    return out.to(boxes_cam.dtype)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Which points lie inside which boxes (boundary included).

    Args:
        points: `[N, >=3]` LiDAR points, metres (extra columns such as intensity are ignored).
        boxes: `[M, 7]` LiDAR boxes.
        chunk_size: points processed at a time (memory ~ `chunk_size * M * 3` values); None:
            about 2**22 / M.

    Returns:
        `[N, M]` bool, `True` where point n is inside box m.
    """
    points = _check_points(points)
    boxes = _check_boxes(boxes)
    n, m = points.shape[0], boxes.shape[0]
    out = torch.zeros((n, m), dtype=torch.bool, device=points.device)
    if n == 0 or m == 0:
        return out
    dtype = torch.promote_types(points.dtype, boxes.dtype) if points.is_floating_point() else boxes.dtype
    b = boxes.to(dtype)
    c, s = torch.cos(b[:, 6]), torch.sin(b[:, 6])  # [M]
    half = 0.5 * b[:, 3:6]  # [M, 3]
    if chunk_size is None:
        chunk_size = max(1024, (1 << 22) // m)
    for start in range(0, n, chunk_size):
        p = points[start:start + chunk_size, :3].to(dtype)
        rel = p[:, None, :] - b[None, :, :3]  # [n, M, 3]
        lx = rel[..., 0] * c + rel[..., 1] * s  # rotate by -yaw
        ly = -rel[..., 0] * s + rel[..., 1] * c
        out[start:start + chunk_size] = (
            (lx.abs() <= half[:, 0]) & (ly.abs() <= half[:, 1]) & (rel[..., 2].abs() <= half[:, 2])
        )
    return out


def points_in_boxes_count(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Number of points inside each box.

    Args:
        points: `[N, >=3]` LiDAR points.
        boxes: `[M, 7]` LiDAR boxes.

    Returns:
        `[M]` int64 counts.
    """
    return points_in_boxes(points, boxes).sum(dim=0)


def box_to_image_bbox(
    boxes: torch.Tensor,
    calib: KittiCalibration,
    image_size: Sequence[int],
    near_m: float = 0.1,
) -> torch.Tensor:
    """Axis-aligned 2D image box of each 3D box in image_2.

    The 12 box edges are clipped against the plane `z_cam = near_m` (the parts behind it are
    dropped, the crossing points added), the surviving points are projected with `calib.P2`, and
    their extent is clipped to the image `[0, W-1] x [0, H-1]` (KITTI's label convention).
    Boxes with nothing in front of the near plane come out as `(0, 0, 0, 0)`; a box wholly
    outside the image gets zero width or height after clipping. No NaN is produced.

    Args:
        boxes: `[N, 7]` LiDAR boxes.
        calib: KITTI calibration.
        image_size: `(W, H)` in pixels.
        near_m: near-plane depth, metres (> 0).

    Returns:
        `[N, 4]` `(x1, y1, x2, y2)` pixels, same dtype as `boxes`.
    """
    boxes = _check_boxes(boxes)
    if len(image_size) != 2 or min(image_size) <= 0:
        raise DataError(f"image_size: expected (W, H) positive, got {tuple(image_size)}")
    if not near_m > 0:
        raise DataError(f"near_m: expected a positive depth in metres, got {near_m}")
    W, H = float(image_size[0]), float(image_size[1])
    T = _calib_matrix(calib, boxes.device)
    P = torch.as_tensor(calib.P2, dtype=torch.float64, device=boxes.device)
    n = boxes.shape[0]
    if n == 0:
        return boxes.new_zeros((0, 4))
    corners = box_corners(boxes.to(torch.float64))  # [N, 8, 3]
    cam = corners @ T[:3, :3].T + T[:3, 3]
    edges = torch.tensor(BOX_EDGES, device=boxes.device)
    p0, p1 = cam[:, edges[:, 0]], cam[:, edges[:, 1]]  # [N, 12, 3]
    z0, z1 = p0[..., 2], p1[..., 2]
    cross = (z0 - near_m) * (z1 - near_m) < 0
    denom = torch.where(cross, z1 - z0, torch.ones_like(z0))
    t = ((near_m - z0) / denom).clamp(0, 1)
    hit = p0 + t[..., None] * (p1 - p0)  # [N, 12, 3]
    pts = torch.cat([cam, hit], dim=1)  # [N, 20, 3]
    valid = torch.cat([cam[..., 2] >= near_m, cross], dim=1)  # [N, 20]
    homo = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1) @ P.T  # [N, 20, 3]
    depth = torch.where(valid, homo[..., 2], torch.ones_like(homo[..., 2]))
    uv = homo[..., :2] / depth[..., None]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=boxes.device)
    lo = torch.where(valid[..., None], uv, inf).amin(dim=1)
    hi = torch.where(valid[..., None], uv, -inf).amax(dim=1)
    any_valid = valid.any(dim=1)
    x1 = lo[:, 0].clamp(0, W - 1)
    y1 = lo[:, 1].clamp(0, H - 1)
    x2 = torch.maximum(hi[:, 0].clamp(0, W - 1), x1)
    y2 = torch.maximum(hi[:, 1].clamp(0, H - 1), y1)
    out = torch.stack([x1, y1, x2, y2], dim=1)
    out = torch.where(any_valid[:, None], out, torch.zeros_like(out))
    return out.to(boxes.dtype)
