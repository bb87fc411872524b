"""Pictures a person would rather look at than read: BEV and camera views with boxes.

Green = ground truth, red = predictions (score printed), points coloured by height.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from perception3d.geometry.boxes import BOX_EDGES, box_corners  # noqa: E402
from perception3d.geometry.camera import KittiCalibration  # noqa: E402
from perception3d.io.atomic import atomic_path  # noqa: E402

__all__ = ["draw_bev", "draw_camera", "save_figure"]

GT_COLOR = (0.1, 0.85, 0.2)
PRED_COLOR = (1.0, 0.15, 0.15)


def _corners_np(boxes) -> np.ndarray:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 7)
    return box_corners(b).numpy()


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (temp file + rename) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)


def draw_bev(ax, points: np.ndarray, gt_boxes=None, pred_boxes=None, pred_scores=None,
             pc_range_m: Sequence[float] = (0, -40, -3, 70.4, 40, 1), title: str = "") -> None:
    """Bird's-eye view on `ax`: x (forward) up the page, y (left) to the left.

    Args:
        points: `[N, >=3]` LiDAR points.
        gt_boxes, pred_boxes: `[M, 7]` LiDAR boxes (or None).
        pred_scores: `[K]` scores printed beside predictions.
        pc_range_m: `(x0, y0, z0, x1, y1, z1)` shown.
    """
    x0, y0, z0, x1, y1, z1 = pc_range_m
    p = np.asarray(points)
    keep = (p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)
    p = p[keep]
    ax.set_facecolor("black")
    ax.scatter(-p[:, 1], p[:, 0], s=0.15, c=np.clip(p[:, 2], z0, z1), cmap="viridis", linewidths=0)
    for boxes, color, scores in ((gt_boxes, GT_COLOR, None), (pred_boxes, PRED_COLOR, pred_scores)):
        if boxes is None or len(boxes) == 0:
            continue
        corners = _corners_np(boxes)
        for i, c in enumerate(corners):
            poly = c[[0, 1, 2, 3, 0], :2]
            ax.plot(-poly[:, 1], poly[:, 0], color=color, lw=0.9)
            front = c[[0, 1], :2].mean(0)  # heading marker: centre -> front face
            ctr = c[:4, :2].mean(0)
            ax.plot([-ctr[1], -front[1]], [ctr[0], front[0]], color=color, lw=0.9)
            if scores is not None:
                ax.text(-c[:, 1].min(), c[:, 0].max(), f"{float(scores[i]):.2f}", color=color, fontsize=5)
    ax.set_xlim(-y1, -y0)
    ax.set_ylim(x0, x1)
    ax.set_aspect("equal")
    ax.set_xlabel("-y (m, left is +y)")
    ax.set_ylabel("x (m, forward)")
    if title:
        ax.set_title(title, fontsize=9)


def _clip_segment_near(a: np.ndarray, b: np.ndarray, near: float = 0.1):
    """Clip a camera-frame segment to z >= near; None if wholly behind."""
    if a[2] < near and b[2] < near:
        return None
    if a[2] < near or b[2] < near:
        t = (near - a[2]) / (b[2] - a[2])
        m = a + t * (b - a)
        a, b = (m, b) if a[2] < near else (a, m)
    return a, b


def draw_camera(ax, image: np.ndarray, calib: KittiCalibration, gt_boxes=None, pred_boxes=None,
                title: str = "") -> None:
    """Image with LiDAR-frame boxes projected through `calib` (edges clipped at the near plane)."""
    h, w = image.shape[:2]
    ax.imshow(image)
    P = calib.P2
    for boxes, color in ((gt_boxes, GT_COLOR), (pred_boxes, PRED_COLOR)):
        if boxes is None or len(boxes) == 0:
            continue
        for c in _corners_np(boxes):
            cam = calib.lidar_to_cam(c)
            for i, j in BOX_EDGES:
                seg = _clip_segment_near(cam[i], cam[j])
                if seg is None:
                    continue
                uv = np.stack([P[:, :3] @ s + P[:, 3] for s in seg])
                uv = uv[:, :2] / uv[:, 2:3]
                ax.plot(uv[:, 0], uv[:, 1], color=color, lw=0.8)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
