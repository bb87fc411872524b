"""perception3d.metrics.kitti against the KITTI devkit: known answers worked out by hand from the
devkit's definition, and agreement with its python port (tests/perception3d/kitti_devkit.py)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from perception3d.errors import DataError
from perception3d.io.kitti import KittiLabels, read_label, write_label
from perception3d.metrics.kitti import (MIN_OVERLAP, get_thresholds, kitti_ap_by_range, kitti_ap_interval, kitti_eval,
                                        kitti_overlaps, missed_objects, oracle_ap, prepare_curves)
from tests.perception3d import kitti_devkit

SIZE = {"Car": (1.5, 1.6, 3.9), "Van": (2.0, 1.9, 5.0), "Truck": (3.0, 2.5, 10.0), "Pedestrian": (1.75, 0.6, 0.8),
        "Person_sitting": (1.2, 0.6, 0.8), "Cyclist": (1.7, 0.6, 1.8), "DontCare": (-1.0, -1.0, -1.0)}


def objects(*objs, scores=None) -> KittiLabels:
    """`objs`: dicts with name, x, z (camera metres) and optional h_px (2D box height), box (2D box),
    hwl (size, default the class's), trunc, occ, alpha, ry. Scores make it a detection file."""
    n = len(objs)
    if n == 0:
        return replace(KittiLabels.empty(), score=None if scores is None else np.zeros(0))
    names = np.array([o["name"] for o in objs])
    loc = np.array([[o.get("x", 0.0), 1.6, o.get("z", 20.0)] for o in objs])
    bbox = np.array([o.get("box", (600.0, 150.0, 660.0, 150.0 + o.get("h_px", 60.0))) for o in objs], float)
    ry = np.array([o.get("ry", 0.0) for o in objs])
    return KittiLabels(names=names, truncated=np.array([o.get("trunc", 0.0) for o in objs]),
                       occluded=np.array([o.get("occ", 0) for o in objs], np.int32),
                       alpha=np.array([o.get("alpha", 0.0) for o in objs]), bbox2d=bbox,
                       dims_hwl=np.array([o.get("hwl", SIZE[o["name"]]) for o in objs], float), loc_cam=loc,
                       rotation_y=ry,
                       score=None if scores is None else np.asarray(scores, float))


def car(**kw) -> dict:
    return {"name": "Car", **kw}


def ap(gt, dt, cls="Car", metric="3d", key="R40", diff="moderate", **kw) -> float:
    return kitti_eval(gt, dt, classes=(cls,), metrics=(metric,), **kw)[cls][metric][key][diff]


# --------------------------------------------------------------------------------------------
# known answers, worked out from the devkit's definition
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 4, 10, 40])
def test_perfect_detections_of_few_objects(n):
    """n <= 40 objects, each found exactly (distinct scores): get_thresholds keeps every score
    (the recall after each, k/n, never overtakes the 40 sample steps), so the curve has n points
    of precision 1 at positions 0..n-1 and 0 after: R40 = (n - 1) / 40, R11 = ceil(n / 4) / 11.
    The issue's known answer: n = 10 gives R40 22.5 and R11 27.27 (we used to give 100)."""
    gt = [objects(car(z=10.0 + i)) for i in range(n)]
    dt = [objects(car(z=10.0 + i), scores=[0.5 + 0.001 * i]) for i in range(n)]
    for metric in ("bbox", "bev", "3d"):
        assert ap(gt, dt, metric=metric) == pytest.approx(100 * (n - 1) / 40, abs=1e-12)
        assert ap(gt, dt, metric=metric, key="R11") == pytest.approx(100 * math.ceil(n / 4) / 11, abs=1e-12)
    assert ap(gt, dt) == (22.5 if n == 10 else ap(gt, dt))


def test_perfect_detections_of_many_objects_score_100():
    """With 80 objects get_thresholds keeps 41 scores, the last at recall 1: every position has
    precision 1."""
    gt = [objects(car(z=10.0 + 0.5 * i)) for i in range(80)]
    dt = [objects(car(z=10.0 + 0.5 * i), scores=[0.01 + 0.01 * i]) for i in range(80)]
    assert len(get_thresholds(np.array([0.01 + 0.01 * i for i in range(80)]), 80)) == 41
    assert ap(gt, dt) == ap(gt, dt, key="R11") == 100.0


def _eighty(extra_gt, extra_dt, extra_score=0.9):
    """80 frames, each with a Car found exactly (score 0.5) plus one extra object / detection."""
    gt = [objects(car(z=20.0), *extra_gt) for _ in range(80)]
    dt = [objects(car(z=20.0), *extra_dt, scores=[0.5, extra_score][:1 + len(extra_dt)]) for _ in range(80)]
    return gt, dt


def test_short_detections_are_ignored():
    """A higher-scoring false detection whose 2D box is 17 px tall (below 25 px) is ignored: 100.
    At 30 px it is a false positive: the only threshold is 0.5 (all 80 true positives score 0.5,
    get_thresholds keeps 41 copies of it), where precision is 80 / 160: 50 at every position."""
    gt, dt = _eighty([], [car(x=8.0, z=30.0, h_px=17.0)])
    assert ap(gt, dt) == 100.0
    gt, dt = _eighty([], [car(x=8.0, z=30.0, h_px=30.0)])
    assert ap(gt, dt) == 50.0
    # easy needs 40 px: a 30 px detection is ignored there
    assert ap(gt, dt, diff="easy") == 100.0


def test_neighbour_classes_are_ignored():
    """A Car detection on a Van (a Pedestrian on a Person_sitting) is neither TP nor FP: 100. On a
    Truck (not a neighbour) it is a false positive: 50."""
    van, truck = SIZE["Van"], SIZE["Truck"]
    gt, dt = _eighty([{"name": "Van", "x": 8.0, "z": 30.0}], [{"name": "Car", "x": 8.0, "z": 30.0, "hwl": van}])
    assert ap(gt, dt) == 100.0
    gt, dt = _eighty([{"name": "Truck", "x": 8.0, "z": 30.0}], [{"name": "Car", "x": 8.0, "z": 30.0, "hwl": truck}])
    assert ap(gt, dt) == 50.0
    gt = [objects({"name": "Pedestrian", "z": 20.0}, {"name": "Person_sitting", "x": 5.0, "z": 20.0})
          for _ in range(80)]
    dt = [objects({"name": "Pedestrian", "z": 20.0}, {"name": "Pedestrian", "x": 5.0, "z": 20.0,
                                                     "hwl": SIZE["Person_sitting"]}, scores=[0.5, 0.9])
          for _ in range(80)]
    assert ap(gt, dt, cls="Pedestrian") == 100.0


def test_truncation_read_from_a_label_file_is_compared_in_float64(tmp_path):
    """`Car 0.15 ...`: 0.15 <= 0.15, so the object is easy (in float32 0.15 reads as 0.1500000060
    and fell out of easy). 10 such objects found exactly: easy R40 = 9 / 40 = 22.5. 0.30 is
    moderate but not easy (easy AP 0: no valid object)."""
    for trunc, easy in ((0.15, 22.5), (0.30, 0.0)):
        gt, dt = [], []
        for i in range(10):
            path = tmp_path / f"{i}.txt"
            write_label(path, objects(car(z=10.0 + i, trunc=trunc)))
            assert f"Car {trunc:.2f} 0" in path.read_text()
            gt.append(read_label(path))
            dt.append(objects(car(z=10.0 + i), scores=[0.5 + 0.01 * i]))
        assert ap(gt, dt, diff="easy") == easy
        assert ap(gt, dt, diff="moderate") == 22.5


def test_occlusion_limits():
    """Occlusion 2 is hard only: moderate has no valid object (AP 0), hard has the 10 (22.5)."""
    gt = [objects(car(z=10.0 + i, occ=2)) for i in range(10)]
    dt = [objects(car(z=10.0 + i), scores=[0.5 + 0.01 * i]) for i in range(10)]
    assert ap(gt, dt, diff="moderate") == 0.0 and ap(gt, dt, diff="hard") == 22.5


def test_tied_scores():
    """Two objects, three detections all scoring 0.5 (one false). Thresholds: the two true
    positives' 0.5 twice; at 0.5 every detection takes part: precision 2/3 at positions 0 and 1.
    R40 = (2/3) / 40, R11 = (2/3) / 11."""
    gt = [objects(car(z=20.0)), objects(car(z=20.0))]
    dt = [objects(car(z=20.0), scores=[0.5]), objects(car(z=20.0), car(x=8.0, z=30.0), scores=[0.5, 0.5])]
    assert ap(gt, dt) == pytest.approx(100 * (2 / 3) / 40, abs=1e-12)
    assert ap(gt, dt, key="R11") == pytest.approx(100 * (2 / 3) / 11, abs=1e-12)


def test_frames_with_only_false_positives():
    """40 frames with a Car found exactly (score 0.5), 40 with only a false Car detection (0.9):
    40 thresholds of 0.5, precision 40 / 80 at positions 0..39: R40 = 39 * 0.5 / 40, R11 = 10 * 0.5 / 11."""
    gt = [objects(car(z=20.0)) for _ in range(40)] + [objects() for _ in range(40)]
    dt = [objects(car(z=20.0), scores=[0.5]) for _ in range(40)] + [objects(car(z=25.0), scores=[0.9])
                                                                     for _ in range(40)]
    assert ap(gt, dt) == pytest.approx(48.75, abs=1e-12)
    assert ap(gt, dt, key="R11") == pytest.approx(100 * 5 / 11, abs=1e-12)


def test_empty_classes_score_zero():
    """No valid object of the class: AP 0, as in the devkit (with or without detections)."""
    gt = [objects(car(z=20.0)) for _ in range(5)]
    dt = [objects(car(z=20.0), {"name": "Cyclist", "z": 30.0}, scores=[0.5, 0.7]) for _ in range(5)]
    res = kitti_eval(gt, dt)
    assert res["Cyclist"]["3d"]["R40"]["moderate"] == 0.0 and res["Pedestrian"]["bbox"]["R11"]["hard"] == 0.0
    assert kitti_eval([objects()], [objects(scores=[])])["Car"]["3d"]["R40"]["easy"] == 0.0


def test_dont_care_regions_absorb_2d_false_positives_only():
    """A false detection whose 2D box lies inside a DontCare region (intersection over its own area
    above 0.7) is not counted in the 2D metric (100) but is in BEV and 3D (50)."""
    dc = {"name": "DontCare", "x": -1000.0, "z": -1000.0, "box": (900.0, 100.0, 1000.0, 200.0)}
    fp = car(x=8.0, z=30.0, box=(910.0, 120.0, 960.0, 170.0))
    gt, dt = _eighty([dc], [fp])
    assert ap(gt, dt, metric="bbox") == 100.0
    assert ap(gt, dt, metric="bev") == ap(gt, dt, metric="3d") == 50.0


def test_aos():
    """Average orientation similarity: (1 + cos(alpha_gt - alpha_det)) / 2 in place of a TP. Exact
    alpha: AOS = AP; alpha off by pi/2: half of it; by pi: 0."""
    gt = [objects(car(z=10.0 + i)) for i in range(10)]
    for delta, share in ((0.0, 1.0), (math.pi / 2, 0.5), (math.pi, 0.0)):
        dt = [objects(car(z=10.0 + i, alpha=delta), scores=[0.5 + 0.01 * i]) for i in range(10)]
        res = kitti_eval(gt, dt, classes=("Car",), metrics=("bbox",))["Car"]
        assert res["aos"]["R40"]["moderate"] == pytest.approx(share * res["bbox"]["R40"]["moderate"], abs=1e-9)


def test_overlaps():
    """3D: the footprint intersection times the overlap along camera y (boxes span [y - h, y]);
    a box moved up by half its height overlaps 1/3; BEV ignores that; turned by 90 degrees, a
    3.9 x 1.6 footprint shares 1.6 x 1.6 with itself."""
    a = objects(car(z=20.0))
    b = replace(a, loc_cam=a.loc_cam - [[0.0, 0.75, 0.0]])
    assert kitti_overlaps(a, a, "3d")[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert kitti_overlaps(a, b, "3d")[0, 0] == pytest.approx(1 / 3, abs=1e-12)
    assert kitti_overlaps(a, b, "bev")[0, 0] == pytest.approx(1.0, abs=1e-12)
    c = replace(a, rotation_y=np.array([math.pi / 2]))
    inter = 1.6 * 1.6
    assert kitti_overlaps(a, c, "bev")[0, 0] == pytest.approx(inter / (2 * 3.9 * 1.6 - inter), abs=1e-12)
    assert kitti_overlaps(a, objects(car(z=20.0, box=(630.0, 150.0, 690.0, 210.0))), "bbox")[0, 0] == \
        pytest.approx(30 * 60 / (2 * 60 * 60 - 30 * 60))


def test_bad_input():
    with pytest.raises(DataError, match="one KittiLabels per frame each, got 1 and 2"):
        kitti_eval([objects()], [objects(scores=[]), objects(scores=[])])
    with pytest.raises(DataError, match=r"dt\[0\]: detections need a score"):
        kitti_eval([objects(car())], [objects(car())])
    with pytest.raises(DataError, match="no minimum overlap for 'Tram'"):
        kitti_eval([objects()], [objects(scores=[])], classes=("Tram",))
    with pytest.raises(DataError, match="metric: expected one of"):
        kitti_overlaps(objects(car()), objects(car(), scores=[1.0]), "2d")


# --------------------------------------------------------------------------------------------
# agreement with the devkit's python port
# --------------------------------------------------------------------------------------------

def random_frames(seed: int, frames: int, noise: float = 0.1, decimals: int | None = None):
    """Frames of Cars, Vans, Trucks, Pedestrians, Persons sitting, Cyclists and DontCare regions with
    every truncation / occlusion / height case, and detections: most objects found (Vans as Cars,
    Persons sitting as Pedestrians), jittered, plus false ones, some short, some of other classes;
    `decimals` rounds the scores (ties)."""
    rng = np.random.default_rng(seed)
    names = np.array(["Car", "Car", "Car", "Van", "Truck", "Pedestrian", "Pedestrian", "Person_sitting", "Cyclist"])
    gts, dts = [], []
    for _ in range(frames):
        n = int(rng.integers(0, 12))
        gt = []
        for name in rng.choice(names, n):
            x, z = rng.uniform(-15, 15), rng.uniform(5, 60)
            h_px = 700 * SIZE[name][0] / z * rng.uniform(0.7, 1.2)
            u = 620 + 700 * x / z
            gt.append({"name": name, "x": x, "z": z, "ry": rng.uniform(-np.pi, np.pi),
                       "box": (u - 350 * SIZE[name][2] / z, 180 - h_px / 2, u + 350 * SIZE[name][2] / z, 180 + h_px / 2),
                       "trunc": float(rng.choice([0.0, 0.0, 0.15, 0.3, 0.4, 0.6])), "occ": int(rng.choice([0, 0, 1, 2, 3])),
                       "alpha": rng.uniform(-np.pi, np.pi)})
        for _ in range(int(rng.integers(0, 3))):
            x1, y1 = rng.uniform(0, 1000), rng.uniform(100, 200)
            gt.append({"name": "DontCare", "x": -1000.0, "z": -1000.0, "trunc": -1.0, "occ": -1,
                       "box": (x1, y1, x1 + rng.uniform(20, 200), y1 + rng.uniform(20, 100))})
        det = []
        for o in gt:
            if o["name"] == "DontCare" or rng.uniform() > 0.85:
                continue
            name = {"Van": "Car", "Truck": "Car", "Person_sitting": "Pedestrian"}.get(o["name"], o["name"])
            box = tuple(np.asarray(o["box"]) + rng.normal(0, 3, 4))
            det.append({**o, "name": name, "x": o["x"] + rng.normal(0, noise), "z": o["z"] + rng.normal(0, noise),
                        "ry": o["ry"] + rng.normal(0, 0.1), "box": box, "alpha": o["alpha"] + rng.normal(0, 0.3)})
        for _ in range(int(rng.integers(0, 5))):
            name = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
            x1, y1, h = rng.uniform(0, 1100), rng.uniform(120, 200), rng.uniform(10, 80)
            det.append({"name": name, "x": rng.uniform(-15, 15), "z": rng.uniform(5, 60), "ry": rng.uniform(-3, 3),
                        "box": (x1, y1, x1 + 0.8 * h, y1 + h), "alpha": rng.uniform(-3, 3)})
        scores = rng.uniform(0, 1, len(det))
        if decimals is not None:
            scores = np.round(scores, decimals)
        g = objects(*gt)
        # the sizes of DontCare regions are -1, their locations -1000 (as in the label files)
        dts.append(objects(*det, scores=scores))
        gts.append(g)
    return gts, dts


def _compare(ours: dict, devkit: dict) -> float:
    worst = 0.0
    for cls, by_metric in devkit.items():
        for metric, by_key in by_metric.items():
            for key, values in by_key.items():
                for diff, value in zip(("easy", "moderate", "hard"), values):
                    worst = max(worst, abs(ours[cls][metric][key][diff] - value))
    return worst


@pytest.mark.skipif(not kitti_devkit.available(), reason=kitti_devkit.SKIP_REASON)
@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, None), (3, 2)])
def test_matches_the_devkit_port(seed, decimals):
    """Every class, metric, difficulty, R40 / R11 and AOS, against the port's own algorithm (its
    rotated-IoU GPU kernel replaced by a CPU function of the same geometry)."""
    gt, dt = random_frames(seed, 60, decimals=decimals)
    ours = kitti_eval(gt, dt)
    devkit = kitti_devkit.devkit_ap(gt, dt)
    assert _compare(ours, devkit) <= 1e-9
    assert 5 < ours["Car"]["3d"]["R40"]["moderate"] < 95  # a curve with something to get wrong


@pytest.mark.skipif(not kitti_devkit.available(), reason=kitti_devkit.SKIP_REASON)
def test_matches_the_devkit_port_with_its_own_iou_kernel():
    """The whole port, its rotated IoU included (a numba CUDA kernel, run by numba's CUDA simulator),
    on a small dense scene."""
    gt, dt = random_frames(6, 10, noise=0.05)
    ours = kitti_eval(gt, dt)
    assert _compare(ours, kitti_devkit.devkit_ap(gt, dt, cuda_sim=True)) <= 1e-9
    assert max(v for c in ours.values() for m in c.values() for v in m["R40"].values()) > 10


# --------------------------------------------------------------------------------------------
# diagnostics on the same machinery
# --------------------------------------------------------------------------------------------

def test_interval_and_paired_difference():
    gt, dt = random_frames(2, 60)
    curves = prepare_curves(gt, dt, "Car", "moderate", "3d", MIN_OVERLAP["Car"]["3d"])
    point = curves.evaluate()["R40"]
    assert point == kitti_eval(gt, dt)["Car"]["3d"]["R40"]["moderate"]
    lo, hi = kitti_ap_interval(curves, draws=200)
    assert lo < point < hi
    assert kitti_ap_interval(curves, baseline=curves, draws=50) == (0.0, 0.0)
    worse = [replace(d, loc_cam=d.loc_cam + [[0.3, 0.0, 0.0]]) for d in dt]
    other = prepare_curves(gt, worse, "Car", "moderate", "3d", MIN_OVERLAP["Car"]["3d"])
    lo, hi = kitti_ap_interval(curves, baseline=other, draws=200)
    assert 0 < lo < point - other.evaluate()["R40"] < hi


def test_by_range_oracle_and_missed():
    gt, dt = random_frames(0, 60)
    full = kitti_eval(gt, dt)["Car"]["3d"]["R40"]["moderate"]
    assert kitti_ap_by_range(gt, dt, "Car", (0, 1000))["0-1000m"] == full
    near = kitti_ap_by_range(gt, dt, "Car", (0, 30, 1000))
    assert set(near) == {"0-30m", "30-1000m"}
    oracle = oracle_ap(gt, dt, "Car")
    assert oracle["size"] >= oracle["length"] - 1e-9 or oracle["size"] > full
    exact = oracle_ap(gt, [replace(d, loc_cam=d.loc_cam + [[0.5, 0.0, 0.5]]) for d in dt], "Car", parts=("xy",))
    assert exact["xy"] == pytest.approx(oracle_ap(gt, dt, "Car", parts=("xy",))["xy"])
    curves = prepare_curves(gt, dt, "Car", "moderate", "3d", MIN_OVERLAP["Car"]["3d"])
    missed = missed_objects(curves)
    found = sum(int(m.sum()) for m in curves.matched)
    assert found + len(missed) == int(sum(curves.num_valid))
    assert all(gt[m["frame"]].names[m["gt_index"]] == "Car" for m in missed)
