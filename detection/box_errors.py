"""Diagnostics of 3D detections in the LiDAR frame (numpy + torch): how precise the found boxes are.

Inputs are one `FrameGT` and one `structures.Detections3D` per frame, boxes in the LiDAR frame
(`(x, y, z, dx, dy, dz, yaw)`, see `perception3d/design.md`). A label id is a position in
`class_names`, which defaults to the evaluated `classes` themselves.

The benchmark numbers are elsewhere: the KITTI evaluation in `perception3d.metrics.kitti` (the
devkit's algorithm) and the nuScenes one in `perception3d.metrics.nuscenes`. These are ours.

Box errors (`box_errors`)
    * How precise the found boxes are, apart from whether they are found: greedy matching by
      descending score on BEV centre distance below `max_dist_m` (2 m, nuScenes' TP threshold),
      over GT with `0 <= difficulty <= max_difficulty` (default 1: KITTI moderate, easy
      included; `kitti_difficulty`); each matched GT gives the errors of its detection.
      Reported as medians over the matched GT of a class: BEV centre distance (m), |z| centre
      difference (m), size error `1 - IoU` of the two boxes aligned at one centre and heading
      (nuScenes' ASE), its parts |length|, |width| and |height| differences (m), and heading
      difference (rad, in `[0, pi]`, no direction ambiguity). Unlike nuScenes' TP metrics these
      are not weighted by recall.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from detection.structures import CLASSES
from perception3d.structures import Boxes3D, Detections3D

__all__ = ["FrameGT", "DIFFICULTIES", "kitti_difficulty", "box_errors"]

DIFFICULTIES = ("easy", "moderate", "hard")
_MIN_HEIGHT_PX = (40.0, 25.0, 25.0)
_MAX_OCCLUSION = (0, 1, 2)
_MAX_TRUNCATION = (0.15, 0.30, 0.50)


def _as_tensor(x, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, Boxes3D):
        x = x.tensor
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{name}: expected a tensor or array, got {type(x).__name__}") from None
    return x.detach().to("cpu", dtype)


@dataclass(frozen=True)
class FrameGT:
    """Ground truth of one frame.

    Attributes:
        boxes: `[M, 7]` LiDAR boxes (tensor, array or `Boxes3D`), stored as float64 tensor.
        labels: `[M]` int class ids (index into the evaluation's `class_names`).
        difficulty: `[M]` int, 0 easy, 1 moderate, 2 hard, -1 not counted at any difficulty
            (see `kitti_difficulty`); `None` means all 0 (every box counts everywhere).
        bbox2d: optional `[M, 4]` image boxes `(x1, y1, x2, y2)` pixels (informational).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    difficulty: torch.Tensor | None = None
    bbox2d: torch.Tensor | None = None

    def __post_init__(self):
        boxes = _as_tensor(self.boxes, "FrameGT.boxes", torch.float64)
        if boxes.dim() != 2 or boxes.shape[1] != 7:
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 7)
            else:
                raise DataError(f"FrameGT.boxes: expected shape [M, 7], got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise DataError("FrameGT.boxes: contains NaN or inf")
        m = boxes.shape[0]
        labels = _as_tensor(self.labels, "FrameGT.labels", torch.int64).reshape(-1)
        if labels.shape != (m,):
            raise DataError(f"FrameGT.labels: expected shape ({m},), got {tuple(labels.shape)}")
        diff = self.difficulty
        diff = torch.zeros(m, dtype=torch.int64) if diff is None else _as_tensor(
            diff, "FrameGT.difficulty", torch.int64).reshape(-1)
        if diff.shape != (m,):
            raise DataError(f"FrameGT.difficulty: expected shape ({m},), got {tuple(diff.shape)}")
        if ((diff < -1) | (diff > 2)).any():
            raise DataError("FrameGT.difficulty: expected values in {-1, 0, 1, 2}")
        bbox2d = self.bbox2d
        if bbox2d is not None:
            bbox2d = _as_tensor(bbox2d, "FrameGT.bbox2d", torch.float64)
            if bbox2d.shape != (m, 4):
                raise DataError(f"FrameGT.bbox2d: expected shape ({m}, 4), got {tuple(bbox2d.shape)}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "difficulty", diff)
        object.__setattr__(self, "bbox2d", bbox2d)

    def __len__(self) -> int:
        return self.boxes.shape[0]


def kitti_difficulty(bbox_height_px, occlusion, truncation):
    """KITTI difficulty of each GT object: the easiest level whose limits it meets.

    Limits (official devkit): easy: height > 40 px, occlusion <= 0, truncation <= 0.15;
    moderate: height > 25, occlusion <= 1, truncation <= 0.30; hard: height > 25,
    occlusion <= 2, truncation <= 0.50. Heights must be strictly greater than the minimum (the
    devkit ignores `height <= MIN_HEIGHT`).

    Args:
        bbox_height_px: `[M]` 2D box heights `y2 - y1`, pixels.
        occlusion: `[M]` KITTI occlusion state (0 visible .. 3 unknown).
        truncation: `[M]` truncation fraction in [0, 1].

    Returns:
        `[M]` int64: 0 easy, 1 moderate, 2 hard, -1 none. A torch tensor if `bbox_height_px`
        is one, else a numpy array.
    """
    is_torch = isinstance(bbox_height_px, torch.Tensor)
    h = np.asarray(bbox_height_px.detach().cpu() if is_torch else bbox_height_px, np.float64).reshape(-1)
    occ = np.asarray(occlusion.detach().cpu() if isinstance(occlusion, torch.Tensor) else occlusion,
                     np.float64).reshape(-1)
    tr = np.asarray(truncation.detach().cpu() if isinstance(truncation, torch.Tensor) else truncation,
                    np.float64).reshape(-1)
    if not (h.shape == occ.shape == tr.shape):
        raise DataError(f"kitti_difficulty: bbox_height_px {h.shape}, occlusion {occ.shape} and "
                        f"truncation {tr.shape} must have the same length")
    out = np.full(h.shape, -1, dtype=np.int64)
    for level in (2, 1, 0):  # later (easier) levels overwrite
        ok = (h > _MIN_HEIGHT_PX[level]) & (occ <= _MAX_OCCLUSION[level]) & (tr <= _MAX_TRUNCATION[level])
        out[ok] = level
    return torch.from_numpy(out) if is_torch else out


def _check_inputs(gts, dets, classes, class_names):
    if len(gts) != len(dets):
        raise DataError(f"gts and dets: expected one entry per frame each, got {len(gts)} and {len(dets)}")
    for i, (g, d) in enumerate(zip(gts, dets)):
        if not isinstance(g, FrameGT):
            raise DataError(f"gts[{i}]: expected a FrameGT, got {type(g).__name__}")
        if not isinstance(d, Detections3D):
            raise DataError(f"dets[{i}]: expected a Detections3D, got {type(d).__name__}")
    if class_names is None:
        class_names = tuple(classes)
    ids = {}
    for c in classes:
        if c not in class_names:
            raise DataError(f"classes: {c!r} is not in class_names {tuple(class_names)}")
        ids[c] = list(class_names).index(c)
    return ids


def _greedy_match(sim: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy one-to-one matching by descending score.

    Args:
        sim: `[D, G]` similarity (IoU, or minus the distance); a pair can match if `sim > threshold`.
        scores: `[D]` detection scores.
        threshold: similarity threshold (strict).

    Returns:
        `[D]` int64 index of the matched GT, -1 for none.
    """
    d, g = sim.shape
    matched = np.full(d, -1, dtype=np.int64)
    if d == 0 or g == 0:
        return matched
    cand = sim > threshold
    has = cand.any(axis=1)
    if not has.any():
        return matched
    taken = np.zeros(g, dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        if not has[i]:
            continue
        s = np.where(cand[i] & ~taken, sim[i], -np.inf)
        j = int(np.argmax(s))
        if s[j] == -np.inf:
            continue
        matched[i] = j
        taken[j] = True
    return matched


def _per_class_matches(gts, dets, label: int, pair_fn: Callable, threshold: float):
    """Match each frame for one class. Returns a list with, per frame,
    `(gt_boxes [G,7], gt_diff [G], det_boxes [D,7], det_scores [D], matched [D])`."""
    out = []
    for g, d in zip(gts, dets):
        gm = g.labels == label
        gt_boxes, gt_diff = g.boxes[gm], g.difficulty[gm]
        dm = (d.labels.detach().cpu() == label)
        det_boxes = d.boxes.tensor.detach().cpu().to(torch.float64)[dm]
        det_scores = d.scores.detach().cpu().to(torch.float64)[dm].numpy()
        if gt_boxes.shape[0] and det_boxes.shape[0]:
            sim = pair_fn(det_boxes, gt_boxes).numpy()
            matched = _greedy_match(sim, det_scores, threshold)
        else:
            matched = np.full(det_boxes.shape[0], -1, dtype=np.int64)
        out.append((gt_boxes, gt_diff, det_boxes, det_scores, matched))
    return out


def _neg_bev_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minus the BEV centre distance of every box pair, the similarity of nuScenes matching."""
    return -torch.cdist(a[:, :2], b[:, :2])


def box_errors(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    max_dist_m: float = 2.0,
    max_difficulty: int = 1,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Median errors of matched boxes per class (rules in the module docstring).

    Args:
        gts: one `FrameGT` per frame.
        dets: one `Detections3D` per frame.
        classes: class names to evaluate.
        max_dist_m: BEV centre distance below which a detection can match a GT, metres.
        max_difficulty: GT with `0 <= difficulty <= max_difficulty` are evaluated.
        class_names: label id -> name; None: `classes` itself.

    Returns:
        `{class: {"matched": n, "centre_bev_m", "z_m", "size", "length_m", "width_m", "height_m",
        "yaw_rad": medians}}`; the medians
        are `nan` for a class without a matched GT.
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    if not max_dist_m > 0:
        raise DataError(f"max_dist_m: expected a positive distance in metres, got {max_dist_m!r}")

    result: dict = {}
    for c in classes:
        pairs = []
        frames = _per_class_matches(gts, dets, ids[c], _neg_bev_distance, -max_dist_m)
        for gt_boxes, gt_diff, det_boxes, _, matched in frames:
            hit = matched >= 0
            keep = hit.copy()
            diff = gt_diff[matched[hit]]
            keep[hit] = ((diff >= 0) & (diff <= max_difficulty)).numpy()
            pairs.append((det_boxes[keep], gt_boxes[matched[keep]]))  # both float64
        det = torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0, 7, dtype=torch.float64)
        gt = torch.cat([p[1] for p in pairs]) if pairs else torch.zeros(0, 7, dtype=torch.float64)
        inter = torch.minimum(det[:, 3:6], gt[:, 3:6]).prod(1)
        aligned_iou = inter / (det[:, 3:6].prod(1) + gt[:, 3:6].prod(1) - inter)
        yaw = torch.remainder(det[:, 6] - gt[:, 6], 2 * math.pi)
        errors = {
            "centre_bev_m": (det[:, :2] - gt[:, :2]).norm(dim=1),
            "z_m": (det[:, 2] - gt[:, 2]).abs(),
            "size": 1.0 - aligned_iou,
            **{f"{n}_m": (det[:, 3 + i] - gt[:, 3 + i]).abs() for i, n in enumerate(("length", "width", "height"))},
            "yaw_rad": torch.minimum(yaw, 2 * math.pi - yaw),
        }
        result[c] = {"matched": int(det.shape[0]),
                     **{k: float(np.median(v.numpy())) if v.numel() else float("nan") for k, v in errors.items()}}
    return result
