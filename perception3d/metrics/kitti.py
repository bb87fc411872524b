"""The KITTI object detection evaluation, number for number as the official devkit computes it.

Inputs are one ground-truth and one detection `perception3d.io.kitti.KittiLabels` per frame, as
the label and result files hold them: camera-frame boxes (bottom centre, h w l, rotation_y), the
2D box in the image, truncation, occlusion, alpha, and a score per detection. Implemented from the
devkit's definition (`cpp/evaluate_object.cpp` and its python port in OpenPCDet and mmdetection3d,
`kitti_object_eval_python/eval.py`); `tests/perception3d/test_metrics_kitti.py` checks it against
that python port and against known answers worked out from the definition.

The rules, per class, difficulty (easy, moderate, hard) and metric (`bbox`: 2D box IoU in the
image, `bev`: rotated IoU of the footprints in the camera x-z plane, `3d`: that footprint
intersection times the overlap along camera y, over the union of the volumes):

* Ground truth. An object of the class is *valid* when its 2D box is taller than the
  difficulty's minimum (40 / 25 / 25 px, `height > min`), its occlusion at most 0 / 1 / 2 and its
  truncation at most 0.15 / 0.30 / 0.50; otherwise it is *ignored*. Objects of the neighbouring
  class (Van for Car, Person_sitting for Pedestrian) are ignored too; all other objects do not
  take part. DontCare boxes are regions (below).
* Detections. A detection of the class whose 2D box is shorter than the minimum height
  (`height < min`) is *ignored*; other classes' detections do not take part.
* Matching, for a score threshold `t` (only detections scoring `>= t` take part): ground truth in
  file order; each valid or ignored object takes, among the unassigned detections whose overlap
  is strictly above the class's minimum overlap, the non-ignored one of highest overlap, else an
  ignored one. A valid object with a non-ignored detection is a true positive; a pairing that
  involves an ignored side assigns the detection without counting it; a valid object without a
  detection is a false negative. Unassigned non-ignored detections are false positives, except,
  for the 2D metric, those covering a DontCare region (intersection over the detection's own area
  above the minimum overlap).
* Score thresholds. A first matching pass over all detections takes, for each valid object, the
  highest-scoring detection above the overlap (an ignored detection may take it); the scores of
  the true positives, sorted, give the thresholds: walking down the sorted scores, a score is kept
  when the recall it reaches is closer to the next of 41 evenly spaced recall positions than the
  recall after the next score (`get_thresholds`). So the curve has at most 41 points, fewer when
  there are fewer true positives.
* AP. At each kept threshold, precision = TP / (TP + FP) summed over frames; each precision is
  replaced by the maximum at that and all lower thresholds; positions beyond the last threshold
  are 0. **R40** is the mean of positions 1..40 (of 0..40), **R11** the mean of positions
  0, 4, ..., 40. AOS (2D metric) uses the summed `(1 + cos(alpha_gt - alpha_det)) / 2` of the true
  positives in place of TP. A class with no valid object has AP 0, as in the devkit.
  Consequence: with few objects, AP stays far below 100 even for perfect detections (10 objects,
  all found, R40 = 22.5, R11 = 27.27), because positions beyond the last threshold count as 0.

Overlaps are computed in float64 (the devkit's GPU kernel uses float32 for the rotated part): the
two agree except for pairs within ~1e-7 of a threshold.

Diagnostics built on the same machinery (not part of the benchmark, and named apart from it by
the callers): `kitti_ap_interval` (percentile bootstrap over frames of the official AP, and of its
difference to another set of detections of the same frames), the curve's highest recall
(`max_recall`), `kitti_ap_by_range`, `oracle_ap` (the AP with one box part made exact) and
`missed_objects`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numba
import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.geometry.iou import bev_intersection_area
from perception3d.io.kitti import KittiLabels

__all__ = ["DIFFICULTIES", "METRICS", "MIN_OVERLAP", "LOOSE_OVERLAP", "kitti_eval", "kitti_overlaps",
           "KittiCurves", "prepare_curves", "get_thresholds", "kitti_ap_interval", "kitti_ap_by_range", "oracle_ap",
           "ORACLE_PARTS", "missed_objects"]

DIFFICULTIES = ("easy", "moderate", "hard")
METRICS = ("bbox", "bev", "3d")
_MIN_HEIGHT_PX = (40.0, 25.0, 25.0)
_MAX_OCCLUSION = (0, 1, 2)
_MAX_TRUNCATION = (0.15, 0.30, 0.50)
_NEIGHBOUR = {"car": "van", "pedestrian": "person_sitting"}
N_SAMPLE_PTS = 41

# the benchmark's minimum overlaps (the devkit's first set) and the looser second set it also reports
MIN_OVERLAP: Mapping[str, Mapping[str, float]] = {
    "Car": {"bbox": 0.7, "bev": 0.7, "3d": 0.7}, "Pedestrian": {"bbox": 0.5, "bev": 0.5, "3d": 0.5},
    "Cyclist": {"bbox": 0.5, "bev": 0.5, "3d": 0.5}, "Van": {"bbox": 0.7, "bev": 0.7, "3d": 0.7},
    "Person_sitting": {"bbox": 0.5, "bev": 0.5, "3d": 0.5}}
LOOSE_OVERLAP: Mapping[str, Mapping[str, float]] = {
    "Car": {"bbox": 0.7, "bev": 0.5, "3d": 0.5}, "Pedestrian": {"bbox": 0.5, "bev": 0.25, "3d": 0.25},
    "Cyclist": {"bbox": 0.5, "bev": 0.25, "3d": 0.25}, "Van": {"bbox": 0.7, "bev": 0.5, "3d": 0.5},
    "Person_sitting": {"bbox": 0.5, "bev": 0.25, "3d": 0.25}}


# --------------------------------------------------------------------------------------------
# overlaps
# --------------------------------------------------------------------------------------------

def _image_overlap(a: np.ndarray, b: np.ndarray, own_area: bool = False) -> np.ndarray:
    """`[len(a), len(b)]` 2D overlaps of `(x1, y1, x2, y2)` boxes: IoU, or (own_area) the
    intersection over the area of the `a` box (the devkit's DontCare test)."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    denom = area_a if own_area else area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / denom, 0.0)


def _footprints(labels: KittiLabels) -> torch.Tensor:
    """Camera boxes as `[N, 7]` boxes of `perception3d.geometry.iou` in the camera x-z plane: centre
    `(x, z)`, length along the heading, width, heading `-rotation_y` (the camera y axis points down,
    so a rotation by `ry` about it turns the x-z plane by `-ry`); the vertical part is unused."""
    loc, hwl = np.asarray(labels.loc_cam, np.float64), np.asarray(labels.dims_hwl, np.float64)
    n = len(labels)
    boxes = np.stack([loc[:, 0], loc[:, 2], np.zeros(n), hwl[:, 2], hwl[:, 1], np.ones(n),
                      -np.asarray(labels.rotation_y, np.float64)], axis=1) if n else np.zeros((0, 7))
    return torch.from_numpy(boxes)


def kitti_overlaps(gt: KittiLabels, dt: KittiLabels, metric: str) -> np.ndarray:
    """`[len(dt), len(gt)]` overlaps of every detection with every object (`metric`: bbox, bev, 3d)."""
    if metric not in METRICS:
        raise DataError(f"metric: expected one of {METRICS}, got {metric!r}")
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    if metric == "bbox":
        return _image_overlap(np.asarray(dt.bbox2d, np.float64), np.asarray(gt.bbox2d, np.float64))
    a, b = _footprints(dt), _footprints(gt)
    inter = bev_intersection_area(a, b).numpy()
    area_a = (a[:, 3] * a[:, 4]).numpy()[:, None]
    area_b = (b[:, 3] * b[:, 4]).numpy()[None, :]
    if metric == "bev":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(inter > 0, inter / (area_a + area_b - inter), 0.0)
    # camera y points down and the location is the bottom centre: the box spans [y - h, y]
    y_d, h_d = np.asarray(dt.loc_cam, np.float64)[:, 1], np.asarray(dt.dims_hwl, np.float64)[:, 0]
    y_g, h_g = np.asarray(gt.loc_cam, np.float64)[:, 1], np.asarray(gt.dims_hwl, np.float64)[:, 0]
    iw = np.minimum(y_d[:, None], y_g[None, :]) - np.maximum((y_d - h_d)[:, None], (y_g - h_g)[None, :])
    vol = inter * np.maximum(iw, 0.0)
    vol_d = (area_a[:, 0] * h_d)[:, None]
    vol_g = (area_b[0] * h_g)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(vol > 0, vol / (vol_d + vol_g - vol), 0.0)


# --------------------------------------------------------------------------------------------
# the devkit's per-frame statistics and score thresholds
# --------------------------------------------------------------------------------------------

_NO_DETECTION = -10000000.0


@numba.njit(cache=True)
def _statistics(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, thresh, compute_fp, gt_alpha, dt_alpha,
                tp_scores, gt_matched):
    """One frame's matching at score threshold `thresh` (see the module docstring).

    Writes the true positives' scores to `tp_scores` and, per object, whether it is a true
    positive to `gt_matched`. Returns `(tp, fp, fn, similarity, number of tp_scores)`;
    similarity is -1 where there is neither a TP nor an FP (the devkit's marker)."""
    n_dt, n_gt = ov.shape
    assigned = np.zeros(n_dt, np.bool_)
    below = np.zeros(n_dt, np.bool_)
    if compute_fp:
        for j in range(n_dt):
            below[j] = scores[j] < thresh
    tp, fp, fn, n_tp = 0, 0, 0, 0
    similarity = 0.0
    for i in range(n_gt):
        gt_matched[i] = False
        if ignored_gt[i] == -1:
            continue
        det = -1
        valid = _NO_DETECTION
        max_overlap = 0.0
        took_ignored = False
        for j in range(n_dt):
            if ignored_dt[j] == -1 or assigned[j] or below[j]:
                continue
            o = ov[j, i]
            if not compute_fp:
                if o > min_overlap and scores[j] > valid:
                    det, valid = j, scores[j]
            elif o > min_overlap and (o > max_overlap or took_ignored) and ignored_dt[j] == 0:
                max_overlap, det, valid, took_ignored = o, j, 1.0, False
            elif o > min_overlap and valid == _NO_DETECTION and ignored_dt[j] == 1:
                det, valid, took_ignored = j, 1.0, True
        if valid == _NO_DETECTION:
            if ignored_gt[i] == 0:
                fn += 1
        elif ignored_gt[i] == 1 or ignored_dt[det] == 1:
            assigned[det] = True
        else:
            tp += 1
            tp_scores[n_tp] = scores[det]
            n_tp += 1
            similarity += (1.0 + math.cos(gt_alpha[i] - dt_alpha[det])) / 2.0
            assigned[det] = True
            gt_matched[i] = True
    if compute_fp:
        for j in range(n_dt):
            if not (assigned[j] or ignored_dt[j] != 0 or below[j]):
                fp += 1
        covered = 0
        for c in range(dc_ov.shape[1]):  # DontCare regions (2D metric only: else no columns)
            for j in range(n_dt):
                if assigned[j] or ignored_dt[j] != 0 or below[j]:
                    continue
                if dc_ov[j, c] > min_overlap:
                    assigned[j] = True
                    covered += 1
        fp -= covered
        if tp == 0 and fp == 0:
            similarity = -1.0
    return tp, fp, fn, similarity, n_tp


@numba.njit(cache=True)
def get_thresholds(scores, num_gt, num_sample_pts=N_SAMPLE_PTS):
    """The devkit's score thresholds: from the true positives' `scores` (any order) and the number
    of valid objects, the scores at which the recall passes each of `num_sample_pts` positions."""
    s = np.sort(scores)[::-1]
    out = np.empty(len(s))
    n_out = 0
    current = 0.0
    for i in range(len(s)):
        l_recall = (i + 1) / num_gt
        r_recall = (i + 2) / num_gt if i < len(s) - 1 else l_recall
        if (r_recall - current) < (current - l_recall) and i < len(s) - 1:
            continue
        out[n_out] = s[i]
        n_out += 1
        current += 1.0 / (num_sample_pts - 1.0)
    return out[:n_out]


@numba.njit(cache=True)
def _frame_table(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, gt_alpha, dt_alpha):
    """A frame's (tp, fp, fn, similarity) for every set of detections a threshold can select: row k
    for the detections scoring `>= levels[k]` (the frame's distinct scores, descending); the last
    row, for a threshold above every score, is the frame without detections."""
    n_gt = ov.shape[1]
    tp_scores = np.empty(n_gt)
    matched = np.empty(n_gt, np.bool_)
    levels = np.unique(scores)[::-1]
    table = np.empty((len(levels) + 1, 4))
    for k in range(len(levels) + 1):
        thresh = levels[k] if k < len(levels) else np.inf
        tp, fp, fn, sim, _ = _statistics(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, thresh, True,
                                         gt_alpha, dt_alpha, tp_scores, matched)
        table[k, 0], table[k, 1], table[k, 2], table[k, 3] = tp, fp, fn, sim
    return levels, table


@numba.njit(cache=True)
def _curve(weights, tp_scores, tp_frame, num_valid, levels, level_start, tables, table_start):
    """Precision and AOS at the 41 sample positions (max over lower thresholds applied), and the
    recall each threshold reaches, for frames weighted by `weights` (1 each for the evaluation itself; bootstrap counts for a draw)."""
    n_frames = len(weights)
    total_valid = 0.0
    n_scores = 0
    for f in range(n_frames):
        total_valid += weights[f] * num_valid[f]
    for t in range(len(tp_scores)):
        n_scores += weights[tp_frame[t]]
    drawn = np.empty(n_scores)
    n = 0
    for t in range(len(tp_scores)):
        for _ in range(weights[tp_frame[t]]):
            drawn[n] = tp_scores[t]
            n += 1
    precision = np.zeros(N_SAMPLE_PTS)
    recall = np.zeros(N_SAMPLE_PTS)
    aos = np.zeros(N_SAMPLE_PTS)
    if n_scores == 0:
        return precision, recall, aos, 0
    thresholds = get_thresholds(drawn, total_valid)
    for i in range(len(thresholds)):
        tp = fp = fn = sim = 0.0
        for f in range(n_frames):
            w = weights[f]
            if w == 0:
                continue
            lv = levels[level_start[f]:level_start[f + 1]]
            # the frame's row: the lowest of its distinct scores that is >= the threshold
            k = len(lv) - np.searchsorted(lv[::-1], thresholds[i]) - 1 if len(lv) else -1
            row = tables[table_start[f] + (k if k >= 0 else len(lv))]
            tp += w * row[0]
            fp += w * row[1]
            fn += w * row[2]
            if row[3] != -1.0:
                sim += w * row[3]
        recall[i] = tp / (tp + fn)
        precision[i] = tp / (tp + fp)
        aos[i] = sim / (tp + fp)
    for i in range(len(thresholds)):
        precision[i] = precision[i:].max()
        aos[i] = aos[i:].max()
    return precision, recall, aos, len(thresholds)


def _r40(values: np.ndarray) -> float:
    return float(values[1:].sum() / 40 * 100)


def _r11(values: np.ndarray) -> float:
    return float(values[::4].sum() / 11 * 100)


# --------------------------------------------------------------------------------------------
# curves: one class, difficulty, metric and minimum overlap, over all frames
# --------------------------------------------------------------------------------------------

def _ignore_flags(gt: KittiLabels, dt: KittiLabels, cls: str, difficulty: int):
    name = cls.lower()
    g_names = np.char.lower(np.asarray(gt.names).astype(str)) if len(gt) else np.zeros(0, str)
    g_box = np.asarray(gt.bbox2d, np.float64).reshape(-1, 4)
    height = g_box[:, 3] - g_box[:, 1]
    hard = ((np.asarray(gt.occluded) > _MAX_OCCLUSION[difficulty])
            | (np.asarray(gt.truncated, np.float64) > _MAX_TRUNCATION[difficulty])
            | (height <= _MIN_HEIGHT_PX[difficulty]))
    of_class = g_names == name
    neighbour = g_names == _NEIGHBOUR.get(name, "\0")
    ignored_gt = np.where(of_class & ~hard, 0, np.where(neighbour | (of_class & hard), 1, -1)).astype(np.int64)
    dc = g_box[np.asarray(gt.names).astype(str) == "DontCare"] if len(gt) else np.zeros((0, 4))
    d_names = np.char.lower(np.asarray(dt.names).astype(str)) if len(dt) else np.zeros(0, str)
    d_box = np.asarray(dt.bbox2d, np.float64).reshape(-1, 4)
    small = np.abs(d_box[:, 3] - d_box[:, 1]) < _MIN_HEIGHT_PX[difficulty]
    # as the devkit: a short detection is ignored (1) whatever its class
    ignored_dt = np.where(small, 1, np.where(d_names == name, 0, -1)).astype(np.int64)
    return ignored_gt, ignored_dt, dc, d_names == name


@dataclass(frozen=True)
class KittiCurves:
    """Everything the AP of one class, difficulty, metric and minimum overlap needs, per frame.

    Built by :func:`prepare_curves`; :meth:`evaluate` gives the official numbers, and with frame
    weights the numbers of a bootstrap draw (each frame counted `weights[f]` times).
    """

    num_valid: np.ndarray     # [F] valid objects per frame
    tp_scores: np.ndarray     # first pass: true positives' scores, all frames
    tp_frame: np.ndarray      # their frame
    levels: np.ndarray        # each frame's distinct detection scores (descending), concatenated
    level_start: np.ndarray   # [F + 1] offsets into levels
    tables: np.ndarray        # [sum(levels per frame + 1), 4] (tp, fp, fn, similarity)
    table_start: np.ndarray   # [F] offsets into tables
    valid: tuple              # per frame: [M] whether each object is valid (counts towards recall)
    matched: tuple            # per frame: [M] whether each object is a TP with all detections
    best: tuple               # per frame: ([M] best overlap with a detection of the class, its index)

    def evaluate(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """`{"R40", "R11", "aos_R40", "aos_R11", "max_recall"}` (percent) for frame `weights`."""
        w = np.ones(len(self.num_valid), np.int64) if weights is None else np.asarray(weights, np.int64)
        precision, recall, aos, n = _curve(w, self.tp_scores, self.tp_frame, self.num_valid, self.levels,
                                           self.level_start, self.tables, self.table_start)
        return {"R40": _r40(precision), "R11": _r11(precision), "aos_R40": _r40(aos), "aos_R11": _r11(aos),
                "max_recall": float(100 * recall[:n].max()) if n else 0.0}

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """The curve the AP is read from: `(precision, recall)` at the devkit's score thresholds (one
        per recall position i / 40 that the true positives reach; with few objects, fewer), recall
        rising; precision is already the maximum over the higher recalls. R40 is the mean of
        precision[1:41] by position, missing positions counting 0."""
        precision, recall, _, n = _curve(np.ones(len(self.num_valid), np.int64), self.tp_scores, self.tp_frame,
                                         self.num_valid, self.levels, self.level_start, self.tables, self.table_start)
        return precision[:n], recall[:n]


def _check_frames(gt: Sequence[KittiLabels], dt: Sequence[KittiLabels]) -> None:
    if len(gt) != len(dt):
        raise DataError(f"gt and dt: expected one KittiLabels per frame each, got {len(gt)} and {len(dt)}")
    for i, (g, d) in enumerate(zip(gt, dt)):
        if not isinstance(g, KittiLabels):
            raise DataError(f"gt[{i}]: expected KittiLabels, got {type(g).__name__}")
        if not isinstance(d, KittiLabels):
            raise DataError(f"dt[{i}]: expected KittiLabels, got {type(d).__name__}")
        if d.score is None and len(d):
            raise DataError(f"dt[{i}]: detections need a score per object (a KITTI result file's 16th field)")


def prepare_curves(gt: Sequence[KittiLabels], dt: Sequence[KittiLabels], cls: str, difficulty: str, metric: str,
                   min_overlap: float, overlaps: Sequence[np.ndarray] | None = None) -> KittiCurves:
    """Per-frame statistics of one class, difficulty, metric and minimum overlap (see
    :class:`KittiCurves`). `overlaps`: the frames' `kitti_overlaps(gt, dt, metric)`, when the
    caller already has them."""
    _check_frames(gt, dt)
    if difficulty not in DIFFICULTIES:
        raise DataError(f"difficulty: expected one of {DIFFICULTIES}, got {difficulty!r}")
    level = DIFFICULTIES.index(difficulty)
    num_valid, tp_scores, tp_frame, levels, level_start, tables, table_start = [], [], [], [], [0], [], []
    valid, matched, best = [], [], []
    n_table = 0
    for f, (g, d) in enumerate(zip(gt, dt)):
        ov = kitti_overlaps(g, d, metric) if overlaps is None else overlaps[f]
        ignored_gt, ignored_dt, dc, d_of_class = _ignore_flags(g, d, cls, level)
        scores = np.asarray(d.score if d.score is not None else np.zeros(0), np.float64)
        dc_ov = _image_overlap(np.asarray(d.bbox2d, np.float64).reshape(-1, 4), dc, own_area=True) \
            if metric == "bbox" and len(dc) and len(d) else np.zeros((len(d), 0))
        g_alpha, d_alpha = np.asarray(g.alpha, np.float64), np.asarray(d.alpha, np.float64)
        buf, flags = np.empty(len(g)), np.empty(len(g), np.bool_)
        _, _, _, _, n_tp = _statistics(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, 0.0, False,
                                       g_alpha, d_alpha, buf, flags)
        tp_scores.append(buf[:n_tp].copy())
        tp_frame.append(np.full(n_tp, f, np.int64))
        num_valid.append(int((ignored_gt == 0).sum()))
        lv, table = _frame_table(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, g_alpha, d_alpha)
        levels.append(lv)
        level_start.append(level_start[-1] + len(lv))
        table_start.append(n_table)
        tables.append(table)
        n_table += len(table)
        _statistics(ov, ignored_gt, ignored_dt, scores, dc_ov, min_overlap, -np.inf, True, g_alpha, d_alpha,
                    buf, flags)
        matched.append(flags.copy())
        valid.append(ignored_gt == 0)
        ov_cls = ov * d_of_class[:, None]
        best.append((ov_cls.max(0) if len(d) else np.zeros(len(g)),
                     ov_cls.argmax(0) if len(d) else np.full(len(g), -1)))
    return KittiCurves(np.asarray(num_valid, np.float64), np.concatenate(tp_scores) if tp_scores else np.zeros(0),
                       np.concatenate(tp_frame) if tp_frame else np.zeros(0, np.int64),
                       np.concatenate(levels) if levels else np.zeros(0), np.asarray(level_start, np.int64),
                       np.concatenate(tables) if tables else np.zeros((0, 4)), np.asarray(table_start, np.int64),
                       tuple(valid), tuple(matched), tuple(best))


def kitti_eval(gt: Sequence[KittiLabels], dt: Sequence[KittiLabels],
               classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"), metrics: Sequence[str] = METRICS,
               min_overlap: Mapping[str, Mapping[str, float]] = MIN_OVERLAP) -> dict:
    """The KITTI evaluation (see the module docstring) of detections `dt` against `gt`, per frame.

    Args:
        gt: one `KittiLabels` per frame (a label file: every object, DontCare and Van included).
        dt: one `KittiLabels` with scores per frame (a result file), in the same order.
        classes: evaluated classes (names as in the files: Car, Pedestrian, Cyclist, Van, ...).
        metrics: any of "bbox", "bev", "3d".
        min_overlap: class -> metric -> minimum overlap (default the benchmark's `MIN_OVERLAP`;
            `LOOSE_OVERLAP` is the devkit's second set).

    Returns:
        `{cls: {metric: {"R40": {difficulty: AP}, "R11": {...}, "max_recall": {...}}}}`, AP in
        percent, plus `{cls: {"aos": {"R40": ..., "R11": ...}}}` when "bbox" is evaluated and the
        detections carry alpha. `max_recall` (a diagnostic, not a benchmark number) is the highest
        recall of the curve.

    Raises:
        DataError: frames that do not pair up, detections without scores, an unknown metric,
            difficulty or a class without minimum overlaps.
    """
    _check_frames(gt, dt)
    for cls in classes:
        if cls not in min_overlap:
            raise DataError(f"classes: no minimum overlap for {cls!r} (known: {', '.join(min_overlap)})")
    out: dict = {cls: {} for cls in classes}
    for metric in metrics:
        ov = [kitti_overlaps(g, d, metric) for g, d in zip(gt, dt)]
        for cls in classes:
            res = {"R40": {}, "R11": {}, "max_recall": {}}
            aos = {"R40": {}, "R11": {}}
            for diff in DIFFICULTIES:
                r = prepare_curves(gt, dt, cls, diff, metric, min_overlap[cls][metric], ov).evaluate()
                res["R40"][diff], res["R11"][diff], res["max_recall"][diff] = r["R40"], r["R11"], r["max_recall"]
                aos["R40"][diff], aos["R11"][diff] = r["aos_R40"], r["aos_R11"]
            out[cls][metric] = res
            if metric == "bbox":
                out[cls]["aos"] = aos
    return out


# --------------------------------------------------------------------------------------------
# diagnostics on the same machinery
# --------------------------------------------------------------------------------------------

def kitti_ap_interval(curves: KittiCurves, baseline: KittiCurves | None = None, draws: int = 1000,
                      level: float = 0.95, seed: int = 0, key: str = "R40") -> tuple[float, float]:
    """Percentile bootstrap interval over frames of the official AP (`key`: R40, R11, ...).

    The frames are drawn with replacement `draws` times and the AP of each draw computed exactly
    as the evaluation does (score thresholds included). With `baseline` (the same class,
    difficulty and metric for other detections of the same frames) it is the interval of the
    difference `AP - AP(baseline)`, both on the same draws (paired). It is the evaluation set's
    sampling noise, not the spread between training runs.
    """
    n = len(curves.num_valid)
    if baseline is not None and len(baseline.num_valid) != n:
        raise DataError(f"baseline: {len(baseline.num_valid)} frames, expected {n}")
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for b in range(draws):
        w = np.bincount(rng.integers(0, n, n), minlength=n)
        values[b] = curves.evaluate(w)[key] - (baseline.evaluate(w)[key] if baseline is not None else 0.0)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def missed_objects(curves: KittiCurves) -> list[dict]:
    """The valid objects that no detection takes as a true positive when every detection takes
    part (no score threshold), each with its best overlap with a detection of the class and that
    detection's index: `{"frame", "gt_index", "best_overlap", "best_det"}` (best_det -1: none)."""
    out = []
    for f, (valid, matched, (best_ov, best_det)) in enumerate(zip(curves.valid, curves.matched, curves.best)):
        for i in np.flatnonzero(valid & ~matched):
            out.append({"frame": f, "gt_index": int(i), "best_overlap": float(best_ov[i]),
                        "best_det": int(best_det[i]) if best_ov[i] > 0 else -1})
    return out


def _range_m(labels: KittiLabels) -> np.ndarray:
    loc = np.asarray(labels.loc_cam, np.float64).reshape(-1, 3)
    return np.hypot(loc[:, 0], loc[:, 2])


def kitti_ap_by_range(gt: Sequence[KittiLabels], dt: Sequence[KittiLabels], cls: str,
                      bins_m: Sequence[float], metric: str = "3d", difficulty: str = "moderate",
                      min_overlap: float | None = None) -> dict[str, float]:
    """A diagnostic: the official AP (R40) of `cls` within ranges from the camera, `hypot(x, z)` of
    the box location, for the bin edges `bins_m` (`[e0, e1), [e1, e2), ...`).

    Within a bin, objects outside it count as the devkit counts an object too hard for the
    difficulty, and detections outside it as it counts a detection too short for it: neither
    true nor false positives nor misses. Returns `{"e0-e1m": AP, ...}`.
    """
    edges = [float(e) for e in bins_m]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise DataError(f"bins_m: expected increasing non-negative bin edges in metres, got {tuple(bins_m)}")
    mo = MIN_OVERLAP[cls][metric] if min_overlap is None else min_overlap
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        gt_b, dt_b = [], []
        for g, d in zip(gt, dt):
            r = _range_m(g)
            outside = ((r < lo) | (r >= hi)) & (np.asarray(g.names).astype(str) != "DontCare")
            gt_b.append(replace(g, truncated=np.where(outside, 1.0, np.asarray(g.truncated, np.float64))))
            r = _range_m(d)
            box = np.asarray(d.bbox2d, np.float64).reshape(-1, 4).copy()
            out_d = (r < lo) | (r >= hi)
            box[out_d, 3] = box[out_d, 1]  # height 0: shorter than any minimum
            dt_b.append(replace(d, bbox2d=box))
        out[f"{lo:g}-{hi:g}m"] = prepare_curves(gt_b, dt_b, cls, difficulty, metric, mo).evaluate()["R40"]
    return out


ORACLE_PARTS = ("xy", "z", "length", "width", "height", "size", "z_height", "yaw")


def oracle_ap(gt: Sequence[KittiLabels], dt: Sequence[KittiLabels], cls: str, parts: Sequence[str] = ORACLE_PARTS,
              metric: str = "3d", difficulty: str = "moderate", max_dist_m: float = 2.0) -> dict[str, float]:
    """A diagnostic: where the AP is lost. The official AP (R40) again with one part of every
    detection of `cls` replaced by that of the nearest object of the same class (centre distance
    in the camera x-z plane below `max_dist_m`; a detection with none in reach keeps its box).
    Parts (camera frame): `xy` (x, z: the position on the ground), `z` (the vertical position,
    camera y), `length`, `width`, `height`, `size` (all three), `z_height`, `yaw` (rotation_y).
    Scores, labels and 2D boxes are unchanged. Returns `{part: AP}`: the rise over the plain AP is
    what that part's errors cost."""
    unknown = [p for p in parts if p not in ORACLE_PARTS]
    if unknown:
        raise DataError(f"parts: unknown {unknown}; expected some of {ORACLE_PARTS}")
    nearest = []
    for g, d in zip(gt, dt):
        g_loc, d_loc = np.asarray(g.loc_cam, np.float64).reshape(-1, 3), np.asarray(d.loc_cam, np.float64).reshape(-1, 3)
        same = np.asarray(d.names).astype(str)[:, None] == np.asarray(g.names).astype(str)[None, :]
        dist = np.hypot(d_loc[:, None, 0] - g_loc[None, :, 0], d_loc[:, None, 2] - g_loc[None, :, 2])
        dist = np.where(same & (np.asarray(d.names).astype(str)[:, None] == cls), dist, np.inf)
        j = dist.argmin(1) if dist.shape[1] else np.zeros(len(d), np.int64)
        ok = dist[np.arange(len(d)), j] < max_dist_m if dist.shape[1] else np.zeros(len(d), bool)
        nearest.append((j, ok))
    columns = {"xy": ("loc", [0, 2]), "z": ("loc", [1]), "length": ("hwl", [2]), "width": ("hwl", [1]),
               "height": ("hwl", [0]), "size": ("hwl", [0, 1, 2]), "yaw": ("ry", [0])}
    out = {}
    for part in parts:
        wanted = [columns[p] for p in (("z", "height") if part == "z_height" else (part,))]
        dt_o = []
        for g, d, (j, ok) in zip(gt, dt, nearest):
            loc, hwl = np.asarray(d.loc_cam, np.float64).copy(), np.asarray(d.dims_hwl, np.float64).copy()
            ry = np.asarray(d.rotation_y, np.float64).copy()
            for field, cols in wanted:
                if field == "loc":
                    loc[np.ix_(ok, cols)] = np.asarray(g.loc_cam, np.float64)[np.ix_(j[ok], cols)]
                elif field == "hwl":
                    hwl[np.ix_(ok, cols)] = np.asarray(g.dims_hwl, np.float64)[np.ix_(j[ok], cols)]
                else:
                    ry[ok] = np.asarray(g.rotation_y, np.float64)[j[ok]]
            dt_o.append(replace(d, loc_cam=loc, dims_hwl=hwl, rotation_y=ry))
        out[part] = prepare_curves(gt, dt_o, cls, difficulty, metric, MIN_OVERLAP[cls][metric]).evaluate()["R40"]
    return out
