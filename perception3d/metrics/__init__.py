"""Evaluation metrics: the KITTI evaluation (`metrics.kitti`, the devkit's algorithm), the nuScenes
detection evaluation (`metrics.nuscenes`, nuscenes-devkit's definitions; re-exported here). Our
own LiDAR-frame box errors are the detectors' (`detection.box_errors`)."""
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

__all__ = [
    "KITTI_TO_NUSCENES",
    "NUSCENES_ATTRIBUTES",
    "NUSCENES_CLASS_RANGE_M",
    "NUSCENES_CLASSES",
    "NUSCENES_DIST_THRESHOLDS_M",
    "NUSCENES_TP_METRICS",
    "NuScenesDets",
    "NuScenesGT",
    "nuscenes_eval",
]
