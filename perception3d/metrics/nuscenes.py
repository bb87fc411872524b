"""The nuScenes detection evaluation, number for number as nuscenes-devkit 1.2.0 computes it.

mAP, the five true-positive errors (mATE, mASE, mAOE, mAVE, mAAE) and the nuScenes detection
score (NDS) of `nuscenes.eval.detection.evaluate.DetectionEval` with the official config
(`detection_cvpr_2019`), for boxes in the LiDAR frame as the toolkit stores them. Implemented from
the devkit's definitions (`eval/detection/algo.py`, `evaluate.py`, `data_classes.py`,
`eval/common/loaders.py`, `utils.py`); `tests/perception3d/test_metrics_nuscenes.py` checks it
against the devkit itself and against known answers worked out from those definitions.

Inputs: one `NuScenesGT` and one `NuScenesDets` per frame (a frame is the devkit's sample),
boxes `(x, y, z, dx, dy, dz, yaw)` (see `perception3d/design.md`; `dx` is the devkit's length `l`,
`dy` its width `w`), class names from `NUSCENES_CLASSES` (`KITTI_TO_NUSCENES` maps the toolkit's
KITTI classes). The rules:

* Filters (`filter_eval_boxes`), on ground truth and detections alike: a box is kept when its
  distance to the ego origin is below its class's range (`NUSCENES_CLASS_RANGE_M`: 50 m vehicles,
  40 m pedestrian/motorcycle/bicycle, 30 m cone/barrier; strict `<`). The sensor is the origin
  here, distance `sqrt(x**2 + y**2)` (the devkit measures from the ego pose). Ground truth with
  `num_points == 0` is dropped (the devkit counts LiDAR plus radar points; -1 means unknown and
  is kept). A frame with more than 500 detections (all classes, before filtering) is an error,
  as the devkit's result loader refuses it. Not reproduced: the bike-rack filter (bicycles and
  motorcycles inside a `static_object.bicycle_rack` box), which needs nuScenes' map of racks.
* Matching (`accumulate`, per class and distance threshold 0.5, 1, 2, 4 m): the detections of
  the class, listed frame by frame in input order, are visited by descending score; equal scores
  in *descending list position* (the devkit sorts `(score, position)` ascending and reverses).
  Each takes the closest unmatched ground truth of its class in its frame (BEV centre distance;
  the first in input order on a tie); a match if that distance is `< threshold`, else a false
  positive. Precision and recall after every detection are interpolated (`np.interp`, precision
  0 beyond the last recall) at the 101 recall points `0, 0.01, .., 1`, the score likewise.
* AP (`calc_ap`): mean over the recall points above 0.1 (indices 11..100) of
  `max(0, precision - 0.1)`, divided by `1 - 0.1`. A fraction in [0, 1], as the devkit reports
  it.
* TP errors (`calc_tp`, at the 2 m threshold): for each match, ATE = BEV centre distance (m),
  ASE = `1 - IoU` of the boxes aligned at one centre and heading, AOE = smallest yaw difference
  (rad; period pi for `barrier`), AVE = `|v_det - v_gt|` of the xy velocities (m/s), AAE =
  `1 - (attribute correct)`, undefined (NaN) where the ground truth has no attribute. Each is
  averaged cumulatively over the matches in score order, NaN skipped (a run of leading NaN
  averages to 0; all NaN gives 1 everywhere), interpolated at the curve's scores, and averaged
  over the recall points from 11 up to the largest recall reached (the last point whose score is
  nonzero). Where that recall is at most 0.1, or the class has no match or no ground truth, the
  error is 1. Undefined per class, so NaN: AOE, AVE and AAE of `traffic_cone`, AVE and AAE of
  `barrier`.
* A class with no ground truth (after the filters), with detections or without, scores AP 0 at
  every threshold and TP errors 1 (except the NaN above): the devkit's `no_predictions`.
* Means: `AP_mean[c]` = mean of the class's four APs; `mAP` = mean of those over the classes;
  `mATE..mAAE` = NaN-skipping means over the classes (NaN if all are NaN). NDS =
  `(5 * mAP + sum over the five of max(0, 1 - error)) / 10`; a NaN mean error counts 0 there.
* Missing velocities or attributes: not given, velocities are NaN (the devkit's value for an
  unknown velocity) and attributes `''` (no attribute). Every AVE is then NaN, the all-NaN
  cumulative mean makes it 1 for each class, and mAVE = 1; likewise AAE without ground-truth
  attributes (a detection without attributes on a ground truth with one is simply wrong: 1 too).
  The NDS then gets 0 from each of the two: `NDS = (5 mAP + (1-mATE)+ + (1-mASE)+ + (1-mAOE)+) / 10`.
* Classes: the official evaluation uses all ten `NUSCENES_CLASSES` (a class absent from the data
  scores AP 0). `classes=` evaluates a subset with the same per-class numbers and the means over
  the subset (what the devkit's formulas give for that class list; not the official mAP).
  Boxes of classes outside it are dropped.

The devkit refuses an evaluation without a single box (its filter asserts on it); here such a set
simply scores 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception3d.errors import DataError

__all__ = [
    "NUSCENES_CLASSES",
    "NUSCENES_CLASS_RANGE_M",
    "NUSCENES_ATTRIBUTES",
    "KITTI_TO_NUSCENES",
    "NUSCENES_DIST_THRESHOLDS_M",
    "NUSCENES_TP_METRICS",
    "NuScenesGT",
    "NuScenesDets",
    "nuscenes_eval",
]

#: The devkit's ten detection classes (`DETECTION_NAMES`), in its order.
NUSCENES_CLASSES = ("car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian",
                    "motorcycle", "bicycle", "traffic_cone", "barrier")
#: `detection_cvpr_2019` class ranges (m): boxes at `distance >= range` are not evaluated.
NUSCENES_CLASS_RANGE_M = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50,
                          "pedestrian": 40, "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}
#: The devkit's attribute names (`ATTRIBUTE_NAMES`); `''` is "no attribute".
NUSCENES_ATTRIBUTES = ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing",
                       "cycle.with_rider", "cycle.without_rider", "vehicle.moving", "vehicle.parked",
                       "vehicle.stopped")
#: The KITTI benchmark's classes (`io.kitti.BENCHMARK_CLASSES`, the detectors' classes) as nuScenes ones.
KITTI_TO_NUSCENES = {"Car": "car", "Pedestrian": "pedestrian", "Cyclist": "bicycle"}
#: Matching thresholds on the BEV centre distance (m); the TP errors use 2 m.
NUSCENES_DIST_THRESHOLDS_M = (0.5, 1.0, 2.0, 4.0)
#: Our short names of the devkit's TP metrics, in its order: trans_err, scale_err, orient_err,
#: vel_err, attr_err.
NUSCENES_TP_METRICS = ("ATE", "ASE", "AOE", "AVE", "AAE")

_DIST_TH_TP = 2.0
_MIN_RECALL = 0.1
_MIN_PRECISION = 0.1
_MAX_BOXES_PER_SAMPLE = 500
_MEAN_AP_WEIGHT = 5
_NELEM = 101  # recall points 0, 0.01, .., 1
_UNDEFINED = {"traffic_cone": ("AOE", "AVE", "AAE"), "barrier": ("AVE", "AAE")}


# --- inputs ----------------------------------------------------------------------------------
def _array(x, where: str, dtype) -> np.ndarray:
    tensor = getattr(x, "tensor", None)  # Boxes3D
    if tensor is not None:
        x = tensor
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a numeric array, got {type(x).__name__}") from None


def _boxes(x, where: str) -> np.ndarray:
    b = _array(x, where, np.float64)
    if b.size == 0:
        b = b.reshape(0, 7)
    if b.ndim != 2 or b.shape[1] != 7:
        raise DataError(f"{where}: expected shape [N, 7] (x, y, z, dx, dy, dz, yaw), got {b.shape}")
    if not np.isfinite(b).all():
        raise DataError(f"{where}: contains NaN or inf")
    if (b[:, 3:6] <= 0).any():
        raise DataError(f"{where}: box sizes (dx, dy, dz) must be positive")
    return b


def _names(x, n: int, where: str) -> tuple:
    if isinstance(x, str) or x is None:
        raise DataError(f"{where}: expected a sequence of {n} class names, got {x!r}")
    names = tuple(x)
    if len(names) != n:
        raise DataError(f"{where}: expected {n} class names (one per box), got {len(names)}")
    for i, c in enumerate(names):
        if c not in NUSCENES_CLASSES:
            hint = f" (KITTI_TO_NUSCENES maps {c!r} to {KITTI_TO_NUSCENES[c]!r})" if c in KITTI_TO_NUSCENES else ""
            raise DataError(f"{where}[{i}]: {c!r} is not a nuScenes detection class{hint}; "
                            f"expected one of {NUSCENES_CLASSES}")
    return tuple(str(c) for c in names)


def _velocities(x, n: int, where: str) -> np.ndarray:
    if x is None:
        return np.full((n, 2), np.nan)
    v = _array(x, where, np.float64)
    if v.size == 0 and n == 0:
        v = v.reshape(0, 2)
    if v.shape != (n, 2):
        raise DataError(f"{where}: expected shape ({n}, 2) (vx, vy in m/s), got {v.shape}")
    if np.isinf(v).any():
        raise DataError(f"{where}: contains inf (NaN marks an unknown velocity)")
    return v


def _attributes(x, n: int, where: str) -> tuple:
    if x is None:
        return ("",) * n
    if isinstance(x, str):
        raise DataError(f"{where}: expected a sequence of {n} attribute names, got a string")
    attrs = tuple(x)
    if len(attrs) != n:
        raise DataError(f"{where}: expected {n} attribute names (one per box), got {len(attrs)}")
    for i, a in enumerate(attrs):
        if a != "" and a not in NUSCENES_ATTRIBUTES:
            raise DataError(f"{where}[{i}]: {a!r} is not a nuScenes attribute; expected '' or one of "
                            f"{NUSCENES_ATTRIBUTES}")
    return tuple(str(a) for a in attrs)


@dataclass(frozen=True)
class NuScenesGT:
    """Ground truth of one frame (one nuScenes sample).

    Attributes:
        boxes: `[N, 7]` LiDAR-frame boxes `(x, y, z, dx, dy, dz, yaw)` (array, tensor or `Boxes3D`),
            stored as a float64 array.
        names: `N` class names from `NUSCENES_CLASSES`, stored as a tuple.
        num_points: `[N]` int, LiDAR points inside each box; 0 drops the box, -1 is unknown (kept).
        velocities: optional `[N, 2]` `(vx, vy)` m/s in the boxes' frame; NaN is unknown. `None`: all NaN.
        attributes: optional `N` names from `NUSCENES_ATTRIBUTES` or `''`. `None`: all `''`.
    """

    boxes: np.ndarray
    names: Sequence[str]
    num_points: np.ndarray
    velocities: np.ndarray | None = None
    attributes: Sequence[str] | None = None

    def __post_init__(self):
        boxes = _boxes(self.boxes, "NuScenesGT.boxes")
        n = boxes.shape[0]
        names = _names(self.names, n, "NuScenesGT.names")
        pts = _array(self.num_points, "NuScenesGT.num_points", np.float64).reshape(-1)
        if pts.shape != (n,):
            raise DataError(f"NuScenesGT.num_points: expected shape ({n},), got {pts.shape}")
        if not np.isfinite(pts).all() or (pts != np.round(pts)).any() or (pts < -1).any():
            raise DataError("NuScenesGT.num_points: expected integers >= 0 (or -1 for unknown)")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "num_points", pts.astype(np.int64))
        object.__setattr__(self, "velocities", _velocities(self.velocities, n, "NuScenesGT.velocities"))
        object.__setattr__(self, "attributes", _attributes(self.attributes, n, "NuScenesGT.attributes"))

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass(frozen=True)
class NuScenesDets:
    """Detections of one frame (one nuScenes sample).

    Attributes:
        boxes: `[N, 7]` LiDAR-frame boxes `(x, y, z, dx, dy, dz, yaw)` (array, tensor or `Boxes3D`).
        scores: `[N]` finite scores `>= 0` (the devkit's curve takes a score of 0 as "not reached").
        names: `N` class names from `NUSCENES_CLASSES`.
        velocities: optional `[N, 2]` `(vx, vy)` m/s; `None`: all NaN (every AVE undefined).
        attributes: optional `N` names from `NUSCENES_ATTRIBUTES` or `''`; `None`: all `''`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    names: Sequence[str]
    velocities: np.ndarray | None = None
    attributes: Sequence[str] | None = None

    def __post_init__(self):
        boxes = _boxes(self.boxes, "NuScenesDets.boxes")
        n = boxes.shape[0]
        scores = _array(self.scores, "NuScenesDets.scores", np.float64).reshape(-1)
        if scores.shape != (n,):
            raise DataError(f"NuScenesDets.scores: expected shape ({n},), got {scores.shape}")
        if not np.isfinite(scores).all() or (scores < 0).any():
            raise DataError("NuScenesDets.scores: expected finite scores >= 0")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "names", _names(self.names, n, "NuScenesDets.names"))
        object.__setattr__(self, "velocities", _velocities(self.velocities, n, "NuScenesDets.velocities"))
        object.__setattr__(self, "attributes", _attributes(self.attributes, n, "NuScenesDets.attributes"))

    def __len__(self) -> int:
        return self.boxes.shape[0]


# --- the devkit's steps ----------------------------------------------------------------------
def _keep(boxes: np.ndarray, names: tuple, cls: str) -> np.ndarray:
    """`[N]` bool: boxes of class `cls` inside its range (`ego_dist < class_range`)."""
    of_class = np.array([c == cls for c in names], dtype=bool)
    dist = np.sqrt(boxes[:, 0] ** 2 + boxes[:, 1] ** 2)
    return of_class & (dist < NUSCENES_CLASS_RANGE_M[cls])


def _cummean(x: np.ndarray) -> np.ndarray:
    """The devkit's NaN-aware cumulative mean: all NaN -> ones; positions before the first
    non-NaN value -> 0."""
    nan = np.isnan(x)
    if nan.all():
        return np.ones(len(x))
    sums = np.nancumsum(x)
    counts = np.cumsum(~nan)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)


def _angle_diff(yaw_gt: np.ndarray, yaw_det: np.ndarray, period: float) -> np.ndarray:
    """`|smallest angle from det to gt|` with the devkit's wrapping, in [0, pi]."""
    # The devkit reads each yaw back from a quaternion: atan2 of the rotated x axis.
    a = np.arctan2(np.sin(yaw_gt), np.cos(yaw_gt))
    b = np.arctan2(np.sin(yaw_det), np.cos(yaw_det))
    diff = (a - b + period / 2) % period - period / 2
    diff = np.where(diff > np.pi, diff - 2 * np.pi, diff)
    return np.abs(diff)


def _scale_iou(size_gt: np.ndarray, size_det: np.ndarray) -> np.ndarray:
    """IoU of boxes aligned at one centre and heading; sizes `[K, 3]` as (w, l, h)."""
    inter = np.prod(np.minimum(size_gt, size_det), axis=1)
    return inter / (np.prod(size_gt, axis=1) + np.prod(size_det, axis=1) - inter)


def _no_predictions() -> dict:
    return {"precision": np.zeros(_NELEM), "confidence": np.zeros(_NELEM),
            "errors": {m: np.ones(_NELEM) for m in NUSCENES_TP_METRICS}}


def _class_boxes(frames: list, cls: str) -> dict:
    """The boxes of one class left after the filters, concatenated frame by frame in input
    order (the devkit's list order), with the visiting order and each frame's distances.

    Args:
        frames: per frame `(NuScenesGT, NuScenesDets)`.
    """
    gk = [_keep(g.boxes, g.names, cls) & (g.num_points != 0) for g, _ in frames]
    dk = [_keep(d.boxes, d.names, cls) for _, d in frames]
    gt = {"boxes": np.concatenate([g.boxes[k] for (g, _), k in zip(frames, gk)]),
          "vel": np.concatenate([g.velocities[k] for (g, _), k in zip(frames, gk)]),
          "attr": [a for (g, _), k in zip(frames, gk) for a, keep in zip(g.attributes, k) if keep]}
    det = {"boxes": np.concatenate([d.boxes[k] for (_, d), k in zip(frames, dk)]),
           "scores": np.concatenate([d.scores[k] for (_, d), k in zip(frames, dk)]),
           "vel": np.concatenate([d.velocities[k] for (_, d), k in zip(frames, dk)]),
           "attr": [a for (_, d), k in zip(frames, dk) for a, keep in zip(d.attributes, k) if keep]}
    n = det["scores"].shape[0]
    # Ascending by (score, list position), reversed: descending score, later position first.
    order = np.lexsort((np.arange(n), det["scores"]))[::-1]
    det_frame = np.repeat(np.arange(len(frames)), [int(k.sum()) for k in dk])
    gt_start = np.concatenate([[0], np.cumsum([int(k.sum()) for k in gk])])
    # Each frame's detections in visiting order (frames match independently of each other).
    by_frame = order[np.argsort(det_frame[order], kind="stable")]
    det_start = np.concatenate([[0], np.cumsum([int(k.sum()) for k in dk])])
    per_frame = []
    for f in range(len(frames)):
        dets_f = by_frame[det_start[f]:det_start[f + 1]]
        g0, g1 = int(gt_start[f]), int(gt_start[f + 1])
        if dets_f.size == 0 or g1 == g0:
            continue
        diff = det["boxes"][dets_f, None, :2] - gt["boxes"][None, g0:g1, :2]
        dist = np.sqrt(diff[..., 0] ** 2 + diff[..., 1] ** 2)  # [D_f, G_f], BEV centre distance
        per_frame.append((dets_f, g0, dist))
    return {"gt": gt, "det": det, "order": order, "per_frame": per_frame, "npos": int(gt_start[-1])}


def _accumulate(data: dict, cls: str, dist_th: float) -> dict:
    """The devkit's `accumulate` for one class (`_class_boxes`) and threshold.

    Returns:
        `precision`, `confidence` `[101]` and `errors` `{metric: [101]}` at the recall points.
    """
    if data["npos"] == 0:
        return _no_predictions()
    gt, det, order = data["gt"], data["det"], data["order"]
    match_gt = np.full(det["scores"].shape[0], -1, np.int64)  # index into gt
    match_dist = np.zeros(det["scores"].shape[0])
    for dets_f, g0, dist in data["per_frame"]:
        taken = np.zeros(dist.shape[1], dtype=bool)
        for row in np.flatnonzero(dist.min(axis=1) < dist_th):  # the others can never match
            cand = np.where(taken, np.inf, dist[row])
            j = int(np.argmin(cand))  # the first of equal distances, as the devkit's strict `<`
            if cand[j] < dist_th:
                taken[j] = True
                match_gt[dets_f[row]] = g0 + j
                match_dist[dets_f[row]] = cand[j]

    is_tp = match_gt[order] >= 0
    if not is_tp.any():
        return _no_predictions()
    tp = np.cumsum(is_tp.astype(np.int64)).astype(float)
    fp = np.cumsum((~is_tp).astype(np.int64)).astype(float)
    prec = tp / (fp + tp)
    rec = tp / float(data["npos"])
    rec_interp = np.linspace(0, 1, _NELEM)
    prec = np.interp(rec_interp, rec, prec, right=0)
    conf = np.interp(rec_interp, rec, det["scores"][order], right=0)

    # The matches' errors, in visiting order.
    m = order[is_tp]
    g = match_gt[m]
    wlh = [4, 3, 5]  # the devkit's size order (w, l, h)
    dv = det["vel"][m] - gt["vel"][g]
    attr_acc = np.array([np.nan if gt["attr"][j] == "" else float(gt["attr"][j] == det["attr"][i])
                         for i, j in zip(m, g)])
    match_errors = {
        "ATE": match_dist[m],
        "ASE": 1 - _scale_iou(gt["boxes"][g][:, wlh], det["boxes"][m][:, wlh]),
        "AOE": _angle_diff(gt["boxes"][g, 6], det["boxes"][m, 6], np.pi if cls == "barrier" else 2 * np.pi),
        "AVE": np.sqrt(dv[:, 0] ** 2 + dv[:, 1] ** 2),
        "AAE": 1 - attr_acc,
    }
    match_conf = det["scores"][m]
    # Cumulative mean, then interpolated at the curve's scores (np.interp needs ascending x).
    errors = {name: np.interp(conf[::-1], match_conf[::-1], _cummean(values)[::-1])[::-1]
              for name, values in match_errors.items()}
    return {"precision": prec, "confidence": conf, "errors": errors}


def _calc_ap(md: dict) -> float:
    prec = md["precision"][round(100 * _MIN_RECALL) + 1:] - _MIN_PRECISION
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - _MIN_PRECISION)


def _calc_tp(md: dict, metric: str) -> float:
    first = round(100 * _MIN_RECALL) + 1  # the error at the min recall itself is excluded
    nonzero = np.flatnonzero(md["confidence"])
    last = int(nonzero[-1]) if nonzero.size else 0  # index of the largest recall reached
    if last < first:
        return 1.0
    return float(np.mean(md["errors"][metric][first:last + 1]))


def _nanmean(values: list) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float("nan") if np.isnan(arr).all() else float(np.nanmean(arr))


# --- public ----------------------------------------------------------------------------------
def nuscenes_eval(
    gts: Sequence[NuScenesGT],
    dets: Sequence[NuScenesDets],
    classes: Sequence[str] = NUSCENES_CLASSES,
) -> dict:
    """The nuScenes detection metrics of nuscenes-devkit 1.2.0 (rules in the module docstring).

    Args:
        gts: one `NuScenesGT` per frame.
        dets: one `NuScenesDets` per frame, in the same order.
        classes: the classes to evaluate; the official evaluation uses all of `NUSCENES_CLASSES`.

    Returns:
        A plain dict, APs and errors as the devkit reports them (AP a fraction in [0, 1]):
        `mAP`, `NDS`, `mATE`, `mASE`, `mAOE`, `mAVE`, `mAAE` (floats; the devkit's `mean_ap`,
        `nd_score`, `tp_errors`); `AP` `{class: {0.5: ap, 1.0: .., 2.0: .., 4.0: ..}}`
        (`label_aps`); `AP_mean` `{class: mean over the thresholds}` (`mean_dist_aps`);
        `TP_errors` `{class: {"ATE": .., "ASE": .., "AOE": .., "AVE": .., "AAE": ..}}`
        (`label_tp_errors`, NaN where undefined); `num_gt`, `num_dets` `{class: int}` boxes
        left after the filters; `classes` (tuple).

    Raises:
        DataError: frames not paired one to one, no frames, a frame with more than 500
            detections, or unknown or repeated classes.
    """
    gts, dets = list(gts), list(dets)
    if len(gts) != len(dets):
        raise DataError(f"gts and dets: expected one entry per frame each, got {len(gts)} and {len(dets)}")
    if not gts:
        raise DataError("gts and dets: expected at least one frame, got none")
    for i, (g, d) in enumerate(zip(gts, dets)):
        if not isinstance(g, NuScenesGT):
            raise DataError(f"gts[{i}]: expected a NuScenesGT, got {type(g).__name__}")
        if not isinstance(d, NuScenesDets):
            raise DataError(f"dets[{i}]: expected a NuScenesDets, got {type(d).__name__}")
        if len(d) > _MAX_BOXES_PER_SAMPLE:
            raise DataError(f"dets[{i}]: {len(d)} detections; the nuScenes evaluation allows at most "
                            f"{_MAX_BOXES_PER_SAMPLE} per frame (keep the highest-scoring ones)")
    if isinstance(classes, str):
        raise DataError(f"classes: expected a sequence of class names, got the string {classes!r}")
    classes = tuple(classes)
    if not classes:
        raise DataError("classes: expected at least one class")
    for c in classes:
        if c not in NUSCENES_CLASSES:
            raise DataError(f"classes: {c!r} is not a nuScenes detection class; expected some of {NUSCENES_CLASSES}")
    if len(set(classes)) != len(classes):
        raise DataError(f"classes: a class is listed twice in {classes}")

    ap: dict = {}
    tp_errors: dict = {}
    num_gt: dict = {}
    num_dets: dict = {}
    frames = list(zip(gts, dets))
    for c in classes:
        data = _class_boxes(frames, c)
        num_gt[c] = data["npos"]
        num_dets[c] = int(data["det"]["scores"].shape[0])
        mds = {th: _accumulate(data, c, th) for th in NUSCENES_DIST_THRESHOLDS_M}
        ap[c] = {th: _calc_ap(md) for th, md in mds.items()}
        tp_errors[c] = {m: float("nan") if m in _UNDEFINED.get(c, ()) else _calc_tp(mds[_DIST_TH_TP], m)
                        for m in NUSCENES_TP_METRICS}

    ap_mean = {c: float(np.mean(list(ap[c].values()))) for c in classes}
    m_ap = float(np.mean(list(ap_mean.values())))
    mean_errors = {m: _nanmean([tp_errors[c][m] for c in classes]) for m in NUSCENES_TP_METRICS}
    # 1 - error, bounded below by 0; Python's max keeps 0.0 against a NaN, as the devkit's does.
    tp_scores = [max(0.0, 1.0 - mean_errors[m]) for m in NUSCENES_TP_METRICS]
    nds = float(_MEAN_AP_WEIGHT * m_ap + np.sum(tp_scores)) / float(_MEAN_AP_WEIGHT + len(tp_scores))
    out = {"mAP": m_ap, "NDS": nds}
    out.update({"m" + m: mean_errors[m] for m in NUSCENES_TP_METRICS})
    out.update({"AP": ap, "AP_mean": ap_mean, "TP_errors": tp_errors, "num_gt": num_gt,
                "num_dets": num_dets, "classes": classes})
    return out
