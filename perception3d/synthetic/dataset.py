"""Synthetic frames (scene + LiDAR + image + radar + KITTI labels) and the KITTI-layout writer.

Written layout (read back by `perception3d.io.kitti.KittiDataset`)::

    root/ImageSets/{train,val}.txt
    root/{split}/velodyne/XXXXXX.bin   float32 [N, 4] x, y, z, reflectance
    root/{split}/image_2/XXXXXX.png    1242x375 RGB
    root/{split}/calib/XXXXXX.txt      KittiCalibration.to_file
    root/{split}/label_2/XXXXXX.txt    KITTI label lines (2D box from the rendered instance mask)
    root/{split}/radar/XXXXXX.bin      float32 [K, 6] x, y, z, radial velocity, rcs, label row (-1 clutter)

Frame i of a dataset with seed s is generated from `numpy.random.default_rng((s, i))` (and
`(s, i, k)` for the sensors), so frames are independent of the number of workers and the same seed
writes the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from perception3d.io.kitti import KittiLabels, lidar_boxes_to_camera, write_label
from perception3d.io.pointcloud import write_kitti_bin
from perception3d.synthetic.camera import CameraRender, render_camera
from perception3d.synthetic.lidar import LidarScan, simulate_lidar
from perception3d.synthetic.radar import simulate_radar
from perception3d.synthetic.scene import Scene, SceneConfig, generate_scene

__all__ = ["SyntheticFrame", "generate_frame", "write_frame", "write_kitti_dataset", "occlusion_level"]


@dataclass(frozen=True)
class SyntheticFrame:
    """One generated frame.

    Attributes:
        scene: the generating scene.
        points_lidar: `float32 [N, 4]`.
        image: `uint8 [375, 1242, 3]`.
        labels: KITTI labels of the objects visible in image_2.
        label_objects: `[L]` scene object index of each label row.
        boxes_lidar: `[L, 7]` exact LiDAR boxes of the label rows.
        visible_fraction: `[L]` fraction of the object's camera rays not occluded.
        num_lidar_points: `[L]` LiDAR points on each labelled object.
        radar: `float32 [K, 6]`.
        lidar / camera: the raw simulator outputs.
    """

    scene: Scene
    points_lidar: np.ndarray
    image: np.ndarray
    labels: KittiLabels
    label_objects: np.ndarray
    boxes_lidar: np.ndarray
    visible_fraction: np.ndarray
    num_lidar_points: np.ndarray
    radar: np.ndarray
    lidar: LidarScan
    camera: CameraRender


def occlusion_level(visible_fraction: np.ndarray) -> np.ndarray:
    """KITTI occlusion state from the visible fraction: >= 0.8 -> 0, >= 0.4 -> 1, > 0 -> 2, else 3."""
    f = np.asarray(visible_fraction)
    return np.select([f >= 0.8, f >= 0.4, f > 0], [0, 1, 2], 3).astype(np.int32)


def _box_corners(boxes: np.ndarray) -> np.ndarray:
    """`[M, 7]` -> `[M, 8, 3]` corners."""
    sgn = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) / 2
    local = sgn[None] * boxes[:, None, 3:6]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    return boxes[:, None, :3] + np.stack([c * local[..., 0] - s * local[..., 1],
                                          s * local[..., 0] + c * local[..., 1], local[..., 2]], -1)


def _as_seed(seed) -> tuple[int, ...]:
    return tuple(int(s) for s in np.atleast_1d(seed))


def generate_frame(seed: int | Sequence[int], cfg: SceneConfig = SceneConfig()) -> SyntheticFrame:
    """Generate a scene and simulate all sensors and labels.

    Args:
        seed: int or sequence of ints (a dataset uses `(seed, frame_index)`).
        cfg: generator options.
    """
    seed = _as_seed(seed)
    scene = generate_scene(seed, cfg)
    scan = simulate_lidar(scene, np.random.default_rng((*seed, 1)))
    render = render_camera(scene, np.random.default_rng((*seed, 2)))
    calib = scene.calib
    W, H = cfg.camera.width, cfg.camera.height
    m = len(scene.boxes_lidar)

    # projected 3D boxes -> truncation
    corners = _box_corners(scene.boxes_lidar).reshape(-1, 3)
    cam = calib.lidar_to_cam(corners)
    cam[:, 2] = np.maximum(cam[:, 2], 0.1)
    uvw = np.concatenate([cam, np.ones((len(cam), 1))], 1) @ calib.P2.T
    uv = (uvw[:, :2] / uvw[:, 2:3]).reshape(m, 8, 2)
    lo, hi = uv.min(1), uv.max(1)
    clo = np.clip(lo, 0, [W - 1, H - 1])
    chi = np.clip(hi, 0, [W - 1, H - 1])
    area = np.prod(np.maximum(hi - lo, 1e-6), 1)
    carea = np.prod(np.maximum(chi - clo, 0), 1)
    truncated = np.clip(1 - carea / area, 0, 1)

    # instance-mask boxes (render resolution -> full resolution)
    inst = render.instance
    ys, xs = np.nonzero(inst >= 0)
    ids = inst[ys, xs]
    big = np.iinfo(np.int64).max
    x0 = np.full(m, big)
    y0 = np.full(m, big)
    x1 = np.full(m, -1)
    y1 = np.full(m, -1)
    np.minimum.at(x0, ids, xs)
    np.minimum.at(y0, ids, ys)
    np.maximum.at(x1, ids, xs)
    np.maximum.at(y1, ids, ys)
    s = render.scale
    mask_box = np.stack([x0 / s, y0 / s, (x1 + 1) / s - 1, (y1 + 1) / s - 1], 1)
    mask_box = np.clip(mask_box, 0, [W - 1, H - 1, W - 1, H - 1])

    n_pts = np.bincount(scan.hit_obj[scan.hit_obj >= 0], minlength=m)[:m]
    cam_frac = render.obj_visible / np.maximum(render.obj_total, 1)
    lid_frac = scan.obj_visible / np.maximum(scan.obj_total, 1)
    frac = np.where(render.obj_total > 0, cam_frac, lid_frac)
    in_image = (carea > 0) & (truncated < 1)
    keep = np.flatnonzero(in_image & ((render.obj_visible > 0) | (n_pts > 0)))

    boxes = scene.boxes_lidar[keep]
    cam_boxes = lidar_boxes_to_camera(boxes, calib)
    alpha = cam_boxes[:, 6] - np.arctan2(cam_boxes[:, 0], cam_boxes[:, 2])
    alpha = alpha - np.floor(alpha / (2 * np.pi) + 0.5) * 2 * np.pi
    bbox = np.where((render.obj_visible[keep] > 0)[:, None], mask_box[keep],
                    np.concatenate([clo[keep], chi[keep]], 1))
    labels = KittiLabels(
        names=scene.classes[keep],
        truncated=truncated[keep].astype(np.float32),
        occluded=np.where(render.obj_visible[keep] > 0, occlusion_level(frac[keep]), 3).astype(np.int32),
        alpha=alpha.astype(np.float32),
        bbox2d=bbox.astype(np.float32),
        dims_hwl=cam_boxes[:, 3:6].astype(np.float32),
        loc_cam=cam_boxes[:, :3].astype(np.float32),
        rotation_y=cam_boxes[:, 6].astype(np.float32),
    )
    radar = simulate_radar(scene, np.random.default_rng((*seed, 3)), keep, frac[keep])
    return SyntheticFrame(scene, scan.points, render.image, labels, keep, boxes, frac[keep], n_pts[keep], radar,
                          scan, render)


def write_frame(split_dir: str | Path, frame_id: str, frame: SyntheticFrame) -> None:
    """Write one frame's files under `split_dir/{velodyne,image_2,calib,label_2,radar}/`."""
    from PIL import Image

    d = Path(split_dir)
    for sub in ("velodyne", "image_2", "calib", "label_2", "radar"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    write_kitti_bin(d / "velodyne" / f"{frame_id}.bin", frame.points_lidar)
    Image.fromarray(frame.image).save(d / "image_2" / f"{frame_id}.png", optimize=False, compress_level=6)
    frame.scene.calib.to_file(d / "calib" / f"{frame_id}.txt")
    write_label(d / "label_2" / f"{frame_id}.txt", frame.labels)
    write_kitti_bin(d / "radar" / f"{frame_id}.bin", frame.radar)


def _job(args) -> str:
    split_dir, seed, index, cfg = args
    fid = f"{index:06d}"
    write_frame(split_dir, fid, generate_frame((seed, index), cfg))
    return fid


def write_kitti_dataset(root: str | Path, num_frames: int, seed: int, cfg: SceneConfig = SceneConfig(),
                        split: str = "training", image_sets: Mapping[str, Sequence[int]] | None = None,
                        val_fraction: float = 0.2, workers: int = 1, progress: bool = False) -> list[str]:
    """Generate `num_frames` frames into the KITTI layout under `root`.

    Args:
        root: output root (gets `{split}/...` and `ImageSets/`).
        num_frames: frames 000000 .. num_frames-1.
        seed: dataset seed (frame i uses `(seed, i)`).
        cfg: generator options.
        split: "training" or "testing" directory name.
        image_sets: name -> frame indices; default: the last `val_fraction` of the frames is "val",
            the rest "train".
        workers: processes (frames are independent; output does not depend on this).
        progress: show a tqdm progress bar.

    Returns:
        The written frame ids.
    """
    root = Path(root)
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(split_dir, int(seed), i, cfg) for i in range(num_frames)]
    if workers > 1 and num_frames > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            it = pool.imap(_job, jobs)
            ids = list(_progress(it, num_frames, progress))
    else:
        ids = list(_progress(map(_job, jobs), num_frames, progress))
    if image_sets is None:
        n_val = int(round(num_frames * val_fraction))
        image_sets = {"train": range(num_frames - n_val), "val": range(num_frames - n_val, num_frames)}
    (root / "ImageSets").mkdir(exist_ok=True)
    for name, idx in image_sets.items():
        (root / "ImageSets" / f"{name}.txt").write_text("".join(f"{int(i):06d}\n" for i in idx))
    return ids


def _progress(it, total: int, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthetic frames", unit="frame")
