"""Tests for perception3d.metrics.detection with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from perception3d.metrics.detection import (
    FrameGT,
    average_precision_r40,
    box_errors,
    oracle_ap,
    kitti_ap,
    kitti_ap_by_distance,
    kitti_ap_interval,
    kitti_difficulty,
    kitti_recall,
    missed_objects,
    nuscenes_map,
)
from perception3d.structures import Boxes3D, Detections3D

SIZES = {0: (4.0, 1.8, 1.6), 1: (0.8, 0.6, 1.8), 2: (1.8, 0.6, 1.7)}


def _box(x, y, label=0, yaw=0.3):
    dx, dy, dz = SIZES[label]
    return [x, y, -1.0, dx, dy, dz, yaw]


def _dets(boxes, scores, labels) -> Detections3D:
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 7)
    return Detections3D(Boxes3D(b), torch.tensor(scores, dtype=torch.float32).reshape(-1),
                        torch.as_tensor(labels, dtype=torch.int64).reshape(-1))


def _cars(xs, diff=None):
    boxes = [_box(x, 0.0) for x in xs]
    return FrameGT(torch.tensor(boxes).reshape(-1, 7), torch.zeros(len(xs), dtype=torch.int64),
                   None if diff is None else torch.tensor(diff))


def _scene(seed: int, n_frames: int = 4):
    """Frames with all three classes on a grid (no two boxes overlap) and mixed difficulties."""
    g = torch.Generator().manual_seed(seed)
    gts = []
    for _ in range(n_frames):
        boxes, labels = [], []
        for k in range(12):
            label = k % 3
            x = 5.0 + 8.0 * (k // 3) + float(torch.rand(1, generator=g))
            y = -12.0 + 8.0 * (k % 3) + float(torch.rand(1, generator=g))
            boxes.append(_box(x, y, label, yaw=float(torch.rand(1, generator=g)) * 6 - 3))
            labels.append(label)
        diff = torch.tensor([0, 1, 2, -1] * 3)[torch.randperm(12, generator=g)]
        diff[:3] = 0  # every class has an easy box
        gts.append(FrameGT(torch.tensor(boxes), torch.tensor(labels), diff))
    return gts


# --- kitti_difficulty --------------------------------------------------------------------------
def test_kitti_difficulty_levels():
    h = np.array([50, 50, 30, 30, 30, 50, 20, 41, 40])
    occ = np.array([0, 1, 1, 2, 3, 0, 0, 0, 0])
    trunc = np.array([0.0, 0.0, 0.2, 0.4, 0.0, 0.6, 0.0, 0.15, 0.0])
    out = kitti_difficulty(h, occ, trunc)
    assert out.tolist() == [0, 1, 1, 2, -1, -1, -1, 0, 1]
    out_t = kitti_difficulty(torch.tensor(h), torch.tensor(occ), torch.tensor(trunc))
    assert isinstance(out_t, torch.Tensor) and out_t.tolist() == out.tolist()
    with pytest.raises(DataError, match="same length"):
        kitti_difficulty(h, occ[:3], trunc)


# --- AP core -----------------------------------------------------------------------------------
def test_r40_hand_computed_curve():
    # TP, FP, TP, TP with 4 GT: precision 1, 1/2, 2/3, 3/4 at recall 1/4, 1/4, 1/2, 3/4.
    # Interpolated: 1 for r <= 1/4 (10 positions), 3/4 for 1/4 < r <= 3/4 (20), 0 above (10).
    ap = average_precision_r40(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 1], bool), 4)
    assert ap == (10 * 1 + 20 * 0.75) / 40 * 100 == 62.5
    # R11 on the same curve: positions 0..0.2 -> 1 (3), 0.3..0.7 -> 0.75 (5), 0.8..1 -> 0.
    ap11 = average_precision_r40(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 1], bool), 4, 11)
    assert ap11 == pytest.approx((3 + 5 * 0.75) / 11 * 100, abs=1e-12)
    assert math.isnan(average_precision_r40(np.zeros(0), np.zeros(0, bool), 0))


def test_r40_equal_scores_enter_together():
    # FP and TP with the same score: one point (precision 1/2, recall 1) whatever the order.
    a = average_precision_r40(np.array([0.5, 0.5]), np.array([0, 1], bool), 1)
    b = average_precision_r40(np.array([0.5, 0.5]), np.array([1, 0], bool), 1)
    assert a == b == 50.0


# --- kitti_ap -----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["3d", "bev"])
def test_kitti_gt_as_detections_is_100(metric):
    gts = _scene(0)
    dets = [_dets(g.boxes, [1.0] * len(g), g.labels) for g in gts]
    res = kitti_ap(gts, dets, metric=metric)
    for c in ("Car", "Pedestrian", "Cyclist"):
        assert res[c] == {"easy": 100.0, "moderate": 100.0, "hard": 100.0}
    assert res["mAP"]["moderate"] == 100.0


def test_kitti_half_missing_is_50():
    gts = [_cars([10.0, 20.0, 30.0, 40.0, 50.0]), _cars([10.0, 20.0, 30.0, 40.0, 50.0])]
    dets = [_dets([_box(x, 0.0) for x in (10.0, 20.0, 30.0, 40.0, 50.0)], [0.9] * 5, [0] * 5),
            _dets(torch.zeros(0, 7), [], [])]
    res = kitti_ap(gts, dets, classes=("Car",))
    assert res["Car"]["moderate"] == 50.0  # recall positions 1/40..20/40 at precision 1


def test_kitti_highest_scoring_false_positive():
    # 4 GT all found at score 0.8..0.5, plus a false positive far away at score 0.9:
    # precision after each detection 0, 1/2, 2/3, 3/4, 4/5; the envelope is 4/5 everywhere.
    gts = [_cars([10.0, 20.0, 30.0, 40.0])]
    boxes = [_box(60.0, 0.0)] + [_box(x, 0.0) for x in (10.0, 20.0, 30.0, 40.0)]
    dets = [_dets(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], [0] * 5)]
    res = kitti_ap(gts, dets, classes=("Car",))
    assert res["Car"]["easy"] == pytest.approx(80.0, abs=1e-12)
    # A false positive in the middle (TP, FP, TP, TP; one GT missed): 62.5 by hand.
    gts = [_cars([10.0, 20.0, 30.0, 40.0])]
    boxes = [_box(10.0, 0.0), _box(60.0, 0.0), _box(20.0, 0.0), _box(30.0, 0.0)]
    res = kitti_ap(gts, [_dets(boxes, [0.9, 0.8, 0.7, 0.6], [0] * 4)], classes=("Car",))
    assert res["Car"]["easy"] == 62.5


def test_kitti_shift_below_threshold_is_zero():
    gts = [_cars([10.0, 20.0, 30.0])]
    # Shift 1 m along the heading (yaw 0.3, length 4): BEV IoU = 3 / 5 = 0.6 < 0.7.
    shifted = [_box(x + math.cos(0.3), math.sin(0.3)) for x in (10.0, 20.0, 30.0)]
    dets = [_dets(shifted, [0.9, 0.8, 0.7], [0, 0, 0])]
    assert kitti_ap(gts, dets, classes=("Car",))["Car"]["easy"] == 0.0
    assert kitti_ap(gts, dets, classes=("Car",), metric="bev")["Car"]["easy"] == 0.0
    # With a 0.55 threshold the same detections all match (IoU 0.6 > 0.55).
    res = kitti_ap(gts, dets, classes=("Car",), metric="bev", iou_thresholds={"Car": 0.55})
    assert res["Car"]["easy"] == 100.0


def test_kitti_difficulty_ignore_logic():
    # Car A easy, car B hard, car C not counted (-1). Detections on B and C score highest.
    gts = [_cars([10.0, 20.0, 30.0], diff=[0, 2, -1])]
    boxes = [_box(20.0, 0.0), _box(30.0, 0.0), _box(10.0, 0.0)]
    dets = [_dets(boxes, [0.9, 0.95, 0.5], [0, 0, 0])]
    res = kitti_ap(gts, dets, classes=("Car",))["Car"]
    # Easy/moderate: B and C are ignored and so are the detections on them -> 100, not 100/3.
    assert res == {"easy": 100.0, "moderate": 100.0, "hard": 100.0}
    # Without the detection on B, the hard level misses one of its two GT -> 50.
    dets = [_dets(boxes[1:], [0.95, 0.5], [0, 0])]
    res = kitti_ap(gts, dets, classes=("Car",))["Car"]
    assert res == {"easy": 100.0, "moderate": 100.0, "hard": 50.0}
    # Other classes' detections do not matter for Car; Pedestrian has no GT -> nan.
    dets = [_dets(boxes[1:] + [_box(10.0, 0.0, 1)], [0.95, 0.5, 0.99], [0, 0, 1])]
    res = kitti_ap(gts, dets, classes=("Car", "Pedestrian"))
    assert res["Car"]["hard"] == 50.0 and math.isnan(res["Pedestrian"]["easy"])
    assert res["mAP"]["hard"] == 50.0


def test_kitti_recall_and_the_r40_step():
    # 80 cars in 4 frames, all detections placed exactly (precision 1): AP R40 is 2.5 points per
    # recall position reached. 77 found (recall 0.9625) reach positions 1/40..38/40 -> 95.0; one
    # more (0.975) reaches 39/40 -> 97.5: the step kitti_recall exposes.
    gts = [_cars([10.0 * k for k in range(1, 21)]) for _ in range(4)]
    for found, recall, ap in ((77, 96.25, 95.0), (78, 97.5, 97.5)):
        dets, left = [], found
        for g in gts:
            n = min(left, len(g)); left -= n
            dets.append(_dets(g.boxes[:n], torch.linspace(0.9, 0.2, n).tolist(), [0] * n))
        assert kitti_recall(gts, dets, classes=("Car",))["Car"]["moderate"] == pytest.approx(recall)
        assert kitti_ap(gts, dets, classes=("Car",))["Car"]["moderate"] == pytest.approx(ap)
    # Any score counts; ignored GT (hard, -1) are not counted at easy; no valid GT -> nan.
    gts = [_cars([10.0, 20.0, 30.0, 40.0], diff=[0, 0, 2, -1])]
    boxes = [_box(10.0, 0.0), _box(31.0, 0.0), _box(40.0, 0.0), _box(60.0, 0.0)]
    res = kitti_recall(gts, [_dets(boxes, [0.01, 0.9, 0.8, 0.99], [0] * 4)], classes=("Car", "Pedestrian"))
    assert res["Car"] == {"easy": 50.0, "moderate": 50.0, "hard": pytest.approx(100 / 3)}
    assert all(math.isnan(v) for v in res["Pedestrian"].values())


def test_missed_objects_lists_what_recall_misses():
    from perception3d.geometry.iou import iou_3d

    ped = _box(10.0, 5.0, label=1)
    gts = [
        FrameGT(torch.tensor([_box(10.0, 0.0), _box(20.0, 0.0), _box(30.0, 0.0), _box(40.0, 0.0)]),
                torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 2, -1])),
        FrameGT(torch.tensor([ped, _box(10.0, 0.0)]), torch.tensor([1, 0]), torch.tensor([0, 0])),
        # two overlapping cars, one box between them: it matches the nearer, the other is missed
        # although that box overlaps it above 0.7 too
        _cars([10.0, 10.3]),
    ]
    near = _box(20.5, 0.0)
    dets = [_dets([_box(10.0, 0.0), near], [0.3, 0.8], [0, 0]), _dets([ped], [0.9], [1]),
            _dets([_box(10.1, 0.0)], [0.6], [0])]
    got = missed_objects(gts, dets, classes=("Car", "Pedestrian"))
    iou_near = iou_3d(torch.tensor([near], dtype=torch.float64), gts[0].boxes[1:2].double()).item()
    iou_taken = iou_3d(torch.tensor([_box(10.1, 0.0)], dtype=torch.float64), gts[2].boxes[1:2].double()).item()
    assert iou_near < 0.7 < iou_taken
    assert [(m["frame"], m["class"], m["gt_index"]) for m in got] == [(0, "Car", 1), (1, "Car", 1), (2, "Car", 1)]
    assert [m["best_iou"] for m in got] == pytest.approx([iou_near, 0.0, iou_taken])
    assert got[0]["best_score"] == pytest.approx(0.8) and math.isnan(got[1]["best_score"])
    # the hard car (frame 0, row 2) is missed too, but valid only at "hard"; row 3 (-1) never
    hard = missed_objects(gts, dets, classes=("Car",), difficulty="hard")
    assert [(m["frame"], m["gt_index"]) for m in hard] == [(0, 1), (0, 2), (1, 1), (2, 1)]
    # as many as the recall leaves: 5 valid moderate cars, 3 of them missed
    assert kitti_recall(gts, dets, classes=("Car",))["Car"]["moderate"] == pytest.approx(100.0 * (5 - 3) / 5)
    with pytest.raises(DataError, match="difficulty"):
        missed_objects(gts, dets, difficulty="medium")


def test_kitti_ap_by_distance():
    gts = [_cars([10.0, 30.0, 50.0])]
    # Found: 10 m and 50 m; missed: 30 m; a false positive at 60 m scores highest.
    boxes = [_box(60.0, 0.0), _box(10.0, 0.0), _box(50.0, 0.0)]
    dets = [_dets(boxes, [0.99, 0.8, 0.7], [0, 0, 0])]
    res = kitti_ap_by_distance(gts, dets, classes=("Car",))["Car"]
    assert res["0-20m"] == 100.0  # FP at 60 m is outside the bin: ignored
    assert res["20-40m"] == 0.0
    assert res["40-70m"] == pytest.approx(50.0)  # FP then TP: precision 1/2 at recall 1
    res = kitti_ap_by_distance(gts, dets, classes=("Car",), distance_bins_m=((0, 100),))["Car"]
    # All together: FP, TP, TP with 3 GT: precision 0, 1/2, 2/3 at recall 0, 1/3, 2/3.
    assert res["0-100m"] == pytest.approx((26 * 2 / 3) / 40 * 100, abs=1e-12)


def test_kitti_bad_input():
    gts = [_cars([10.0])]
    with pytest.raises(DataError, match="one entry per frame"):
        kitti_ap(gts, [])
    with pytest.raises(DataError, match="metric"):
        kitti_ap(gts, [_dets(torch.zeros(0, 7), [], [])], metric="2d")
    with pytest.raises(DataError, match="iou_thresholds"):
        kitti_ap(gts, [_dets(torch.zeros(0, 7), [], [])], classes=("Car",), iou_thresholds={})
    with pytest.raises(DataError, match="FrameGT.labels"):
        FrameGT(torch.zeros(2, 7), torch.zeros(3), None)
    with pytest.raises(DataError, match="FrameGT.boxes"):
        FrameGT(torch.zeros(2, 6), torch.zeros(2), None)


# --- nuScenes -------------------------------------------------------------------------------------
def test_nuscenes_gt_as_detections_is_100():
    gts = _scene(1)
    dets = [_dets(g.boxes, [1.0] * len(g), g.labels) for g in gts]
    res = nuscenes_map(gts, dets)
    for c in ("Car", "Pedestrian", "Cyclist"):
        assert res[c] == {0.5: 100.0, 1.0: 100.0, 2.0: 100.0, 4.0: 100.0}
    assert res["mAP"] == 100.0


def test_nuscenes_shifted_centres():
    gts = _scene(2)
    # Every centre moved by 0.75 m (a 3-4-5 triangle: 0.45 in x, 0.6 in y).
    dets = []
    for g in gts:
        b = g.boxes.clone()
        b[:, 0] += 0.45
        b[:, 1] += 0.6
        dets.append(_dets(b, torch.linspace(1.0, 0.5, len(g)).tolist(), g.labels))
    res = nuscenes_map(gts, dets)
    for c in ("Car", "Pedestrian", "Cyclist"):
        assert res[c][0.5] == 0.0
        assert res[c][1.0] == res[c][2.0] == res[c][4.0] == 100.0
    assert res["mAP"] == 75.0


def test_nuscenes_hand_computed_curve():
    # FP (0.9) then TP (0.8), 2 GT: precision 0, 1/2 at recall 0, 1/2 -> interpolated
    # precision = r for r <= 1/2, 0 above. AP = mean over r = 0.11..1.00 of max(0, (p - 0.1) / 0.9)
    # = sum_{k=1..40} (0.01 k) / 0.9 / 90.
    gts = [_cars([10.0, 20.0])]
    dets = [_dets([_box(40.0, 0.0), _box(10.0, 0.0)], [0.9, 0.8], [0, 0])]
    res = nuscenes_map(gts, dets, classes=("Car",))
    expected = 100 * sum(0.01 * k for k in range(1, 41)) / 0.9 / 90
    assert res["Car"][2.0] == pytest.approx(expected, abs=1e-9)


def test_distance_bins_as_edges():
    gts = [_cars([10.0, 30.0, 50.0])]
    dets = [_dets([_box(60.0, 0.0), _box(10.0, 0.0), _box(50.0, 0.0)], [0.99, 0.8, 0.7], [0, 0, 0])]
    res = kitti_ap_by_distance(gts, dets, classes=("Car",), distance_bins_m=(0.0, 20.0, 40.0, 70.4))
    assert res["Car"] == {"0-20m": 100.0, "20-40m": 0.0, "40-70.4m": 50.0}
    with pytest.raises(DataError, match="distance_bins_m"):
        kitti_ap_by_distance(gts, dets, classes=("Car",), distance_bins_m=(20.0, 10.0))


def test_label_ids_follow_class_names():
    # A Pedestrian box with label 1 (structures.CLASSES ids) and a Car box with label 0.
    gts = [FrameGT(torch.tensor([_box(10.0, 0.0, 1), _box(20.0, 0.0, 0)]), torch.tensor([1, 0]))]
    dets = [_dets([_box(20.0, 0.0, 0)], [0.9], [0])]
    # classes=("Pedestrian",) alone: ids index into classes, so label 0 (the Car) is "Pedestrian".
    res = kitti_ap(gts, dets, classes=("Pedestrian",), metric="bev")
    assert res["Pedestrian"]["easy"] == 100.0
    # With the full name list, label 0 is Car: the pedestrian is missed.
    res = kitti_ap(gts, dets, classes=("Pedestrian",), metric="bev", class_names=("Car", "Pedestrian", "Cyclist"))
    assert res["Pedestrian"]["easy"] == 0.0


def test_nuscenes_ignores_difficulty_minus_one():
    # GT at 10 (counted), 20 (counted), 30 (ignored); detections on 30 (highest) and 10.
    gts = [_cars([10.0, 20.0, 30.0], diff=[2, 0, -1])]
    dets = [_dets([_box(30.0, 0.0), _box(10.0, 0.0)], [0.9, 0.8], [0, 0])]
    res = nuscenes_map(gts, dets, classes=("Car",), dist_thresholds=(1.0,))
    # Counted: one TP at recall 1/2, precision 1 -> p = 1 for r <= 0.5: 40 of the 90 points.
    assert res["Car"][1.0] == pytest.approx(100 * 40 / 90, abs=1e-9)


def test_box_errors_known_offsets():
    # Three cars along x; detections with hand-made errors (each box its own):
    # car 0: centre off by (0.3, 0.4) -> 0.5 m, z +0.2, yaw +0.1, width 1.8 -> 1.5
    # car 1: centre exact, z -0.1, yaw wrapped (gt 3.1, det -3.1: 2*pi - 6.2 rad apart), length 4 -> 2
    # car 2: its only detection 2.5 m away (no match); a hard car (difficulty 2) matched, not counted
    gt = FrameGT(torch.tensor([_box(10.0, 0.0, yaw=0.3), _box(20.0, 0.0, yaw=3.1), _box(30.0, 0.0),
                               _box(40.0, 0.0)]), torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 1, 2]))
    d0 = [10.3, 0.4, -0.8, 4.0, 1.5, 1.6, 0.4]
    d1 = [20.0, 0.0, -1.1, 2.0, 1.8, 1.6, -3.1]
    d2 = [32.5, 0.0, -1.0, 4.0, 1.8, 1.6, 0.3]
    d3 = [40.0, 0.0, -1.0, 4.0, 1.8, 1.6, 1.3]
    # a lower-scored, better box next to car 0 does not replace the highest-scoring match
    worse = [10.0, 0.0, -1.0, 4.0, 1.8, 1.6, 0.3]
    det = _dets([d0, d1, d2, d3, worse], [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0, 0, 0])
    res = box_errors([gt], [det], classes=("Car",))["Car"]
    assert res["matched"] == 2
    assert res["centre_bev_m"] == pytest.approx(np.median([0.5, 0.0]))
    assert res["z_m"] == pytest.approx(np.median([0.2, 0.1]))
    # aligned IoU: 1.5 / 1.8 for car 0's narrower box; 0.5 for a 4 m and a 2 m long car (car 1)
    assert res["size"] == pytest.approx(np.median([1.0 - 1.5 / 1.8, 0.5]))
    assert res["length_m"] == pytest.approx(np.median([0.0, 2.0]))
    assert res["width_m"] == pytest.approx(np.median([0.3, 0.0]), abs=1e-6)  # float32 boxes
    assert res["height_m"] == pytest.approx(0.0)
    assert res["yaw_rad"] == pytest.approx(np.median([0.1, 2 * math.pi - 6.2]), abs=1e-6)  # float32 boxes
    # with the hard car counted, the 1.0 rad heading error joins the median
    res_hard = box_errors([gt], [det], classes=("Car",), max_difficulty=2)["Car"]
    assert res_hard["matched"] == 3 and res_hard["yaw_rad"] == pytest.approx(0.1, abs=1e-6)
    empty = box_errors([gt], [_dets(np.zeros((0, 7)), [], [])], classes=("Car",))["Car"]
    assert empty["matched"] == 0 and math.isnan(empty["centre_bev_m"])


def test_oracle_ap_known_answers():
    # Four moderate cars; detections by descending score: car 0 with z +0.5 m, car 1 half as tall,
    # car 2 shifted 1 m in x, car 3 exact, and a false positive 1.5 m beside car 3. Each wrong
    # part alone takes the 3D IoU below 0.7 (about 0.5, 0.5 and 0.45).
    gt = _cars([10.0, 20.0, 30.0, 40.0], diff=[1, 1, 1, 1])
    boxes = [_box(10.0, 0.0), _box(20.0, 0.0), _box(31.0, 0.0), _box(40.0, 0.0), _box(40.0, 1.5)]
    boxes[0][2] += 0.5
    boxes[1][5] = 0.8
    det = _dets(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0, 0, 0])
    res = oracle_ap([gt], [det], classes=("Car",))["Car"]
    plain = kitti_ap([gt], [det], classes=("Car",))["Car"]["moderate"]
    # R40 by hand (40 recall points, 4 GT): only car 3 found, at precision 1/4 -> 10 points x 0.25
    assert plain == pytest.approx(6.25)
    assert res["yaw"] == res["width"] == res["length"] == pytest.approx(6.25)
    # z exact: TP FP FP TP FP -> precision 1 up to recall 1/4, then 1/2 up to 1/2
    assert res["z"] == pytest.approx(100 * (10 * 1.0 + 10 * 0.5) / 40)
    # height exact: FP TP FP TP FP -> 1/2 up to recall 1/2
    assert res["height"] == res["size"] == pytest.approx(100 * 20 * 0.5 / 40)
    # z and height exact: TP TP FP TP FP -> 1 up to 1/2, 3/4 up to 3/4
    assert res["z_height"] == pytest.approx(100 * (20 * 1.0 + 10 * 0.75) / 40)
    # centre exact: FP FP TP TP FP (the false positive moved onto car 3 is a duplicate, still false)
    assert res["xy"] == pytest.approx(100 * 20 * 0.5 / 40)
    # out of reach, car 2 keeps its centre
    assert oracle_ap([gt], [det], classes=("Car",), max_dist_m=0.5)["Car"]["xy"] == pytest.approx(6.25)
    with pytest.raises(DataError, match="difficulty"):
        oracle_ap([gt], [det], classes=("Car",), difficulty="medium")


def test_kitti_ap_interval_against_naive_bootstrap():
    # Detections: the GT jittered, some dropped, some false positives, random scores.
    gts = _scene(3, n_frames=9)
    g = torch.Generator().manual_seed(4)
    dets = []
    for gt in gts:
        keep = torch.rand(len(gt), generator=g) > 0.25
        boxes = gt.boxes[keep].clone()
        boxes[:, :3] += 0.15 * torch.randn(boxes.shape[0], 3, generator=g)
        fp = torch.tensor([_box(60.0 + float(torch.rand(1, generator=g)), 20.0)])
        boxes = torch.cat([boxes, fp])
        labels = torch.cat([gt.labels[keep], torch.zeros(1, dtype=torch.int64)])
        dets.append(_dets(boxes, torch.rand(boxes.shape[0], generator=g).tolist(), labels))
    res = kitti_ap_interval(gts, dets, resamples=200, confidence=0.9, seed=7)
    # the same draws through kitti_ap on the resampled frame lists
    draws = np.random.default_rng(7).integers(0, len(gts), size=(200, len(gts)))
    for c in ("Car", "Pedestrian", "Cyclist"):
        aps = [kitti_ap([gts[i] for i in row], [dets[i] for i in row])[c]["moderate"] for row in draws]
        want = np.percentile(aps, [5, 95])
        assert res[c] == pytest.approx(tuple(want), abs=1e-9)
        assert res[c][0] < res[c][1]  # the frames differ, so the draws do
        plain = kitti_ap(gts, dets)[c]["moderate"]
        assert res[c][0] <= plain <= res[c][1]


def test_kitti_ap_interval_paired_difference():
    gts = _scene(5, n_frames=8)
    good = [_dets(g.boxes, torch.linspace(1, 0.5, len(g)).tolist(), g.labels) for g in gts]
    shifted = []
    for g in gts:  # every other box 1 m off: a miss and a false positive each
        b = g.boxes.clone()
        b[::2, 0] += 1.0
        shifted.append(_dets(b, torch.linspace(1, 0.5, len(g)).tolist(), g.labels))
    diff = kitti_ap_interval(gts, shifted, baseline=good, resamples=300, seed=1)
    draws = np.random.default_rng(1).integers(0, len(gts), size=(300, len(gts)))
    for c in ("Car", "Pedestrian", "Cyclist"):
        # the same draws through kitti_ap, each model on its own
        d = [kitti_ap([gts[i] for i in row], [shifted[i] for i in row])[c]["moderate"]
             - kitti_ap([gts[i] for i in row], [good[i] for i in row])[c]["moderate"] for row in draws]
        assert diff[c] == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])), abs=1e-9)
        assert diff[c][1] < 0  # the shifted boxes are worse on every draw
    # a model against itself: exactly zero on every draw
    assert kitti_ap_interval(gts, good, baseline=good, resamples=50)["Car"] == (0.0, 0.0)


def test_kitti_ap_interval_known_answers():
    # identical frames: every draw is the same set, the interval is the AP itself (50: one of two found)
    gt = _cars([10.0, 20.0], diff=[1, 1])
    det = _dets([_box(10.0, 0.0)], [0.9], [0])
    lo, hi = kitti_ap_interval([gt] * 5, [det] * 5, classes=("Car",))["Car"]
    assert lo == hi == pytest.approx(kitti_ap([gt], [det], classes=("Car",))["Car"]["moderate"])
    # no valid GT of the class: nan
    assert all(math.isnan(v) for v in kitti_ap_interval([gt], [det], classes=("Car", "Cyclist"))["Cyclist"])
    with pytest.raises(DataError, match="confidence"):
        kitti_ap_interval([gt], [det], classes=("Car",), confidence=95)
    with pytest.raises(DataError, match="resamples"):
        kitti_ap_interval([gt], [det], classes=("Car",), resamples=0)
