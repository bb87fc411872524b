"""Tests for perception3d.metrics.nuscenes: known answers worked out from nuscenes-devkit 1.2.0's
definitions, and agreement with the devkit itself (skipped where it is not importable)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from perception3d.metrics.nuscenes import (
    KITTI_TO_NUSCENES,
    NUSCENES_ATTRIBUTES,
    NUSCENES_CLASS_RANGE_M,
    NUSCENES_CLASSES,
    NUSCENES_DIST_THRESHOLDS_M,
    NUSCENES_TP_METRICS,
    NuScenesDets,
    NuScenesGT,
    nuscenes_eval,
)
from perception3d.io.kitti import BENCHMARK_CLASSES as CLASSES
from perception3d.structures import Boxes3D

SIZES = {"car": (4.5, 1.9, 1.6), "truck": (7.0, 2.5, 3.0), "bus": (11.0, 2.9, 3.4),
         "pedestrian": (0.7, 0.6, 1.75), "bicycle": (1.7, 0.6, 1.3), "motorcycle": (2.1, 0.8, 1.5),
         "traffic_cone": (0.4, 0.4, 1.0), "barrier": (0.5, 2.5, 1.0), "trailer": (10.0, 2.9, 3.8),
         "construction_vehicle": (6.5, 2.8, 3.2)}
ATTRS = {"car": ("vehicle.moving", "vehicle.parked", "vehicle.stopped"),
         "pedestrian": ("pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down"),
         "bicycle": ("cycle.with_rider", "cycle.without_rider")}
ATTRS.update({c: ATTRS["car"] for c in ("truck", "bus", "trailer", "construction_vehicle")})
ATTRS["motorcycle"] = ATTRS["bicycle"]
ATTRS.update({"traffic_cone": ("",), "barrier": ("",)})
DEVKIT_TP = {"ATE": "trans_err", "ASE": "scale_err", "AOE": "orient_err", "AVE": "vel_err", "AAE": "attr_err"}


def _box(x, y, cls="car", yaw=0.3):
    return [x, y, -1.0, *SIZES[cls], yaw]


def _gt(boxes, names, pts=None, **kw) -> NuScenesGT:
    return NuScenesGT(np.array(boxes, dtype=float).reshape(-1, 7), names,
                      np.full(len(names), 10) if pts is None else pts, **kw)


def _dets(boxes, scores, names, **kw) -> NuScenesDets:
    return NuScenesDets(np.array(boxes, dtype=float).reshape(-1, 7), np.array(scores, dtype=float), names, **kw)


def _ap(prec_at_points) -> float:
    """calc_ap by hand: precision at recall points 0.11 .. 1.0."""
    p = np.clip(np.asarray(prec_at_points, float) - 0.1, 0, None)
    return float(p.mean() / 0.9)


# --- known answers ---------------------------------------------------------------------------
def test_perfect_detections_one_class():
    gts, dets = [], []
    for f in range(3):
        b = [_box(10.0 + f, -5.0, "car", yaw=0.2 * f), _box(-20.0, 7.0, "pedestrian", yaw=-1.0)]
        vel = [[1.0, 2.0], [0.5, 0.0]]
        attrs = ["vehicle.moving", "pedestrian.standing"]
        gts.append(_gt(b, ["car", "pedestrian"], velocities=vel, attributes=attrs))
        dets.append(_dets(b, [0.9, 0.8], ["car", "pedestrian"], velocities=vel, attributes=attrs))
    out = nuscenes_eval(gts, dets, classes=("car", "pedestrian"))
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert out["NDS"] == pytest.approx(1.0, abs=1e-12)
    for c in ("car", "pedestrian"):
        assert set(out["AP"][c]) == set(NUSCENES_DIST_THRESHOLDS_M)
        assert all(v == pytest.approx(1.0, abs=1e-12) for v in out["AP"][c].values())
        assert all(out["TP_errors"][c][m] == pytest.approx(0.0, abs=1e-12) for m in NUSCENES_TP_METRICS)
        assert out["num_gt"][c] == 3 and out["num_dets"][c] == 3


def test_perfect_detections_official_ten_classes():
    """All ten classes by default: absent classes score AP 0 and TP errors 1 (NaN where the
    devkit leaves a metric undefined), so one perfect class gives mAP 0.1."""
    b = [_box(10.0, 0.0)]
    vel, attr = [[1.0, 0.0]], ["vehicle.parked"]
    out = nuscenes_eval([_gt(b, ["car"], velocities=vel, attributes=attr)],
                        [_dets(b, [0.5], ["car"], velocities=vel, attributes=attr)])
    assert out["classes"] == NUSCENES_CLASSES
    assert out["mAP"] == pytest.approx(0.1, abs=1e-12)
    assert out["AP"]["truck"] == {th: 0.0 for th in NUSCENES_DIST_THRESHOLDS_M}
    assert out["TP_errors"]["truck"]["ATE"] == 1.0
    assert math.isnan(out["TP_errors"]["traffic_cone"]["AOE"])
    assert not math.isnan(out["TP_errors"]["barrier"]["AOE"])
    assert math.isnan(out["TP_errors"]["barrier"]["AVE"]) and math.isnan(out["TP_errors"]["barrier"]["AAE"])
    assert out["mATE"] == pytest.approx(0.9) and out["mASE"] == pytest.approx(0.9)
    assert out["mAOE"] == pytest.approx(8 / 9)  # traffic_cone excluded
    assert out["mAVE"] == pytest.approx(7 / 8) and out["mAAE"] == pytest.approx(7 / 8)  # cone, barrier excluded
    nds = (5 * 0.1 + 0.1 + 0.1 + 1 / 9 + 1 / 8 + 1 / 8) / 10
    assert out["NDS"] == pytest.approx(nds, abs=1e-12)


def test_equal_scores_later_detection_first():
    """Equal scores: the devkit visits the detection listed later first. B (listed second, 0.7 m
    off) takes the one car before A (exact) at thresholds >= 1 m; at 0.5 m B is a false positive
    ahead of A's hit."""
    gt = [_gt([_box(10.0, 0.0)], ["car"])]
    det = [_dets([_box(10.0, 0.0), _box(10.7, 0.0)], [0.5, 0.5], ["car", "car"])]
    out = nuscenes_eval(gt, det, classes=("car",))
    rec = np.arange(11, 101) / 100
    # 0.5 m: [FP, TP] -> precision 0.5 * recall, linearly from (0, 0) to (1, 0.5).
    assert out["AP"]["car"][0.5] == pytest.approx(_ap(0.5 * rec), abs=1e-12)
    assert out["AP"]["car"][0.5] == pytest.approx(0.2, abs=1e-12)
    # >= 1 m: [TP, FP] at recall 1, 1 -> precision 1 below recall 1, the last precision (0.5) at it.
    for th in (1.0, 2.0, 4.0):
        assert out["AP"]["car"][th] == pytest.approx(80.5 / 81, abs=1e-12)
    assert out["TP_errors"]["car"]["ATE"] == pytest.approx(0.7, abs=1e-12)  # B's error, not A's 0


def test_distance_equal_to_threshold_is_no_match():
    gt = [_gt([_box(10.0, 0.0)], ["car"])]
    out = nuscenes_eval(gt, [_dets([_box(11.0, 0.0)], [0.9], ["car"])], classes=("car",))
    assert out["AP"]["car"] == pytest.approx({0.5: 0.0, 1.0: 0.0, 2.0: 1.0, 4.0: 1.0}, abs=1e-12)
    assert out["TP_errors"]["car"]["ATE"] == 1.0


def test_velocity_error_leading_nan_averages_to_zero():
    """The devkit's cumulative mean gives 0 before the first defined value: the first match
    (GT velocity unknown) has AVE 0 there, the second 1 m/s. Interpolated along the scores
    (0.9 at recall <= 0.5, then linearly to 0.8 at recall 1) the AVE rises from 0 to 1 between
    recall 0.5 and 1: mean over recall points 0.11..1 = (1 + 2 + .. + 50) / 50 / 90."""
    gt = [_gt([_box(10.0, 0.0), _box(20.0, 0.0)], ["car", "car"], velocities=[[np.nan, np.nan], [1.0, 0.0]])]
    det = [_dets([_box(10.0, 0.0), _box(20.0, 0.0)], [0.9, 0.8], ["car", "car"],
                 velocities=[[0.0, 0.0], [2.0, 0.0]])]
    out = nuscenes_eval(gt, det, classes=("car",))
    assert out["TP_errors"]["car"]["AVE"] == pytest.approx(25.5 / 90, abs=1e-9)


def test_all_undefined_mean_error_counts_zero_in_nds():
    """traffic_cone alone: mAOE, mAVE and mAAE are NaN, and each adds 0 to the NDS."""
    b = [_box(10.0, 0.0, "traffic_cone")]
    out = nuscenes_eval([_gt(b, ["traffic_cone"])], [_dets(b, [0.9], ["traffic_cone"])], classes=("traffic_cone",))
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert all(math.isnan(out[k]) for k in ("mAOE", "mAVE", "mAAE"))
    assert out["NDS"] == pytest.approx(0.7, abs=1e-12)


def test_class_with_only_false_positives_scores_zero():
    b = [_box(10.0, 0.0)]
    gt = [_gt(b, ["car"])]
    det = [_dets(b + [_box(-10.0, 3.0, "bus")], [0.9, 0.8], ["car", "bus"])]
    out = nuscenes_eval(gt, det, classes=("car", "bus"))
    assert out["AP"]["bus"] == {th: 0.0 for th in NUSCENES_DIST_THRESHOLDS_M}
    assert out["TP_errors"]["bus"] == {m: 1.0 for m in NUSCENES_TP_METRICS}
    assert out["AP_mean"]["car"] == pytest.approx(1.0, abs=1e-12)
    assert out["mAP"] == pytest.approx(0.5, abs=1e-12)
    assert out["mATE"] == pytest.approx(0.5, abs=1e-12)  # car 0, bus 1
    assert out["num_gt"]["bus"] == 0 and out["num_dets"]["bus"] == 1


def test_class_range_filter():
    """Pedestrians count below 40 m (strict), cars below 50 m; boxes beyond, GT or detections,
    do not take part: the missed pedestrian at 40 m and the false positive at 45 m change nothing."""
    b_ped = _box(39.9, 0.0, "pedestrian")
    b_car = _box(0.0, -45.0, "car")
    gt = [_gt([b_ped, _box(40.0, 0.0, "pedestrian"), b_car], ["pedestrian", "pedestrian", "car"])]
    det = [_dets([b_ped, _box(0.0, 45.0, "pedestrian"), b_car], [0.5, 0.95, 0.7],
                 ["pedestrian", "pedestrian", "car"])]
    out = nuscenes_eval(gt, det, classes=("pedestrian", "car"))
    assert out["num_gt"] == {"pedestrian": 1, "car": 1}
    assert out["num_dets"] == {"pedestrian": 1, "car": 1}
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
    # The same pedestrian at 40.5 m counts as a car would (car range 50 m): not evaluated at all.
    far = [_gt([_box(40.5, 0.0, "pedestrian")], ["pedestrian"])]
    out = nuscenes_eval(far, [_dets([_box(40.5, 0.0, "pedestrian")], [0.9], ["pedestrian"])],
                        classes=("pedestrian",))
    assert out["num_gt"]["pedestrian"] == 0 and out["mAP"] == 0.0


def test_gt_without_points_is_dropped_but_its_detection_stays():
    """A GT box with no LiDAR point is not evaluated; a detection on it is a false positive
    (here scored above the true positive: [FP, TP], AP 0.2). -1 points (unknown) is kept."""
    gt = [_gt([_box(10.0, 0.0), _box(20.0, 0.0)], ["car", "car"], pts=[5, 0])]
    det = [_dets([_box(10.0, 0.0), _box(20.0, 0.0)], [0.9, 0.95], ["car", "car"])]
    out = nuscenes_eval(gt, det, classes=("car",))
    assert out["num_gt"]["car"] == 1
    assert all(out["AP"]["car"][th] == pytest.approx(0.2, abs=1e-12) for th in NUSCENES_DIST_THRESHOLDS_M)
    gt = [_gt([_box(10.0, 0.0), _box(20.0, 0.0)], ["car", "car"], pts=[5, -1])]
    out = nuscenes_eval(gt, det, classes=("car",))
    assert out["num_gt"]["car"] == 2 and out["mAP"] == pytest.approx(1.0, abs=1e-12)


def test_missing_velocities_and_attributes_give_error_one():
    """Not given: every AVE/AAE is NaN, which the devkit's cumulative mean turns into 1, so
    mAVE = mAAE = 1 and the NDS gets nothing from them."""
    gts, dets = [], []
    for f in range(4):
        b = [_box(5.0 * f, 3.0, "car", yaw=0.1), _box(-3.0, 5.0 * f, "pedestrian")]
        d = [list(b[0]), list(b[1])]
        d[0][0] += 0.2
        d[1][6] += 0.5
        gts.append(_gt(b, ["car", "pedestrian"]))
        dets.append(_dets(d, [0.9 - 0.1 * f, 0.6], ["car", "pedestrian"]))
    out = nuscenes_eval(gts, dets, classes=("car", "pedestrian"))
    assert out["mAVE"] == 1.0 and out["mAAE"] == 1.0
    assert out["TP_errors"]["car"]["ATE"] == pytest.approx(0.2, abs=1e-12)
    assert out["TP_errors"]["pedestrian"]["AOE"] == pytest.approx(0.5, abs=1e-12)
    expected = (5 * out["mAP"] + (1 - out["mATE"]) + (1 - out["mASE"]) + (1 - out["mAOE"])) / 10
    assert out["NDS"] == pytest.approx(expected, abs=1e-12)


def test_barrier_orientation_has_period_pi():
    b = [_box(10.0, 0.0, "barrier", yaw=0.2)]
    d = [_box(10.0, 0.0, "barrier", yaw=0.2 + math.pi)]
    out = nuscenes_eval([_gt(b, ["barrier"])], [_dets(d, [0.9], ["barrier"])], classes=("barrier",))
    assert out["TP_errors"]["barrier"]["AOE"] == pytest.approx(0.0, abs=1e-9)
    out = nuscenes_eval([_gt(b, ["car"])], [_dets(d, [0.9], ["car"])], classes=("car",))
    assert out["TP_errors"]["car"]["AOE"] == pytest.approx(math.pi, abs=1e-9)


def test_accepts_tensors_and_boxes3d():
    b = torch.tensor([_box(10.0, 0.0)], dtype=torch.float32)
    out = nuscenes_eval([NuScenesGT(Boxes3D(b), ["car"], torch.tensor([3]))],
                        [NuScenesDets(b, torch.tensor([0.5]), ["car"])], classes=("car",))
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)


def test_kitti_mapping_covers_toolkit_classes():
    assert set(KITTI_TO_NUSCENES) == set(CLASSES)
    assert all(v in NUSCENES_CLASSES for v in KITTI_TO_NUSCENES.values())
    assert {a for v in ATTRS.values() for a in v} <= set(NUSCENES_ATTRIBUTES) | {""}


def test_bad_input():
    b = [_box(10.0, 0.0)]
    gt, det = _gt(b, ["car"]), _dets(b, [0.5], ["car"])
    with pytest.raises(DataError, match="one entry per frame"):
        nuscenes_eval([gt, gt], [det])
    with pytest.raises(DataError, match="at least one frame"):
        nuscenes_eval([], [])
    with pytest.raises(DataError, match=r"dets\[0\]: expected a NuScenesDets"):
        nuscenes_eval([gt], [{"boxes": b}])
    with pytest.raises(DataError, match=r"NuScenesGT.boxes: expected shape \[N, 7\]"):
        NuScenesGT(np.zeros((2, 6)), ["car", "car"], [1, 1])
    with pytest.raises(DataError, match="NaN or inf"):
        NuScenesDets(np.full((1, 7), np.nan), [0.5], ["car"])
    with pytest.raises(DataError, match="KITTI_TO_NUSCENES maps 'Car' to 'car'"):
        NuScenesGT(np.array(b), ["Car"], [1])
    with pytest.raises(DataError, match=r"NuScenesGT.num_points: expected shape \(1,\)"):
        NuScenesGT(np.array(b), ["car"], [1, 2])
    with pytest.raises(DataError, match="num_points: expected integers"):
        NuScenesGT(np.array(b), ["car"], [1.5])
    with pytest.raises(DataError, match="scores: expected finite scores >= 0"):
        NuScenesDets(np.array(b), [-0.1], ["car"])
    with pytest.raises(DataError, match=r"attributes\[0\]: 'moving' is not a nuScenes attribute"):
        NuScenesDets(np.array(b), [0.5], ["car"], attributes=["moving"])
    with pytest.raises(DataError, match=r"velocities: expected shape \(1, 2\)"):
        NuScenesDets(np.array(b), [0.5], ["car"], velocities=[1.0, 2.0])
    with pytest.raises(DataError, match="sizes"):
        NuScenesGT(np.array([[0, 0, 0, 0, 1, 1, 0]], float), ["car"], [1])
    many = _dets([_box(0.1 * i, 0.0) for i in range(501)], np.linspace(0, 1, 501), ["car"] * 501)
    with pytest.raises(DataError, match=r"dets\[1\]: 501 detections.*at most 500"):
        nuscenes_eval([gt, gt], [det, many])
    with pytest.raises(DataError, match="'Car' is not a nuScenes detection class"):
        nuscenes_eval([gt], [det], classes=("Car",))
    with pytest.raises(DataError, match="listed twice"):
        nuscenes_eval([gt], [det], classes=("car", "car"))


# --- agreement with nuscenes-devkit ----------------------------------------------------------
@pytest.fixture(scope="module")
def devkit():
    try:
        from pyquaternion import Quaternion
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.common.data_classes import EvalBoxes
        from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
        from nuscenes.eval.detection.data_classes import DetectionBox
        from nuscenes.eval.detection.evaluate import DetectionEval
    except Exception as e:  # noqa: BLE001 - any import failure means "no devkit here"
        pytest.skip(f"nuscenes-devkit 1.2.0 is not importable ({type(e).__name__}: {e}); "
                    "scripts/install.sh installs it")
    return dict(Quaternion=Quaternion, config_factory=config_factory, EvalBoxes=EvalBoxes,
                add_center_dist=add_center_dist, filter_eval_boxes=filter_eval_boxes,
                DetectionBox=DetectionBox, DetectionEval=DetectionEval)


class _OneSampleNusc:
    """What the devkit's `add_center_dist` / `filter_eval_boxes` read from a NuScenes object: an
    ego pose at the origin (the sensor is the ego origin) and no bike racks."""

    def get(self, table, token):
        return {"sample": {"anns": [], "data": {"LIDAR_TOP": token}},
                "sample_data": {"ego_pose_token": token},
                "ego_pose": {"translation": [0.0, 0.0, 0.0]}}[table]


def _devkit_eval(dk, gts, dets, classes):
    """The devkit's DetectionEval on the same boxes, built in memory: its own center-distance and
    filter steps, then its `evaluate` (accumulate, calc_ap, calc_tp, DetectionMetrics)."""
    Q, Box = dk["Quaternion"], dk["DetectionBox"]

    def box(token, b, name, vel, attr, score=-1.0, pts=-1):
        q = Q(axis=[0.0, 0.0, 1.0], angle=float(b[6]))
        return Box(sample_token=token, translation=tuple(float(v) for v in b[:3]),
                   size=(float(b[4]), float(b[3]), float(b[5])), rotation=tuple(float(v) for v in q.elements),
                   velocity=(float(vel[0]), float(vel[1])), num_pts=int(pts), detection_name=name,
                   detection_score=float(score), attribute_name=attr)

    gt_boxes, pred_boxes = dk["EvalBoxes"](), dk["EvalBoxes"]()
    for f, (g, d) in enumerate(zip(gts, dets)):
        token = f"sample{f:03d}"
        gt_boxes.add_boxes(token, [box(token, *a[:4], pts=a[4]) for a in
                                   zip(g.boxes, g.names, g.velocities, g.attributes, g.num_points)])
        pred_boxes.add_boxes(token, [box(token, *a[:4], score=a[4]) for a in
                                     zip(d.boxes, d.names, d.velocities, d.attributes, d.scores)])
    nusc = _OneSampleNusc()
    cfg = dk["config_factory"]("detection_cvpr_2019")
    cfg.class_names = list(classes)  # the devkit iterates these (all ten in its config)
    ev = object.__new__(dk["DetectionEval"])
    ev.cfg, ev.verbose = cfg, False
    ev.gt_boxes = dk["filter_eval_boxes"](nusc, dk["add_center_dist"](nusc, gt_boxes), cfg.class_range)
    ev.pred_boxes = dk["filter_eval_boxes"](nusc, dk["add_center_dist"](nusc, pred_boxes), cfg.class_range)
    metrics, _ = ev.evaluate()
    return metrics


def test_constants_match_devkit_config(devkit):
    from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES, DETECTION_NAMES

    cfg = devkit["config_factory"]("detection_cvpr_2019")
    assert NUSCENES_CLASSES == tuple(DETECTION_NAMES) == tuple(cfg.class_range)
    assert NUSCENES_ATTRIBUTES == tuple(ATTRIBUTE_NAMES)
    assert NUSCENES_CLASS_RANGE_M == cfg.class_range
    assert NUSCENES_DIST_THRESHOLDS_M == tuple(cfg.dist_ths) and cfg.dist_th_tp == 2.0
    assert (cfg.min_recall, cfg.min_precision, cfg.max_boxes_per_sample, cfg.mean_ap_weight) == (0.1, 0.1, 500, 5)


def _max_difference(ours: dict, metrics, classes) -> float:
    """Largest |ours - devkit| over every reported number; NaN must meet NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the devkit's nanmean of all-NaN errors
        pairs = [(ours["mAP"], metrics.mean_ap), (ours["NDS"], metrics.nd_score)]
        tp = metrics.tp_errors
    pairs += [(ours["m" + m], tp[DEVKIT_TP[m]]) for m in NUSCENES_TP_METRICS]
    for c in classes:
        pairs += [(ours["AP"][c][th], metrics.get_label_ap(c, th)) for th in NUSCENES_DIST_THRESHOLDS_M]
        pairs.append((ours["AP_mean"][c], metrics.mean_dist_aps[c]))
        pairs += [(ours["TP_errors"][c][m], metrics.get_label_tp(c, DEVKIT_TP[m])) for m in NUSCENES_TP_METRICS]
    worst = 0.0
    for a, b in pairs:
        a, b = float(a), float(b)
        assert math.isnan(a) == math.isnan(b), (a, b)
        if not math.isnan(a):
            worst = max(worst, abs(a - b))
    return worst


def _random_scene(seed: int, n_frames: int = 30, velocities: bool = True, attributes: bool = True,
                  ties: bool = False):
    """Frames of several classes (bus and motorcycle only as false positives), some beyond the
    class ranges or without points, with perturbed, duplicated, relabelled and spurious
    detections; `ties` rounds the scores to one decimal."""
    rng = np.random.default_rng(seed)
    gt_classes = ("car", "truck", "pedestrian", "bicycle", "traffic_cone", "barrier")
    gts, dets = [], []
    for _ in range(n_frames):
        k = int(rng.integers(2, 12))
        names = [str(c) for c in rng.choice(gt_classes, k)]
        boxes = [_box(*rng.uniform(-45, 45, 2), c, yaw=rng.uniform(-math.pi, math.pi)) for c in names]
        if k and rng.random() < 0.2:  # a duplicated GT box: equal distances, the first wins
            boxes.append(list(boxes[0]))
            names.append(names[0])
        boxes = np.array(boxes, float).reshape(-1, 7)
        boxes[:, 3:6] *= rng.uniform(0.8, 1.2, (len(names), 3))
        pts = rng.choice([0, 1, 5, 30, -1], len(names), p=[0.15, 0.2, 0.3, 0.3, 0.05])
        vel = rng.normal(0, 3, (len(names), 2))
        vel[rng.random(len(names)) < 0.1] = np.nan
        attrs = [str(rng.choice(ATTRS[c])) if rng.random() > 0.1 else "" for c in names]
        gts.append(NuScenesGT(boxes, names, pts, vel if velocities else None, attrs if attributes else None))

        d_boxes, d_names, d_scores, d_vel, d_attr = [], [], [], [], []
        for i, c in enumerate(names):
            for _ in range(int(rng.random() < 0.85) + int(rng.random() < 0.2)):
                b = boxes[i].copy()
                b[:2] += rng.normal(0, rng.choice([0.1, 0.4, 1.2]), 2)
                b[3:6] *= rng.uniform(0.85, 1.15, 3)
                b[6] += rng.normal(0, 0.3) + (math.pi if rng.random() < 0.1 else 0.0)
                d_boxes.append(b)
                d_names.append(c if rng.random() < 0.9 else str(rng.choice(NUSCENES_CLASSES)))
                d_scores.append(rng.uniform(0.05, 1.0))
                d_vel.append(vel[i] + rng.normal(0, 0.5, 2) if rng.random() > 0.05 else [np.nan, np.nan])
                d_attr.append(str(rng.choice(ATTRS[c])))
        for _ in range(int(rng.integers(0, 4))):  # spurious, including classes without GT
            c = str(rng.choice(("car", "pedestrian", "bus", "motorcycle", "barrier")))
            d_boxes.append(_box(*rng.uniform(-50, 50, 2), c, yaw=rng.uniform(-3, 3)))
            d_names.append(c)
            d_scores.append(rng.uniform(0.05, 1.0))
            d_vel.append(rng.normal(0, 3, 2))
            d_attr.append(str(rng.choice(ATTRS[c])))
        if d_boxes and rng.random() < 0.3:  # an exact duplicate: same box, same score
            for lst in (d_boxes, d_names, d_scores, d_vel, d_attr):
                lst.append(lst[0])
        scores = np.array(d_scores, float)
        if ties:
            scores = np.maximum(np.round(scores, 1), 0.1)
        dets.append(NuScenesDets(np.array(d_boxes, float).reshape(-1, 7), scores, d_names,
                                 np.array(d_vel, float).reshape(-1, 2) if velocities else None,
                                 d_attr if attributes else None))
    return gts, dets


@pytest.mark.parametrize("seed,velocities,attributes,ties", [
    (0, True, True, False),
    (1, True, True, True),
    (2, False, False, False),
    (3, False, False, True),
    (4, True, False, True),
    (5, False, True, False),
])
def test_agrees_with_devkit_random_scenes(devkit, seed, velocities, attributes, ties):
    gts, dets = _random_scene(seed, velocities=velocities, attributes=attributes, ties=ties)
    ours = nuscenes_eval(gts, dets)
    assert _max_difference(ours, _devkit_eval(devkit, gts, dets, NUSCENES_CLASSES), NUSCENES_CLASSES) <= 1e-6
    assert 0.05 < ours["mAP"] < 0.95  # a scene that tests something
    if not velocities:
        assert ours["mAVE"] == 1.0
    if not attributes:
        assert ours["mAAE"] == 1.0


def test_agrees_with_devkit_class_subset(devkit):
    classes = ("car", "pedestrian", "bicycle", "bus")
    gts, dets = _random_scene(7, ties=True)
    ours = nuscenes_eval(gts, dets, classes=classes)
    assert _max_difference(ours, _devkit_eval(devkit, gts, dets, classes), classes) <= 1e-6


@pytest.mark.parametrize("case", ["ties", "fp_only", "range", "no_points", "leading_nan", "cone_only"])
def test_known_answer_scenes_agree_with_devkit(devkit, case):
    b = [_box(10.0, 0.0)]
    if case == "ties":
        gts, dets = [_gt(b, ["car"])], [_dets([_box(10.0, 0.0), _box(10.7, 0.0)], [0.5, 0.5], ["car", "car"])]
    elif case == "fp_only":
        gts, dets = [_gt(b, ["car"])], [_dets(b + [_box(-10.0, 3.0, "bus")], [0.9, 0.8], ["car", "bus"])]
    elif case == "range":
        gts = [_gt([_box(39.9, 0.0, "pedestrian"), _box(40.0, 0.0, "pedestrian"), _box(0.0, -45.0)],
                   ["pedestrian", "pedestrian", "car"])]
        dets = [_dets([_box(39.9, 0.0, "pedestrian"), _box(0.0, 45.0, "pedestrian"), _box(0.0, -45.0)],
                      [0.5, 0.95, 0.7], ["pedestrian", "pedestrian", "car"])]
    elif case == "no_points":
        gts = [_gt([_box(10.0, 0.0), _box(20.0, 0.0)], ["car", "car"], pts=[5, 0])]
        dets = [_dets([_box(10.0, 0.0), _box(20.0, 0.0)], [0.9, 0.95], ["car", "car"])]
    elif case == "leading_nan":
        gts = [_gt([_box(10.0, 0.0), _box(20.0, 0.0)], ["car", "car"], velocities=[[np.nan, np.nan], [1.0, 0.0]])]
        dets = [_dets([_box(10.0, 0.0), _box(20.0, 0.0)], [0.9, 0.8], ["car", "car"],
                      velocities=[[0.0, 0.0], [2.0, 0.0]])]
    else:
        b = [_box(10.0, 0.0, "traffic_cone")]
        gts, dets = [_gt(b, ["traffic_cone"])], [_dets(b, [0.9], ["traffic_cone"])]
    classes = ("traffic_cone",) if case == "cone_only" else NUSCENES_CLASSES
    ours = nuscenes_eval(gts, dets, classes=classes)
    assert _max_difference(ours, _devkit_eval(devkit, gts, dets, classes), classes) <= 1e-12
