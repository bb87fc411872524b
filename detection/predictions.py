"""Detections as KITTI result files: one `XXXXXX.txt` per frame in the label format with a score
(16 fields), what the KITTI devkit, its test server and OpenPCDet read and write.

`tools/eval.py` (and the end of training) writes the held-out frames' detections to
`OUT/predictions/`; `eval.baseline` points at another run's folder to compare two models on the
same frames (`detection.task.evaluate_model`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.io.atomic import fsync_dir
from perception3d.geometry.boxes import box_to_image_bbox, boxes_lidar_to_kitti_camera
from perception3d.io.kitti import KittiDataset, KittiLabels, read_image_shape, read_label, write_label
from perception3d.structures import Detections3D

__all__ = ["detections_to_labels", "write_predictions", "read_predictions", "DECIMALS"]

DECIMALS = 4  # of the result files' values, as OpenPCDet writes them (the score always has 4)


def write_predictions(kitti: KittiDataset, labels: Sequence[KittiLabels], folder: str | Path) -> None:
    """Write `labels[i]` (from `detections_to_labels`) as `folder/<kitti.ids[i]>.txt`.

    The files are written to a temporary folder beside `folder` that then replaces it, so
    `folder` holds either the previous predictions or all of the new ones, never a mix.
    """
    if len(labels) != len(kitti):
        raise DataError(f"write_predictions: {len(labels)} detection sets for {len(kitti)} frames")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for fid, lab in zip(kitti.ids, labels):
            write_label(tmp / f"{fid}.txt", lab, decimals=DECIMALS)
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _written(values: np.ndarray, decimals: int) -> np.ndarray:
    """`values` as a result file holds them: each written with `decimals` decimals and read back."""
    flat = np.asarray(values, np.float64).reshape(-1)
    return np.array([float(f"{v:.{decimals}f}") for v in flat.tolist()], np.float64).reshape(np.shape(values))


def detections_to_labels(kitti: KittiDataset, index: int, det: Detections3D, classes: Sequence[str]) -> KittiLabels:
    """Frame `index`'s detections (LiDAR boxes, labels indexing `classes`) as a KITTI result file
    holds them, values rounded as written (so that evaluating these or the written file is the same).

    Camera boxes through the frame's calibration; the 2D box is the projected 3D box clipped to the
    image (zeros where the image size is unknown); truncation and occlusion are -1 (unknown, as
    OpenPCDet writes them); alpha is `rotation_y - atan2(x, z)` of the camera box."""
    names = np.asarray(classes)
    calib = kitti.calib(index)
    boxes = det.boxes.tensor.detach().cpu().to(torch.float64)
    cam = boxes_lidar_to_kitti_camera(boxes, calib).numpy()
    shape = _image_shape(kitti, index)
    bbox = (box_to_image_bbox(boxes, calib, (shape[1], shape[0])).numpy() if shape
            else np.zeros((len(boxes), 4)))
    alpha = cam[:, 6] - np.arctan2(cam[:, 0], cam[:, 2])
    alpha = alpha - np.floor(alpha / (2 * np.pi) + 0.5) * 2 * np.pi
    n = len(boxes)
    d = DECIMALS
    return KittiLabels(names=names[det.labels.cpu().numpy()], truncated=np.full(n, -1.0),
                       occluded=np.full(n, -1, np.int32), alpha=_written(alpha, d), bbox2d=_written(bbox, d),
                       dims_hwl=_written(cam[:, 3:6], d), loc_cam=_written(cam[:, :3], d),
                       rotation_y=_written(cam[:, 6], d),
                       score=_written(det.scores.detach().cpu().numpy(), 4))


def read_predictions(kitti: KittiDataset, folder: str | Path, classes: Sequence[str]) -> list[KittiLabels]:
    """Read `folder/<id>.txt` for every frame of `kitti`, in its order: the detections of `classes`
    as the result files hold them (camera boxes, 2D boxes, alpha, scores), what the KITTI
    evaluation reads. Lines of other types are skipped.

    Raises:
        DataError: before reading any box: a missing folder, a folder without a file for each
            frame (one message listing them; a run folder gets the hint to name its
            `predictions/`); then a malformed file or one without scores, naming it (and the line).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file; expected a predictions folder (one KITTI result file per frame)")
    if not folder.is_dir():
        raise DataError(f"{folder}: predictions folder not found (expected one KITTI result file per frame)")
    missing = [fid for fid in kitti.ids if not (folder / f"{fid}.txt").is_file()]
    if missing:
        hint = ""
        if (folder / "predictions").is_dir():
            hint = f"; {folder} looks like a run folder: name its predictions/ subfolder"
        elif not any(folder.glob("*.txt")):
            hint = "; the folder holds no .txt result files"
        shown = ", ".join(f"{fid}.txt" for fid in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                 if len(missing) > 5 else "")
        first = folder / f"{missing[0]}.txt"
        raise DataError(f"{first}: no predictions for frame {missing[0]} (the folder must cover the evaluated "
                        f"frames; {len(missing)} of {len(kitti.ids)} missing: {shown}){hint}")
    out = []
    for i, fid in enumerate(kitti.ids):
        path = folder / f"{fid}.txt"
        lab = read_label(path)
        keep = np.isin(lab.names, list(classes))
        lab = lab.select(keep)
        if len(lab) and lab.score is None:
            raise DataError(f"{path}: expected detections with a score (16 fields per line), got labels without")
        out.append(lab if lab.score is not None else replace(lab, score=np.zeros(0)))
    return out


def _image_shape(kitti: KittiDataset, index: int) -> tuple[int, int] | None:
    path = kitti.path("image_2", kitti.ids[index])
    if not path.is_file():
        return None
    return read_image_shape(path)
