"""KITTI-style and nuScenes-style 3D detection metrics (CPU, numpy + torch).

Inputs are one `FrameGT` and one `structures.Detections3D` per frame, boxes in the LiDAR frame
(`(x, y, z, dx, dy, dz, yaw)`, see `perception3d/design.md`). A label id is a position in
`class_names`, which defaults to the evaluated `classes` themselves (so with the default classes,
`structures.CLASSES`: Car 0, Pedestrian 1, Cyclist 2). All APs are in percent (0-100).

KITTI (`kitti_ap`, `kitti_ap_by_distance`)
    * Matching, per frame and class: detections are visited by descending score; each takes the
      unmatched GT box of its class with the highest IoU, if that IoU is strictly above the
      class threshold (KITTI's `overlap > min_overlap`). One detection per GT, one GT per
      detection. Matching is done once, over all GT of the class, and then scored for each
      difficulty (or distance bin).
    * Scoring for a difficulty `d`: GT with `0 <= difficulty <= d` are *valid* (moderate
      includes easy); the other GT of the class (harder ones, and `difficulty == -1`) are
      *ignored*. A detection matched to a valid GT is a TP, one matched to an ignored GT is
      neither TP nor FP, an unmatched one is an FP. Only valid GT count towards recall.
    * Simplifications (documented deviations from the official devkit): no "neighbouring
      class" rule (a Car detection on a Van is an FP), no DontCare regions, no minimum 2D height
      filter on detections; a detection matched to an ignored GT can in rare crowded cases hide
      a valid GT it also overlapped (the devkit re-matches per difficulty).
    * Precision-recall: detections with equal scores enter together (the curve is evaluated
      only at distinct score thresholds). AP R40: mean over recall positions `r = 1/40, ..., 1`
      of the interpolated precision `max{precision at recall >= r}` (0 if recall r is never
      reached). `num_recall_points=11` gives the old R11 positions `0, 0.1, ..., 1`.
    * Recall (`kitti_recall`): the share of valid GT matched by any detection, whatever its
      score: the highest recall the curve reaches. R40 loses every position above it, so a
      recall just below a multiple of 1/40 (say 0.974) costs up to 2.5 AP points that one more
      found box (0.975) would bring back: it tells an AP difference from a ranking difference.
    * Missed objects (`missed_objects`): the valid GT no detection matches, each with its best
      IoU and that box's score; `tools/eval.py` writes them to `missed.csv`.
    * By distance: valid GT are those whose BEV range `hypot(x, y)` from the sensor lies in
      `[lo, hi)`; GT outside are ignored. Unmatched detections outside the bin are ignored
      (not FP); a detection matched to a valid GT is a TP wherever its own centre lies.

nuScenes (`nuscenes_map`)
    * Matching by BEV centre distance, greedy by descending score (ties: input order): each
      detection takes the closest unmatched GT of its class with distance `< threshold`.
    * Precision and recall after every detection are linearly interpolated (`np.interp`, no
      monotone envelope, precision 0 beyond the largest recall) at the 101 recall points
      `0, 0.01, ..., 1`; AP = mean over the points with recall > 0.1 (indices 11..100) of
      `max(0, (precision - 0.1) / (1 - 0.1))` -- the nuScenes devkit's normalisation.
    * GT with `difficulty == -1` are ignored (not counted; detections matched to them are
      dropped), e.g. to mark boxes outside the evaluated range; other difficulties are unused.
    * No nuScenes attribute/velocity/TP-error metrics and no built-in range filtering.

Box errors (`box_errors`)
    * How precise the found boxes are, apart from whether they are found: the nuScenes matching
      at 2 m BEV centre distance, over GT with `0 <= difficulty <= max_difficulty` (default 1:
      KITTI moderate, easy included); each matched GT gives the errors of its detection (the
      highest-scoring one in reach). Reported as medians over the matched GT of a class: BEV
      centre distance (m), |z| centre difference (m), size error `1 - IoU` of the two boxes
      aligned at one centre and heading (nuScenes' ASE), its parts |length|, |width| and
      |height| differences (m), and heading difference (rad, in `[0, pi]`, no direction
      ambiguity). Unlike nuScenes' TP metrics these are not weighted by
      recall.

AP interval (`kitti_ap_interval`)
    * A percentile bootstrap over frames: the frames are drawn with replacement, the AP of the
      draw computed from the same per-frame matches, and the central share of the draws' APs
      reported. It is the evaluation set's sampling noise, not the spread between training runs.
      With a baseline (other detections of the same frames) it is the interval of the AP
      difference, both APs computed on the same draws (paired).

Oracle AP (`oracle_ap`)
    * Where the KITTI AP is lost: the AP again, with one part of every detection replaced by
      that of the nearest GT box of its class (BEV centre distance below `max_dist_m`, any
      difficulty; a detection with none in reach keeps its box). Parts: `xy` (BEV centre), `z`,
      `length`, `width`, `height`, `size` (all three), `z_height` (z and height) and `yaw`. The
      rise over the plain AP is what that part's errors cost; scores, labels and the matching
      rules are unchanged, so a duplicate detection stays a false positive.

A class with no valid GT gets AP `nan`; the means skip `nan`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.geometry.iou import iou_3d, iou_bev
from perception3d.structures import CLASSES, Boxes3D, Detections3D

__all__ = [
    "FrameGT",
    "DIFFICULTIES",
    "kitti_difficulty",
    "kitti_ap",
    "kitti_ap_by_distance",
    "kitti_ap_interval",
    "kitti_recall",
    "missed_objects",
    "nuscenes_map",
    "box_errors",
    "oracle_ap",
    "ORACLE_PARTS",
    "average_precision_r40",
]

DIFFICULTIES = ("easy", "moderate", "hard")
_MIN_HEIGHT_PX = (40.0, 25.0, 25.0)
_MAX_OCCLUSION = (0, 1, 2)
_MAX_TRUNCATION = (0.15, 0.30, 0.50)
_DEFAULT_IOU = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}


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


# --- shared machinery ------------------------------------------------------------------------
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


def average_precision_r40(scores: np.ndarray, is_tp: np.ndarray, num_gt: int,
                          num_recall_points: int = 40) -> float:
    """KITTI interpolated AP from scored detections, in percent.

    Args:
        scores: `[D]` scores of the counted (non-ignored) detections.
        is_tp: `[D]` bool, True for true positives.
        num_gt: number of valid GT boxes.
        num_recall_points: 40 for R40 (positions `1/40..1`); 11 for R11 (`0, 0.1, .., 1`).

    Returns:
        AP in [0, 100]; `nan` if `num_gt == 0`.
    """
    if num_gt <= 0:
        return float("nan")
    scores = np.asarray(scores, np.float64)
    is_tp = np.asarray(is_tp, bool)
    if num_recall_points == 11:
        positions = np.linspace(0.0, 1.0, 11)
    else:
        positions = np.arange(1, num_recall_points + 1) / num_recall_points
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], is_tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    # Evaluate only at the last detection of each group of equal scores.
    last = np.append(s[1:] != s[:-1], True)
    prec = (ctp / (ctp + cfp))[last]
    rec = (ctp / num_gt)[last]
    prec_env = np.maximum.accumulate(prec[::-1])[::-1]  # max precision at recall >= here
    idx = np.searchsorted(rec, positions - 1e-12, side="left")  # rec is non-decreasing
    interp = np.where(idx < rec.size, prec_env[np.minimum(idx, rec.size - 1)], 0.0)
    return float(np.mean(interp) * 100.0)


def _nan_mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


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


def _frame_tallies(frames, gt_valid_fn, det_outside_fn) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per frame, what one setting counts: `(scores [K], is_tp [K], valid GT)` of its counted
    detections. `gt_valid_fn(gt_boxes, gt_diff) -> [G] bool`, `det_outside_fn(det_boxes) -> [D]
    bool` (unmatched detections there are ignored)."""
    out = []
    for gt_boxes, gt_diff, det_boxes, det_scores, matched in frames:
        valid = gt_valid_fn(gt_boxes, gt_diff).numpy()
        hit = matched >= 0
        tp = np.zeros_like(hit)
        tp[hit] = valid[matched[hit]]
        outside = det_outside_fn(det_boxes).numpy()
        # TP, or unmatched and inside the evaluated region (FP). Matched to an ignored GT, or
        # unmatched outside the region: neither, dropped.
        counted = tp | (~hit & ~outside)
        out.append((det_scores[counted], tp[counted], int(valid.sum())))
    return out


def _tallies_ap(tallies, num_recall_points) -> float:
    scores = np.concatenate([t[0] for t in tallies]) if tallies else np.zeros(0)
    tps = np.concatenate([t[1] for t in tallies]) if tallies else np.zeros(0, dtype=bool)
    return average_precision_r40(scores, tps, sum(t[2] for t in tallies), num_recall_points)


def _score(frames, gt_valid_fn, det_outside_fn, num_recall_points) -> float:
    """AP for one setting (arguments as for `_frame_tallies`)."""
    return _tallies_ap(_frame_tallies(frames, gt_valid_fn, det_outside_fn), num_recall_points)


def _difficulty_level(difficulty: str) -> int:
    if difficulty not in DIFFICULTIES:
        raise DataError(f"difficulty: expected one of {DIFFICULTIES}, got {difficulty!r}")
    return DIFFICULTIES.index(difficulty)


def _iou_fn(metric: str) -> Callable:
    if metric == "3d":
        return iou_3d
    if metric == "bev":
        return iou_bev
    raise DataError(f"metric: expected '3d' or 'bev', got {metric!r}")


def _thresholds(classes, iou_thresholds) -> dict:
    thr = {}
    for c in classes:
        if c not in iou_thresholds:
            raise DataError(f"iou_thresholds: no threshold for class {c!r}")
        t = float(iou_thresholds[c])
        if not 0.0 <= t < 1.0:
            raise DataError(f"iou_thresholds[{c!r}]: expected a value in [0, 1), got {t}")
        thr[c] = t
    return thr


def _by_difficulty(gts, dets, classes, iou_thresholds, metric, class_names, reduce: Callable) -> dict:
    """`{class: {difficulty: reduce(tallies)}}`: each class matched once, then the per-frame
    tallies (`_frame_tallies`) of each KITTI difficulty reduced to one number."""
    ids = _check_inputs(gts, dets, classes, class_names)
    pair_fn = _iou_fn(metric)
    thr = _thresholds(classes, iou_thresholds)
    result: dict = {}
    for c in classes:
        frames = _per_class_matches(gts, dets, ids[c], pair_fn, thr[c])
        result[c] = {name: reduce(_frame_tallies(frames, lambda b, diff, level=level: (diff >= 0) & (diff <= level),
                                                 lambda b: torch.zeros(b.shape[0], dtype=torch.bool)))
                     for level, name in enumerate(DIFFICULTIES)}
    return result


# --- public metrics --------------------------------------------------------------------------
def kitti_ap(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    metric: str = "3d",
    num_recall_points: int = 40,
    class_names: Sequence[str] | None = None,
) -> dict:
    """KITTI-style AP per class and difficulty (rules in the module docstring).

    Args:
        gts: one `FrameGT` per frame.
        dets: one `Detections3D` per frame (same order).
        classes: class names to evaluate.
        iou_thresholds: IoU threshold per class (a detection matches if IoU > threshold).
        metric: "3d" (3D IoU) or "bev" (rotated BEV IoU).
        num_recall_points: 40 (R40) or 11 (R11).
        class_names: label id -> name (`class_names[label]`); None: `classes` itself.

    Returns:
        `{class: {"easy": AP, "moderate": AP, "hard": AP}, ..., "mAP": {difficulty: mean}}`,
        AP in percent; `nan` where a class has no valid GT.
    """
    result = _by_difficulty(gts, dets, classes, iou_thresholds, metric, class_names,
                            lambda tallies: _tallies_ap(tallies, num_recall_points))
    result["mAP"] = {name: _nan_mean(result[c][name] for c in classes) for name in DIFFICULTIES}
    return result


def kitti_recall(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    metric: str = "3d",
    class_names: Sequence[str] | None = None,
) -> dict:
    """Highest recall of the KITTI curve per class and difficulty: the share of valid GT that
    some detection of any score matches (same matching and difficulty rules as :func:`kitti_ap`).

    Args:
        gts, dets, classes, iou_thresholds, metric, class_names: as for :func:`kitti_ap`.

    Returns:
        `{class: {"easy": recall, "moderate": recall, "hard": recall}}` in percent; `nan` where
        a class has no valid GT.
    """
    def recall(tallies) -> float:
        found, total = sum(int(t[1].sum()) for t in tallies), sum(t[2] for t in tallies)
        return 100.0 * found / total if total else float("nan")

    return _by_difficulty(gts, dets, classes, iou_thresholds, metric, class_names, recall)


def missed_objects(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    difficulty: str = "moderate",
    class_names: Sequence[str] | None = None,
) -> list[dict]:
    """The valid GT boxes at `difficulty` that no detection matches at 3D IoU (the matching of
    :func:`kitti_ap`, any score): the objects that keep :func:`kitti_recall` below 100, each with
    the detection of its class nearest to matching it.

    Args:
        gts, dets, classes, iou_thresholds, class_names: as for :func:`kitti_ap`.
        difficulty: "easy", "moderate" or "hard" (valid GT as in :func:`kitti_ap`).

    Returns:
        One dict per missed object, by frame then class: `frame` (index into `gts`), `class`,
        `gt_index` (row of `gts[frame].boxes`), `best_iou` (highest 3D IoU of a detection of its
        class in that frame, 0 if none overlaps it; above the threshold when that detection
        matched another GT) and `best_score` (that detection's score; `nan` if none overlaps it).
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    thr = _thresholds(classes, iou_thresholds)
    level = _difficulty_level(difficulty)
    missed = []
    for c in classes:
        frames = _per_class_matches(gts, dets, ids[c], iou_3d, thr[c])
        for f, (gt_boxes, gt_diff, det_boxes, det_scores, matched) in enumerate(frames):
            lost = ((gt_diff >= 0) & (gt_diff <= level)).numpy()
            lost[matched[matched >= 0]] = False
            if not lost.any():
                continue
            rows = np.nonzero((gts[f].labels == ids[c]).numpy())[0]
            if det_boxes.shape[0]:
                iou = iou_3d(det_boxes, gt_boxes[torch.from_numpy(lost)]).numpy()  # [D, lost]
                best = iou.argmax(axis=0)
                best_iou = iou[best, np.arange(best.size)]
                best_score = np.where(best_iou > 0, det_scores[best], np.nan)
            else:
                best_iou, best_score = np.zeros(int(lost.sum())), np.full(int(lost.sum()), np.nan)
            for j, i, s in zip(np.nonzero(lost)[0], best_iou, best_score):
                missed.append({"frame": f, "class": c, "gt_index": int(rows[j]), "best_iou": float(i),
                               "best_score": float(s)})
    missed.sort(key=lambda m: (m["frame"], list(classes).index(m["class"]), m["gt_index"]))
    return missed


def kitti_ap_interval(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    metric: str = "3d",
    difficulty: str = "moderate",
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    baseline: Sequence[Detections3D] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Bootstrap interval of the KITTI AP (R40) over frames: how far the AP of these detections
    would move on another evaluation set of the same size and kind; with `baseline`, the
    interval of the difference `AP(dets) - AP(baseline)`, paired (both on the same draws).

    The frames are drawn with replacement `resamples` times (the matching is per frame, so it is
    done once) and the AP recomputed; the interval is the central `confidence` share of those APs
    (percentile bootstrap). It measures the evaluation set's sampling noise only, not the spread
    between training runs.

    Args:
        gts, dets, classes, iou_thresholds, metric, class_names: as for :func:`kitti_ap`.
        difficulty: the KITTI difficulty ("easy", "moderate" or "hard").
        confidence: the interval's coverage, in (0, 1).
        resamples: bootstrap draws.
        seed: seed of the draws (the interval is deterministic given it).
        baseline: other detections of the same frames (same order), or None.

    Returns:
        `{class: (low, high)}`, AP (or AP difference) in percent; `(nan, nan)` where a class has
        no valid GT.
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    if baseline is not None:
        _check_inputs(gts, baseline, classes, class_names)
    level = _difficulty_level(difficulty)
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence: expected a share in (0, 1), got {confidence!r}")
    if int(resamples) < 1:
        raise DataError(f"resamples: expected a positive count, got {resamples!r}")
    pair_fn = _iou_fn(metric)
    thr = _thresholds(classes, iou_thresholds)
    draws = np.random.default_rng(seed).integers(0, len(gts), size=(int(resamples), len(gts)))

    def tallies(d, c):
        return _frame_tallies(_per_class_matches(gts, d, ids[c], pair_fn, thr[c]),
                              lambda b, diff: (diff >= 0) & (diff <= level),
                              lambda b: torch.zeros(b.shape[0], dtype=torch.bool))

    tail = (1.0 - confidence) / 2 * 100
    result = {}
    for c in classes:
        t = tallies(dets, c)
        if not sum(f[2] for f in t):
            result[c] = (float("nan"), float("nan"))
            continue
        aps = np.array([_tallies_ap([t[i] for i in row], 40) for row in draws])
        if baseline is not None:
            tb = tallies(baseline, c)
            aps = aps - np.array([_tallies_ap([tb[i] for i in row], 40) for row in draws])
        aps = aps[~np.isnan(aps)]  # a draw without valid GT has no AP
        result[c] = (float(np.percentile(aps, tail)), float(np.percentile(aps, 100 - tail)))
    return result


def _parse_bins(distance_bins_m) -> list[tuple[float, float]]:
    items = list(distance_bins_m)
    if items and all(np.ndim(x) == 0 for x in items):  # edges form: (e0, e1, ..., ek)
        edges = [float(x) for x in items]
        if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise DataError(f"distance_bins_m: expected increasing non-negative edges, got {tuple(items)}")
        return list(zip(edges[:-1], edges[1:]))
    bins = []
    for b in items:
        if np.ndim(b) != 1 or len(b) != 2 or not 0 <= float(b[0]) < float(b[1]):
            raise DataError(f"distance_bins_m: expected (lo, hi) pairs with 0 <= lo < hi, got {b!r}")
        bins.append((float(b[0]), float(b[1])))
    if not bins:
        raise DataError("distance_bins_m: expected at least one bin")
    return bins


def kitti_ap_by_distance(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    metric: str = "3d",
    num_recall_points: int = 40,
    distance_bins_m: Sequence[tuple[float, float]] = ((0.0, 20.0), (20.0, 40.0), (40.0, 70.0)),
    difficulty: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """KITTI-style AP restricted to BEV range bins `[lo, hi)` metres from the sensor.

    Args:
        gts, dets, classes, iou_thresholds, metric, num_recall_points, class_names: as `kitti_ap`.
        distance_bins_m: `(lo, hi)` pairs, metres, or increasing edges `(e0, e1, ..., ek)`
            meaning the bins `[e0, e1), ..., [e(k-1), ek)`; range = `hypot(x, y)` of the box
            centre in the LiDAR frame.
        difficulty: None: every GT of the class in the bin is valid regardless of its
            difficulty; 0/1/2: only GT with `0 <= difficulty <= d` are valid (others ignored).

    Returns:
        `{class: {"lo-hi m": AP, ...}, ..., "mAP": {"lo-hi m": mean}}`, AP in percent, e.g.
        the key for `(0, 20)` is `"0-20m"`.
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    pair_fn = _iou_fn(metric)
    thr = _thresholds(classes, iou_thresholds)
    if difficulty is not None and difficulty not in (0, 1, 2):
        raise DataError(f"difficulty: expected None, 0, 1 or 2, got {difficulty!r}")
    bins = _parse_bins(distance_bins_m)
    keys = [f"{lo:g}-{hi:g}m" for lo, hi in bins]

    def in_bin(boxes, lo, hi):
        r = torch.hypot(boxes[:, 0], boxes[:, 1])
        return (r >= lo) & (r < hi)

    result: dict = {}
    for c in classes:
        frames = _per_class_matches(gts, dets, ids[c], pair_fn, thr[c])
        result[c] = {}
        for key, (lo, hi) in zip(keys, bins):
            def gt_valid(b, diff, lo=lo, hi=hi):
                ok = in_bin(b, lo, hi)
                if difficulty is not None:
                    ok &= (diff >= 0) & (diff <= difficulty)
                return ok

            result[c][key] = _score(frames, gt_valid, lambda b, lo=lo, hi=hi: ~in_bin(b, lo, hi),
                                    num_recall_points)
    result["mAP"] = {k: _nan_mean(result[c][k] for c in classes) for k in keys}
    return result


def _neg_bev_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minus the BEV centre distance of every box pair, the similarity of nuScenes matching."""
    return -torch.cdist(a[:, :2], b[:, :2])


def _nuscenes_ap(scores: np.ndarray, is_tp: np.ndarray, num_gt: int,
                 min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    if num_gt <= 0:
        return float("nan")
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = is_tp[order]
    ctp = np.cumsum(tp).astype(np.float64)
    cfp = np.cumsum(~tp).astype(np.float64)
    prec = ctp / (ctp + cfp)
    rec = ctp / num_gt
    rec_interp = np.linspace(0.0, 1.0, 101)
    prec_i = np.interp(rec_interp, rec, prec, right=0.0)
    prec_i = prec_i[int(round(100 * min_recall)) + 1:]
    return float(np.mean(np.clip((prec_i - min_precision) / (1.0 - min_precision), 0.0, None)) * 100.0)


def nuscenes_map(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    dist_thresholds: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    class_names: Sequence[str] | None = None,
) -> dict:
    """nuScenes-style AP on BEV centre distance (rules in the module docstring).

    Args:
        gts: one `FrameGT` per frame (only `difficulty == -1`, "ignored", is used).
        dets: one `Detections3D` per frame.
        classes: class names to evaluate.
        dist_thresholds: match distances, metres (a match needs distance < threshold).
        class_names: label id -> name; None: `classes` itself.

    Returns:
        `{class: {threshold: AP, ...}, ..., "mAP": mean over classes and thresholds}`, AP in
        percent; the threshold keys are floats.
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    ths = [float(t) for t in dist_thresholds]
    if not ths or any(not t > 0 for t in ths):
        raise DataError(f"dist_thresholds: expected positive distances in metres, got {tuple(dist_thresholds)}")

    result: dict = {}
    for c in classes:
        result[c] = {}
        for t in ths:
            frames = _per_class_matches(gts, dets, ids[c], _neg_bev_distance, -t)
            scores, tps, num_gt = [], [], 0
            for _, gt_diff, _, det_scores, matched in frames:
                counted_gt = (gt_diff >= 0).numpy()
                num_gt += int(counted_gt.sum())
                hit = matched >= 0
                tp = np.zeros_like(hit)
                tp[hit] = counted_gt[matched[hit]]
                keep = tp | ~hit  # matched to a difficulty -1 GT: dropped
                scores.append(det_scores[keep])
                tps.append(tp[keep])
            result[c][t] = _nuscenes_ap(np.concatenate(scores) if scores else np.zeros(0),
                                        np.concatenate(tps) if tps else np.zeros(0, bool), num_gt)
    per_class = [_nan_mean(result[c].values()) for c in classes]
    result["mAP"] = _nan_mean(per_class)
    return result


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


ORACLE_PARTS = {"xy": (0, 1), "z": (2,), "length": (3,), "width": (4,), "height": (5,), "size": (3, 4, 5),
                "z_height": (2, 5), "yaw": (6,)}


def oracle_ap(
    gts: Sequence[FrameGT],
    dets: Sequence[Detections3D],
    classes: Sequence[str] = CLASSES,
    iou_thresholds: Mapping[str, float] = _DEFAULT_IOU,
    metric: str = "3d",
    difficulty: str = "moderate",
    max_dist_m: float = 2.0,
    class_names: Sequence[str] | None = None,
) -> dict:
    """KITTI AP (R40) with one box part of every detection made exact (rules in the module docstring).

    Args:
        gts, dets, classes, iou_thresholds, metric, class_names: as for :func:`kitti_ap`.
        difficulty: the KITTI difficulty reported ("easy", "moderate" or "hard").
        max_dist_m: BEV centre distance within which a detection takes its nearest GT's part.

    Returns:
        `{class: {part: AP}}` for the parts of `ORACLE_PARTS`, AP in percent.
    """
    ids = _check_inputs(gts, dets, classes, class_names)
    _difficulty_level(difficulty)
    if not max_dist_m > 0:
        raise DataError(f"max_dist_m: expected a positive distance in metres, got {max_dist_m!r}")
    # per frame: each detection's nearest GT box of its class in reach (its own box where none)
    nearest = []
    for g, d in zip(gts, dets):
        boxes = d.boxes.tensor.detach().cpu().to(torch.float64)
        labels = d.labels.detach().cpu()
        target = boxes.clone()
        for c in classes:
            dm, gm = labels == ids[c], g.labels == ids[c]
            if dm.any() and gm.any():
                dist, j = torch.cdist(boxes[dm, :2], g.boxes[gm, :2]).min(1)
                near = dist < max_dist_m
                rows = dm.nonzero()[:, 0][near]
                target[rows] = g.boxes[gm][j[near]]
        nearest.append((boxes, target, d))
    result: dict = {c: {} for c in classes}
    for part, cols in ORACLE_PARTS.items():
        fixed = []
        for boxes, target, d in nearest:
            b = boxes.clone()
            b[:, list(cols)] = target[:, list(cols)]
            fixed.append(Detections3D(Boxes3D(b), d.scores.detach().cpu(), d.labels.detach().cpu()))
        ap = kitti_ap(gts, fixed, classes, iou_thresholds, metric, class_names=class_names)
        for c in classes:
            result[c][part] = ap[c][difficulty]
    return result
