"""Detection metrics of a set of held-out frames: the official KITTI and nuScenes numbers, and our
diagnostics beside them under names nobody can take for the official ones.

Keys of the metrics dict (AP in percent):

* official KITTI (`perception3d.metrics.kitti`: the devkit's algorithm, on the detections as the
  written result files hold them and the label files as they are): `CLASS/METRIC_R40/DIFFICULTY`
  and `CLASS/METRIC_R11/DIFFICULTY` for METRIC `bbox`, `bev`, `3d` and `aos`, CLASS each evaluated
  class and `mAP` (their mean), DIFFICULTY easy / moderate / hard; e.g. `Car/3d_R40/moderate`;
* official nuScenes (`perception3d.metrics.nuscenes`: nuscenes-devkit's definitions, on the LiDAR
  boxes, over the evaluated classes mapped to nuScenes' car / pedestrian / bicycle; the data have
  no velocities or attributes, so mAVE and mAAE are undefined and add 0 to NDS, as in the devkit):
  `nuscenes/mAP`, `nuscenes/NDS`, `nuscenes/CLASS/AP` in percent, as papers quote them, and the
  errors `nuscenes/mATE` (m), `mASE` (1 - IoU), `mAOE` (rad), `mAVE`, `mAAE`;
* diagnostics, all under `diag/`: `diag/CLASS/3d_recall/DIFFICULTY` (the highest recall of the
  official 3D curve), `diag/CLASS/3d_R40_interval95/moderate_low|_high` (bootstrap over frames of
  the official moderate 3D AP), with a baseline `diag/CLASS/3d_R40_minus_baseline/moderate[_low|
  _high]` (the difference of official APs on the same frames, paired interval),
  `diag/CLASS/3d_R40_by_range/LO-HIm`, `diag/CLASS/3d_R40_oracle/PART` (`oracle_ap`) and
  `diag/CLASS/box_error_median/NAME` (`detection.box_errors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from detection.predictions import detections_to_labels
from perception3d.geometry.boxes import points_in_boxes_count
from perception3d.io.atomic import atomic_write_text
from perception3d.io.kitti import KittiDataset, KittiLabels, camera_boxes_to_lidar
from perception3d.io.pointcloud import read_kitti_bin
from detection.box_errors import FrameGT, box_errors, kitti_difficulty
from perception3d.metrics.kitti import (DIFFICULTIES, MIN_OVERLAP, KittiCurves, kitti_ap_by_range, kitti_ap_interval,
                                        kitti_eval, missed_objects, oracle_ap, prepare_curves)
from perception3d.metrics.nuscenes import KITTI_TO_NUSCENES, NuScenesDets, NuScenesGT, nuscenes_eval
from perception3d.structures import Detections3D

__all__ = ["Evaluation", "evaluate_detections", "write_missed"]


@dataclass
class Evaluation:
    """What `evaluate_detections` computed: the metrics, the detections as result-file labels, the
    ground-truth labels and the official moderate 3D curve of each class."""

    metrics: dict[str, float]
    labels: list[KittiLabels]
    gt: list[KittiLabels]
    curves: dict[str, KittiCurves]


def _lidar_gt(kitti: KittiDataset, index: int, gt: KittiLabels, classes: Sequence[str]):
    """The frame's objects of `classes` as LiDAR boxes, with their positions in the label file."""
    keep = np.flatnonzero(np.isin(np.asarray(gt.names).astype(str), list(classes)))
    boxes = camera_boxes_to_lidar(gt.boxes_cam[keep], kitti.calib(index)) if len(keep) else np.zeros((0, 7))
    return keep, boxes


def _points(kitti: KittiDataset, index: int) -> torch.Tensor:
    return torch.as_tensor(read_kitti_bin(kitti.path("velodyne", kitti.ids[index]))[:, :3], dtype=torch.float32)


def evaluate_detections(kitti: KittiDataset, dets: Sequence[Detections3D], classes: Sequence[str],
                        distance_bins_m: Sequence[float] = (0.0, 20.0, 40.0, 70.4),
                        baseline: Sequence[KittiLabels] | None = None, interval_draws: int = 1000) -> Evaluation:
    """All metrics (see the module docstring) of `dets[i]` (LiDAR detections, labels indexing
    `classes`) on frame `i` of `kitti`; `baseline`: another model's result files of the same
    frames (`read_predictions`) for the paired difference."""
    dt = [detections_to_labels(kitti, i, d, classes) for i, d in enumerate(dets)]
    gt = [kitti.labels(i) for i in range(len(kitti))]
    metrics: dict[str, float] = {}
    official = kitti_eval(gt, dt, classes=classes)
    for cls, by_metric in official.items():
        for metric, res in by_metric.items():
            for key in ("R40", "R11"):
                for diff, value in res[key].items():
                    metrics[f"{cls}/{metric}_{key}/{diff}"] = value
            if metric == "3d":
                for diff, value in res["max_recall"].items():
                    metrics[f"diag/{cls}/3d_recall/{diff}"] = value
    for metric in ("bbox", "bev", "3d", "aos"):
        for key in ("R40", "R11"):
            for diff in DIFFICULTIES:
                metrics[f"mAP/{metric}_{key}/{diff}"] = float(np.mean([metrics[f"{c}/{metric}_{key}/{diff}"]
                                                                       for c in classes]))
    curves = {}
    for cls in classes:
        curves[cls] = prepare_curves(gt, dt, cls, "moderate", "3d", MIN_OVERLAP[cls]["3d"])
        lo, hi = kitti_ap_interval(curves[cls], draws=interval_draws)
        metrics[f"diag/{cls}/3d_R40_interval95/moderate_low"] = lo
        metrics[f"diag/{cls}/3d_R40_interval95/moderate_high"] = hi
        if baseline is not None:
            base = prepare_curves(gt, baseline, cls, "moderate", "3d", MIN_OVERLAP[cls]["3d"])
            key = f"diag/{cls}/3d_R40_minus_baseline/moderate"
            metrics[key] = curves[cls].evaluate()["R40"] - base.evaluate()["R40"]
            metrics[key + "_low"], metrics[key + "_high"] = kitti_ap_interval(curves[cls], base, draws=interval_draws)
        for rng, value in kitti_ap_by_range(gt, dt, cls, distance_bins_m).items():
            metrics[f"diag/{cls}/3d_R40_by_range/{rng}"] = value
        for part, value in oracle_ap(gt, dt, cls).items():
            metrics[f"diag/{cls}/3d_R40_oracle/{part}"] = value

    # LiDAR-frame views: nuScenes (with the LiDAR points in each object) and the box errors
    frame_gts, nus_gt, nus_dt = [], [], []
    cls_id = {c: i for i, c in enumerate(classes)}
    for i, (g, det) in enumerate(zip(gt, dets)):
        keep, boxes = _lidar_gt(kitti, i, g, classes)
        names = np.asarray(g.names).astype(str)[keep]
        bbox = np.asarray(g.bbox2d, np.float64)[keep].reshape(-1, 4)
        difficulty = kitti_difficulty(bbox[:, 3] - bbox[:, 1], np.asarray(g.occluded)[keep],
                                      np.asarray(g.truncated)[keep])
        frame_gts.append(FrameGT(boxes=boxes, labels=np.array([cls_id[n] for n in names], np.int64),
                                 difficulty=difficulty))
        counts = (points_in_boxes_count(_points(kitti, i), torch.as_tensor(boxes, dtype=torch.float32)).numpy()
                  if len(boxes) else np.zeros(0, np.int64))
        nus_gt.append(NuScenesGT(boxes, [KITTI_TO_NUSCENES[n] for n in names], counts))
        nus_dt.append(NuScenesDets(det.boxes.tensor.detach().cpu().double().numpy(),
                                   det.scores.detach().cpu().double().numpy(),
                                   [KITTI_TO_NUSCENES[classes[k]] for k in det.labels.tolist()]))
    nus = nuscenes_eval(nus_gt, nus_dt, classes=[KITTI_TO_NUSCENES[c] for c in classes])
    metrics["nuscenes/mAP"], metrics["nuscenes/NDS"] = 100 * nus["mAP"], 100 * nus["NDS"]
    for m in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        metrics[f"nuscenes/{m}"] = nus[m]
    for c in classes:
        metrics[f"nuscenes/{c}/AP"] = 100 * nus["AP_mean"][KITTI_TO_NUSCENES[c]]
    for cls, errs in box_errors(frame_gts, list(dets), classes=classes).items():
        for name, value in errs.items():
            metrics[f"diag/{cls}/box_error_median/{name}"] = float(value)
    return Evaluation(metrics, dt, gt, curves)


_MISSED_COLUMNS = ("frame_id", "class", "x", "y", "z", "dx", "dy", "dz", "yaw", "range_m", "lidar_points",
                   "best_3d_iou", "best_score")


def write_missed(kitti: KittiDataset, ev: Evaluation, path: Path) -> int:
    """Writes `path` (CSV, atomically): one row per valid moderate object that no detection takes as
    a true positive in the official 3D evaluation (`missed_objects`: what keeps the recall below
    100), with its LiDAR box, range, LiDAR points inside it, and the best 3D IoU of a detection of
    its class in the frame with that detection's score (empty without one). Returns the rows."""
    rows = []
    for cls, curves in ev.curves.items():
        rows += [(m, cls) for m in missed_objects(curves)]
    lines = [",".join(_MISSED_COLUMNS)]
    for f in sorted({m["frame"] for m, _ in rows}):
        here = [(m, cls) for m, cls in rows if m["frame"] == f]
        g, dt = ev.gt[f], ev.labels[f]
        boxes = camera_boxes_to_lidar(g.boxes_cam[[m["gt_index"] for m, _ in here]], kitti.calib(f))
        counts = points_in_boxes_count(_points(kitti, f), torch.as_tensor(boxes, dtype=torch.float32)).tolist()
        for (m, cls), box, n in zip(here, boxes.tolist(), counts):
            score = "" if m["best_det"] < 0 else f"{dt.score[m['best_det']]:.4f}"
            lines.append(",".join([kitti.ids[f], cls, *(f"{v:.3f}" for v in box), f"{np.hypot(box[0], box[1]):.2f}",
                                   str(n), f"{m['best_overlap']:.4f}", score]))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(rows)
