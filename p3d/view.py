"""Look at a dataset frame, a model's predictions, a run or a .ply in 3D (Open3D).

    p3d view ../shared/data/kitti --frame 000008                     # LiDAR, ground truth, camera
    p3d view outputs/quickstart_shipped --frame 000051               # an evaluation: predictions on their frame
    p3d view DATA_ROOT --frame ID --pred outputs/RUN/predictions     # the same, naming both
    p3d view outputs/3dgs_quickstart [--splat]                       # a splatting run: Gaussians, cameras
    p3d view scene.ply | cloud.pcd | cloud.bin                       # a 3DGS .ply or a point cloud
    ... --screenshot out.png                                         # headless: write a PNG instead

SOURCE is one of: a KITTI-layout root (`training/velodyne/...`), a frame's velodyne .bin inside one,
a run or evaluation folder (detection: its predictions/ over the frames they were made on, read from
metrics.json or config.yaml; splatting: its point_cloud.ply and the scene's cameras), a standard 3DGS
.ply (Gaussian centres in their colour), or a point cloud (.bin, .pcd, .ply).

LiDAR points are coloured by height (or `--color intensity`); boxes in class colours, predictions
with their score (those of at least --min-score), ground truth lightened; the camera's frustum in
white; radar returns (a frame's radar/ file) in cyan, each with an arrow of its radial velocity over
one second. `--splat` renders the Gaussians with the toolkit's rasterizer instead of their centres.

With a display an interactive window opens; `--screenshot out.png` renders offscreen instead (no
display needed) and writes the camera beside it (`out.camera.json`, reusable with --camera).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from perception3d.errors import DataError, Perception3DError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="p3d view", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", metavar="SOURCE", help="dataset root, .bin/.pcd/.ply file, or run folder")
    ap.add_argument("--frame", metavar="ID", help="frame id of a dataset (default: the first one)")
    ap.add_argument("--split", default="training", help="KITTI split folder (default: training)")
    ap.add_argument("--pred", metavar="DIR", help="predictions folder (KITTI result files) to draw on the frame")
    ap.add_argument("--data", metavar="ROOT", help="dataset root of a predictions folder (default: from the run)")
    ap.add_argument("--color", choices=("height", "intensity"), default="height", help="LiDAR point colours")
    ap.add_argument("--min-score", type=float, default=0.3, help="draw predictions of at least this score")
    ap.add_argument("--splat", action="store_true", help="render the Gaussians (splatting) instead of their centres")
    ap.add_argument("--screenshot", metavar="OUT.png", help="render offscreen into this PNG (no window)")
    ap.add_argument("--camera", metavar="CAM.json", help="view from this camera (as --screenshot saves it)")
    ap.add_argument("--size", default="1280x720", metavar="WxH", help="image / window size (default 1280x720)")
    return ap


# -- sources --------------------------------------------------------------------------------------------
def _kitti_root(path: Path, split: str) -> bool:
    return (path / split / "velodyne").is_dir()


def kitti_frame_scene(root: Path, split: str, frame: str | None, color: str, pred_dir: Path | None,
                      min_score: float):
    """A KITTI-layout frame: LiDAR, ground truth, camera frustum, radar; predictions if given."""
    from perception3d.io.kitti import KittiDataset, camera_boxes_to_lidar, read_label
    from p3d import viewer as V

    listed = KittiDataset(root, split=split, load_image=False)
    if frame is None:
        ids = sorted(p.stem for p in pred_dir.glob("*.txt")) if pred_dir is not None else listed.ids
        if not ids:
            raise DataError(f"{pred_dir or listed.dir}: no frames")
        frame = ids[0]
    frame = f"{int(frame):06d}" if str(frame).isdigit() else str(frame)
    if not listed.path("velodyne", frame).is_file():
        raise DataError(f"--frame {frame}: {listed.path('velodyne', frame)} not found")
    pred_file = pred_dir / f"{frame}.txt" if pred_dir is not None else None
    if pred_file is not None and not pred_file.is_file():
        raise DataError(f"{pred_file}: no predictions for frame {frame}")
    f = KittiDataset(root, split=split, ids=[frame], load_image=False)[0]
    scene = V.Scene(title=f"{root} / {split} / {frame}")
    scene.extend(V.lidar_layers(f.points_lidar, color))
    gt = f.labels.names != "DontCare"
    gt_layers = V.box_layers(f.boxes_lidar[gt], f.labels.names[gt], ground_truth=True)
    if pred_file is not None:
        gt_layers.labels = []  # the predictions' labels (class and score) say enough
    scene.extend(gt_layers)
    if pred_file is not None:
        pred = read_label(pred_file)
        if len(pred) and pred.score is None:
            raise DataError(f"{pred_file}: expected detections with a score (16 fields per line)")
        if len(pred):
            pred = pred.select(pred.score >= min_score)
            scene.extend(V.box_layers(camera_boxes_to_lidar(pred.boxes_cam, f.calib), pred.names, pred.score))
        scene.title += f" + {pred_dir}"
    if f.image_shape is not None:  # the left colour camera (P2) in the LiDAR frame
        K = f.calib.P2[:, :3]
        offset = np.linalg.solve(K, f.calib.P2[:, 3])  # camera 2's centre is at -offset in rectified coords
        rect_to_cam2 = np.eye(4)
        rect_to_cam2[:3, 3] = offset
        cam_to_lidar = f.calib.T_lidar_cam @ np.linalg.inv(rect_to_cam2)
        h, w = f.image_shape
        scene.extend(V.frustum_layers(K, cam_to_lidar, w, h, depth=6.0, name="image_2"))
    if f.radar is not None:
        scene.extend(V.radar_layers(f.radar))
    return scene


def splat_run_scene(run: Path):
    """A splatting run folder: its point_cloud.ply and the scene's camera frusta."""
    from perception3d.config import load_config
    from splatting.config import SplatConfig
    from splatting.data.scene import load_scene
    from p3d import viewer as V

    cfg = load_config(run / "config.yaml", SplatConfig)
    ply = run / "point_cloud.ply"
    if not ply.is_file():
        raise DataError(f"{ply}: not found (a splatting run writes it when training ends)")
    scene = gaussian_scene(ply)
    frames = load_scene(cfg.data.root, images=cfg.data.images).frames
    centres = np.stack([fr.camtoworld[:3, 3] for fr in frames])
    depth = 0.1 * max(float(np.ptp(centres, axis=0).max()), 1e-3)
    for fr in frames:
        scene.extend(V.frustum_layers(fr.K, fr.camtoworld, fr.width, fr.height, depth))
    scene.up = tuple(-np.mean([fr.camtoworld[:3, 1] for fr in frames], axis=0))  # OpenCV y points down
    first = frames[0]
    scene.camera = V.Camera(first.K.copy(), np.linalg.inv(first.camtoworld), first.width, first.height)
    scene.title = f"{run} ({len(frames)} cameras)"
    scene.background = tuple(cfg.data.background)  # what the run was trained on
    return scene


def gaussian_scene(ply: Path):
    from splatting.io import load_gaussian_ply
    from p3d import viewer as V

    d = load_gaussian_ply(ply)
    scene = V.Scene(title=str(ply))
    scene.extend(V.gaussian_layers(d["means"].numpy(), d["sh0"].numpy(), d["opacities_logit"].numpy()))
    scene.gaussians = ply
    return scene


def _is_gaussian_ply(path: Path) -> bool:
    with open(path, "rb") as fh:
        header = fh.read(4096).split(b"end_header")[0]
    return b"property float f_dc_0" in header and b"property float opacity" in header


def load_source(args):
    """The Scene SOURCE and the options describe (DataError for what cannot be read)."""
    from perception3d.io.pointcloud import read_points
    from p3d import viewer as V

    src = Path(args.source)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    pred = Path(args.pred) if args.pred else None
    if pred is not None and not pred.is_dir():
        raise DataError(f"--pred {pred}: predictions folder not found")
    if src.is_file():
        if src.suffix == ".bin" and src.parent.name == "velodyne" and _kitti_root(src.parents[2], src.parent.parent.name):
            return kitti_frame_scene(src.parents[2], src.parent.parent.name, src.stem, args.color, pred, args.min_score)
        if src.suffix == ".ply" and _is_gaussian_ply(src):
            return gaussian_scene(src)
        scene = V.Scene(title=str(src))
        scene.extend(V.lidar_layers(read_points(src), args.color))
        return scene
    if _kitti_root(src, args.split):
        return kitti_frame_scene(src, args.split, args.frame, args.color, pred, args.min_score)
    config = src / "config.yaml"
    task = None
    if config.is_file():
        import yaml

        task = (yaml.safe_load(config.read_text()) or {}).get("task")
    if task == "splatting":
        return splat_run_scene(src)
    folder = src / "predictions" if (src / "predictions").is_dir() else src
    if any(folder.glob("*.txt")):
        root, split = _data_of(src if folder != src else src.parent, args)
        return kitti_frame_scene(root, split, args.frame, args.color, pred or folder, args.min_score)
    raise DataError(f"{src}: not a KITTI-layout root ({src / args.split / 'velodyne'} not found), a run or "
                    "evaluation folder (config.yaml or predictions/), nor a .bin / .pcd / .ply file")


def _data_of(run: Path, args) -> tuple[Path, str]:
    """The dataset a detection run's predictions were made on: --data, else its metrics.json or config.yaml."""
    if args.data:
        return Path(args.data), args.split
    metrics = run / "metrics.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text()).get("data") or {}
        if data.get("root"):
            return Path(data["root"]), data.get("split", args.split)
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        root = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("root")
        if root:
            return Path(root), args.split
    raise DataError(f"{run}: cannot tell which dataset its predictions are of (no data root in metrics.json or "
                    "config.yaml); pass --data ROOT")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise DataError(f"--size {text!r}: width and height must be in 16..8192")
    return w, h


def splat_image(ply: Path, camera, background=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Render a 3DGS .ply with the toolkit's rasterizer from `camera` over `background`: `uint8 [H, W, 3]`."""
    import torch

    from splatting.gaussians import Gaussians

    g = Gaussians.load_ply(ply)
    with torch.no_grad():
        rgb = g.render(torch.as_tensor(camera.world_to_camera, dtype=torch.float32)[None],
                       torch.as_tensor(camera.K, dtype=torch.float32)[None], camera.width, camera.height,
                       backgrounds=torch.tensor([background], dtype=torch.float32))[0][0]
    return (rgb.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from p3d import viewer as V

    try:
        width, height = _size(args.size)
        if args.screenshot and Path(args.screenshot).suffix.lower() != ".png":
            raise DataError(f"--screenshot {args.screenshot}: expected a .png file name")
        if not args.screenshot and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise DataError("no display to open a window on (DISPLAY is not set): pass --screenshot out.png")
        camera = V.Camera.read(args.camera) if args.camera else None
        scene = load_source(args)
        if args.splat and getattr(scene, "gaussians", None) is None:
            raise DataError("--splat: SOURCE holds no Gaussians (a 3DGS .ply or a splatting run folder)")
        if camera is None and scene.camera is not None:  # the scene's own view, at the size asked for
            s = width / scene.camera.width
            K = scene.camera.K.copy()
            K[:2] *= s
            camera = V.Camera(K, scene.camera.world_to_camera, width, round(scene.camera.height * s))
        camera = camera or V.default_camera(scene, width, height)
        if not args.screenshot:
            V.show(scene, camera)
            return 0
        from perception3d.io.atomic import atomic_path, atomic_write_text
        from PIL import Image

        image = splat_image(scene.gaussians, camera, scene.background) if args.splat else V.render(scene, camera)
        out = Path(args.screenshot)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        atomic_write_text(out.with_suffix(".camera.json"), camera.to_json())
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"screenshot": str(out), "camera": str(out.with_suffix(".camera.json")),
                      "width": camera.width, "height": camera.height}))
    return 0
