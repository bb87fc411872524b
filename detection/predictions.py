"""Detections as KITTI result files: one `XXXXXX.txt` per frame in the label format with a score
(16 fields), what the KITTI devkit, its test server and OpenPCDet read and write.

`tools/eval.py` (and the end of training) writes the held-out frames' detections to
`OUT/predictions/`; `eval.baseline` points at another run's folder to compare two models on the
same frames (`detection.task.evaluate_model`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.io.atomic import fsync_dir
from perception3d.geometry.boxes import box_to_image_bbox, boxes_lidar_to_kitti_camera, kitti_camera_to_boxes_lidar
from perception3d.io.kitti import KittiDataset, KittiLabels, read_image_shape, read_label, write_label
from perception3d.structures import Boxes3D, Detections3D

__all__ = ["write_predictions", "read_predictions"]


def write_predictions(kitti: KittiDataset, dets: Sequence[Detections3D], folder: str | Path,
                      classes: Sequence[str]) -> None:
    """Write `dets[i]` (LiDAR boxes, labels indexing `classes`) as `folder/<kitti.ids[i]>.txt`.

    Camera boxes through each frame's calibration; the 2D box is the projected 3D box clipped to
    the image (zeros where the image size is unknown); truncation and occlusion are -1 (unknown,
    as OpenPCDet writes them); alpha is `rotation_y - atan2(x, z)` of the camera box.

    The files are written to a temporary folder beside `folder` that then replaces it, so
    `folder` holds either the previous predictions or all of the new ones, never a mix.
    """
    if len(dets) != len(kitti):
        raise DataError(f"write_predictions: {len(dets)} detection sets for {len(kitti)} frames")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(kitti, dets, tmp, classes)
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _write_files(kitti: KittiDataset, dets: Sequence[Detections3D], folder: Path, classes: Sequence[str]) -> None:
    names = np.asarray(classes)
    for i, det in enumerate(dets):
        calib = kitti.calib(i)
        boxes = det.boxes.tensor.detach().cpu().to(torch.float64)
        cam = boxes_lidar_to_kitti_camera(boxes, calib).numpy()
        shape = _image_shape(kitti, i)
        bbox = (box_to_image_bbox(boxes, calib, (shape[1], shape[0])).numpy() if shape
                else np.zeros((len(boxes), 4)))
        alpha = cam[:, 6] - np.arctan2(cam[:, 0], cam[:, 2])
        alpha = alpha - np.floor(alpha / (2 * np.pi) + 0.5) * 2 * np.pi
        n = len(boxes)
        labels = KittiLabels(names=names[det.labels.cpu().numpy()], truncated=np.full(n, -1, np.float32),
                             occluded=np.full(n, -1, np.int32), alpha=alpha, bbox2d=bbox,
                             dims_hwl=cam[:, 3:6], loc_cam=cam[:, :3], rotation_y=cam[:, 6],
                             score=det.scores.detach().cpu().numpy())
        write_label(folder / f"{kitti.ids[i]}.txt", labels, decimals=4)


def read_predictions(kitti: KittiDataset, folder: str | Path, classes: Sequence[str]) -> list[Detections3D]:
    """Read `folder/<id>.txt` for every frame of `kitti`, in its order, as LiDAR detections.

    Lines of other types (e.g. DontCare, Van) are skipped.

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
        boxes = kitti_camera_to_boxes_lidar(torch.from_numpy(lab.boxes_cam.astype(np.float64)), kitti.calib(i))
        labels = torch.tensor([list(classes).index(n) for n in lab.names], dtype=torch.int64)
        scores = torch.from_numpy(lab.score.astype(np.float32)) if len(lab) else torch.zeros(0)
        out.append(Detections3D(Boxes3D(boxes.to(torch.float32)), scores, labels))
    return out


def _image_shape(kitti: KittiDataset, index: int) -> tuple[int, int] | None:
    path = kitti.path("image_2", kitti.ids[index])
    if not path.is_file():
        return None
    return read_image_shape(path)
