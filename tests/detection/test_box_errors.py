"""detection.box_errors: the LiDAR-frame diagnostics (difficulty levels, box errors).

The KITTI and nuScenes evaluations are tested in test_metrics_kitti.py and test_metrics_nuscenes.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from detection.box_errors import FrameGT, box_errors, kitti_difficulty
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
