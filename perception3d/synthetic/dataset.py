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

`write_kitti_dataset` generates into a temporary folder beside `root` (named with the process id)
and renames it into place when complete, with `root/synthetic.json` recording the settings the
bytes depend on (`dataset_settings`): a folder at `root` is either complete or absent, and a
later call (or `detection.task.prepare_data`) can tell whether it holds what it asks for.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception3d.errors import ConfigError, DataError
from perception3d.io.atomic import atomic_folder, atomic_write_text
from perception3d.io.kitti import KittiLabels, lidar_boxes_to_camera, write_label
from perception3d.io.pointcloud import write_kitti_bin
from perception3d.synthetic.camera import CameraRender, render_camera
from perception3d.synthetic.lidar import LidarScan, simulate_lidar
from perception3d.synthetic.radar import simulate_radar
from perception3d.synthetic.scene import Scene, SceneConfig, generate_scene

__all__ = ["SyntheticFrame", "generate_frame", "write_frame", "write_kitti_dataset", "occlusion_level",
           "GENERATOR_VERSION", "RECORD_NAME", "dataset_settings", "read_settings_record", "settings_differences",
           "split_sizes"]

GENERATOR_VERSION = 1
"""Bumped when the generator's output bytes change for the same settings."""
RECORD_NAME = "synthetic.json"
"""The settings record written at the root of every generated dataset."""


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


def split_sizes(num_frames: int, val_fraction: float) -> tuple[int, int]:
    """`(train, val)` frame counts of the default split: the last `round(num_frames * val_fraction)`
    frames are "val", the rest "train"."""
    n_val = int(round(num_frames * val_fraction))
    return num_frames - n_val, n_val


def dataset_settings(num_frames: int, seed: int, cfg: SceneConfig = SceneConfig(), split: str = "training",
                     image_sets: Mapping[str, Sequence[int]] | None = None, val_fraction: float = 0.2) -> dict:
    """The settings a generated dataset's bytes depend on, as recorded in `root/synthetic.json`
    (not `workers` or `progress`, which do not change them)."""
    settings: dict[str, Any] = {
        "generator": "perception3d.synthetic", "version": GENERATOR_VERSION, "frames": int(num_frames),
        "seed": int(seed), "val_fraction": None if image_sets is not None else float(val_fraction),
        "image_sets": None if image_sets is None else {str(k): [int(i) for i in v] for k, v in image_sets.items()},
        "split": str(split),
        "scene_config": "default" if cfg == SceneConfig() else dataclasses.asdict(cfg),
    }
    return json.loads(json.dumps(settings))  # tuples -> lists: compares equal to a record read back


def read_settings_record(root: str | Path) -> dict | None:
    """`root/synthetic.json` (see `dataset_settings`), or None where there is none (e.g. a real dataset).

    Raises:
        DataError: the record exists but is not a JSON object, naming it.
    """
    path = Path(root) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected the generator's settings record") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object of generator settings, got {type(record).__name__}")
    return record


def settings_differences(record: Mapping, wanted: Mapping, keys: Sequence[str] | None = None
                         ) -> list[tuple[str, Any, Any]]:
    """`(key, recorded, wanted)` for each of `keys` (default: every key of `wanted` but `version`)
    whose value differs."""
    keys = [k for k in wanted if k != "version"] if keys is None else keys
    return [(k, record.get(k), wanted.get(k)) for k in keys if record.get(k) != wanted.get(k)]


def _check_args(root: Path, num_frames, seed, split, image_sets, val_fraction, workers) -> None:
    def bad(name: str, expected: str, got) -> ConfigError:
        return ConfigError(f"write_kitti_dataset({root}): {name} must be {expected}, got {got!r}")

    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise bad("num_frames", "an integer >= 1", num_frames)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise bad("seed", "an integer >= 0", seed)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not (math.isfinite(val_fraction) and 0.0 <= val_fraction <= 1.0):
        raise bad("val_fraction", "a fraction in [0, 1]", val_fraction)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise bad("workers", "an integer >= 1", workers)
    if not isinstance(split, str) or not split or "/" in split or split in (".", ".."):
        raise bad("split", "a folder name such as 'training'", split)
    for name, idx in (image_sets or {}).items():
        if not isinstance(name, str) or not name or "/" in name:
            raise bad("image_sets", "a mapping of set names (no '/') to frame indices", name)
        outside = [i for i in idx if isinstance(i, bool) or not isinstance(i, (int, np.integer))
                   or not 0 <= i < num_frames]
        if outside:
            raise bad(f"image_sets[{name!r}]", f"frame indices in 0..{num_frames - 1}", outside[:5])


def _describe(differences: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: recorded {a!r}, asked for {b!r}" for k, a, b in differences)


def write_kitti_dataset(root: str | Path, num_frames: int, seed: int, cfg: SceneConfig = SceneConfig(),
                        split: str = "training", image_sets: Mapping[str, Sequence[int]] | None = None,
                        val_fraction: float = 0.2, workers: int = 1, progress: bool = False) -> list[str]:
    """Generate `num_frames` frames into the KITTI layout under `root`.

    The frames are written to a temporary folder beside `root` (`perception3d.io.atomic_folder`) that is
    renamed to `root` once complete, with `root/synthetic.json` recording the settings
    (`dataset_settings`). Where `root` already holds a dataset with the same settings (another
    call, or another process that finished first) it is kept as it is.

    Args:
        root: output root (gets `{split}/...`, `ImageSets/` and `synthetic.json`); must not exist,
            be an empty folder, or hold a dataset written with the same settings.
        num_frames: frames 000000 .. num_frames-1 (>= 1).
        seed: dataset seed (frame i uses `(seed, i)`; >= 0).
        cfg: generator options.
        split: "training" or "testing" directory name.
        image_sets: name -> frame indices; default: the last `val_fraction` of the frames is "val",
            the rest "train".
        val_fraction: in [0, 1].
        workers: processes (frames are independent; output does not depend on this).
        progress: show a tqdm progress bar.

    Returns:
        The frame ids.

    Raises:
        ConfigError: an argument out of range, or `root` holding something else (a file, a
            folder without a settings record, a dataset with other settings), before anything
            is written.
    """
    root = Path(root)
    _check_args(root, num_frames, seed, split, image_sets, val_fraction, workers)
    ids = [f"{i:06d}" for i in range(num_frames)]
    wanted = dataset_settings(num_frames, seed, cfg, split, image_sets, val_fraction)
    if _existing_dataset_matches(root, wanted):
        return ids
    try:
        with atomic_folder(root) as tmp:
            split_dir = tmp / split
            split_dir.mkdir(parents=True)
            jobs = [(split_dir, int(seed), i, cfg) for i in range(num_frames)]
            if workers > 1 and num_frames > 1:
                import multiprocessing as mp

                with mp.get_context("spawn").Pool(workers) as pool:
                    list(_progress(pool.imap(_job, jobs), num_frames, progress))
            else:
                list(_progress(map(_job, jobs), num_frames, progress))
            if image_sets is None:
                n_train, _ = split_sizes(num_frames, val_fraction)
                image_sets = {"train": range(n_train), "val": range(n_train, num_frames)}
            (tmp / "ImageSets").mkdir()
            for name, idx in image_sets.items():
                atomic_write_text(tmp / "ImageSets" / f"{name}.txt", "".join(f"{int(i):06d}\n" for i in idx))
            atomic_write_text(tmp / RECORD_NAME, json.dumps(wanted, indent=2) + "\n")
    except FileExistsError:  # another process was first
        _existing_dataset_matches(root, wanted, meanwhile=True)  # raises unless the same settings
    return ids


def _existing_dataset_matches(root: Path, wanted: dict, meanwhile: bool = False) -> bool:
    """True where `root` holds a complete dataset with the `wanted` settings; False where `root`
    is absent or an empty folder. Raises ConfigError for anything else."""
    when = " meanwhile (another process)" if meanwhile else ""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: is a file; expected a folder to write the synthetic dataset to")
    if not root.is_dir():
        return False
    record = read_settings_record(root)
    if record is None:
        if not any(root.iterdir()):
            return False
        raise ConfigError(f"{root}: the folder was written{when} without a settings record ({RECORD_NAME}), "
                          "so it is not a dataset of write_kitti_dataset; remove it or choose another root")
    diff = settings_differences(record, wanted)
    if diff:
        raise ConfigError(f"{root}: holds a synthetic dataset written{when} with other settings "
                          f"({root / RECORD_NAME}): {_describe(diff)}; remove it or choose another root")
    return True


def _progress(it, total: int, show: bool):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthetic frames", unit="frame")
