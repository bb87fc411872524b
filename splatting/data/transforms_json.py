"""`transforms.json` datasets: NeRF-synthetic (Blender), instant-ngp and nerfstudio.

Layouts read by `load_transforms`::

    root/transforms.json                       one file (instant-ngp, nerfstudio), or
    root/transforms_{train,val,test}.json      Blender's per-split files (frames keep the split name)
    root/<file_path>                           images, paths relative to the json file's folder

Keys understood (top level, or per frame where per-frame values win):

* intrinsics: `fl_x`, `fl_y`, `cx`, `cy`, `w`, `h` (pixels), or Blender's `camera_angle_x`
  (`fx = 0.5 * w / tan(0.5 * camera_angle_x)`); without `fl_y`, `fy` comes from `camera_angle_y`
  when given, else `fy = fx`.
  `cx, cy` default to the image centre; a missing `w`/`h` is read from the image's header. Every
  image's header is read on load: a size other than the stated `w`/`h` is a DataError, and so
  are images of different sizes that share top-level pixel intrinsics without stating `w`/`h`.
* distortion: `k1, k2, p1, p2` (OpenCV); non-zero `k3`/`k4`, `is_fisheye` or a `camera_model`
  other than OPENCV/PINHOLE/SIMPLE_PINHOLE are DataErrors (not silently ignored).
* `transform_matrix`: camera -> world in the OpenGL/Blender convention (x right, y up, z backward),
  converted to OpenCV axes here: `camtoworld = transform_matrix @ diag(1, -1, -1, 1)`. It must be a
  rigid pose (last row `[0, 0, 0, 1]`, a rotation with det +1): anything else is a DataError.
* `file_path`: may lack an extension (Blender: "./train/r_0"); then `.png` and `.jpg` are tried.
* nerfstudio's `train_filenames` / `val_filenames` / `test_filenames` set the frames' splits;
  `ply_file_path` names an initial point cloud (x, y, z, red, green, blue), read into `Scene.points`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_write_text
from splatting.data.scene import CameraFrame, Scene, check_finite, finish_scene, image_size, pose_problem

__all__ = [
    "OPENGL_TO_OPENCV",
    "find_transforms_files",
    "load_transforms",
    "write_transforms_json",
]

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiply a camera -> world matrix to flip its camera y and z axes (OpenGL <-> OpenCV)."""

_BLENDER_SPLITS = ("train", "val", "test")
_PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")


def find_transforms_files(folder: str | Path) -> list[tuple[Path, str | None]]:
    """`[(json path, split or None)]` of a folder: `transforms.json`, else the Blender split files."""
    folder = Path(folder)
    if (folder / "transforms.json").is_file():
        return [(folder / "transforms.json", None)]
    return [(folder / f"transforms_{s}.json", s) for s in _BLENDER_SPLITS
            if (folder / f"transforms_{s}.json").is_file()]


def _resolve_image(base: Path, file_path: str) -> Path | None:
    p = base / file_path
    if p.is_file():
        return p.resolve()
    if not p.suffix:
        for ext in (".png", ".jpg"):
            q = p.with_name(p.name + ext)
            if q.is_file():
                return q.resolve()
    return None


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise DataError(f"{path}: expected a JSON object with a 'frames' list")
    return meta


class _Keys:
    """Per-frame value, else top-level value, with errors naming the file and key."""

    def __init__(self, path: Path, top: dict, frame: dict, index: int):
        self.path, self.top, self.frame, self.index = path, top, frame, index

    def raw(self, key: str) -> Any:
        return self.frame[key] if key in self.frame else self.top.get(key)

    def where(self, key: str) -> str:
        return f"{self.path}: frames[{self.index}].{key}" if key in self.frame else f"{self.path}: {key}"

    def num(self, key: str) -> float | None:
        v = self.raw(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{self.where(key)}: expected a finite number; got {v!r}")
        return float(v)


def _frame(path: Path, top: dict, frame: Any, index: int, split: str | None) -> tuple[str, CameraFrame | None]:
    """(name, frame) of one frames[] entry; frame is None when its image does not exist."""
    if not isinstance(frame, dict):
        raise DataError(f"{path}: frames[{index}]: expected an object; got {type(frame).__name__}")
    name = frame.get("file_path")
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: frames[{index}]: missing or empty 'file_path'")
    keys = _Keys(path, top, frame, index)
    if "transform_matrix" not in frame:
        raise DataError(f"{path}: frames[{index}] ({name!r}): missing 'transform_matrix'")
    tm = check_finite(frame["transform_matrix"], f"{path}: frames[{index}] ({name!r}).transform_matrix")
    if tm.shape == (3, 4):
        tm = np.concatenate([tm, [[0.0, 0.0, 0.0, 1.0]]])
    if tm.shape != (4, 4):
        raise DataError(f"{path}: frames[{index}] ({name!r}).transform_matrix: expected 4x4 (or 3x4); got {tm.shape}")
    problem = pose_problem(tm)
    if problem:
        raise DataError(f"{path}: frames[{index}] ({name!r}).transform_matrix {problem}")
    model = keys.raw("camera_model")
    if model is not None and model not in _PINHOLE_MODELS:
        raise DataError(f"{keys.where('camera_model')}: camera model {model!r} is not supported; "
                        f"expected one of {_PINHOLE_MODELS}")
    if keys.raw("is_fisheye"):
        raise DataError(f"{keys.where('is_fisheye')}: fisheye cameras are not supported")
    for key in ("k3", "k4"):
        if keys.num(key):
            raise DataError(f"{keys.where(key)}: only k1, k2, p1, p2 distortion is supported; "
                            f"got {key}={keys.num(key)}")
    image = _resolve_image(path.parent, name)
    if image is None:
        return name, None
    w, h = keys.num("w"), keys.num("h")
    for key, v in (("w", w), ("h", h)):
        if v is not None and (v != int(v) or v <= 0):
            raise DataError(f"{keys.where(key)}: expected a positive whole number of pixels; got {v}")
    iw, ih = image_size(image)  # the header only: existence, a known format, the size
    if (w is not None and int(w) != iw) or (h is not None and int(h) != ih):
        per_frame = "per frame" if "w" in frame or "h" in frame else "top level"
        raise DataError(f"{image}: image is {iw}x{ih} px but {path} says w x h = "
                        f"{int(w) if w is not None else '?'}x{int(h) if h is not None else '?'} ({per_frame}) for "
                        f"frames[{index}] ({name!r})")
    w, h = float(iw), float(ih)
    fx, fy = keys.num("fl_x"), keys.num("fl_y")
    for key in ("camera_angle_x", "camera_angle_y"):
        angle = keys.num(key)
        if angle is not None and not 0.0 < angle < math.pi:
            raise DataError(f"{keys.where(key)}: a field of view of {angle} rad; expected radians in (0, pi)")
    if fx is None:
        angle = keys.num("camera_angle_x")
        if angle is None:
            raise DataError(f"{path}: frames[{index}] ({name!r}): no focal length; expected 'fl_x' or "
                            "'camera_angle_x' (top level or per frame)")
        fx = 0.5 * w / math.tan(0.5 * angle)
    if fy is None:
        angle_y = keys.num("camera_angle_y")
        fy = 0.5 * h / math.tan(0.5 * angle_y) if angle_y is not None else fx
    cx, cy = keys.num("cx"), keys.num("cy")
    cx = 0.5 * w if cx is None else cx
    cy = 0.5 * h if cy is None else cy
    dist = tuple(keys.num(k) or 0.0 for k in ("k1", "k2", "p1", "p2"))
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    try:
        return name, CameraFrame(name=name, image_path=image, camtoworld=tm @ OPENGL_TO_OPENCV, K=K, width=int(w),
                                 height=int(h), distortion=dist if any(dist) else None, split=split)
    except DataError as e:
        raise DataError(f"{path}: frames[{index}]: {e}") from None


def _shared_pixel_keys(top: dict, frame: dict) -> list[str]:
    """The pixel-unit intrinsics a frame takes from the top level (valid for one image size only)."""
    return [k for k in ("fl_x", "fl_y", "cx", "cy") if k in top and k not in frame]


def _check_sizes(path: Path, meta: dict, entries: list[tuple[int, dict, CameraFrame]]) -> None:
    """Frames that share pixel intrinsics from the top level without stating their size must share one size.

    Without `w` / `h` each frame takes its image's real size; then top-level `fl_x` / `fl_y` / `cx` /
    `cy` (pixels of one image size) cannot be right for images of another size: refused, not guessed.
    """
    if "w" in meta and "h" in meta:
        return  # every image was checked against the stated size
    first = None
    for i, entry, f in entries:
        shared = _shared_pixel_keys(meta, entry)
        if not shared or ("w" in entry and "h" in entry):
            continue
        if first is None:
            first = (i, f, shared)
        elif (f.width, f.height) != (first[1].width, first[1].height):
            j, g, keys = first
            raise DataError(f"{path}: frames[{i}] ({f.name!r}) is {f.width}x{f.height} px but frames[{j}] "
                            f"({g.name!r}) is {g.width}x{g.height} px, and both take the top-level "
                            f"{', '.join(sorted(set(keys) | set(shared)))} (pixels of one image size) with no "
                            "'w' / 'h' stated: give each frame its own w, h and intrinsics, or images of one size")


def _nerfstudio_splits(path: Path, meta: dict) -> dict[str, str]:
    out = {}
    for split in _BLENDER_SPLITS:
        names = meta.get(f"{split}_filenames")
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: {split}_filenames: expected a list of file paths")
        out.update({str(Path(n)): split for n in names})
    return out


def _read_ply_points(path: Path, ply: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from perception3d.io.pointcloud import read_ply

    if not ply.is_file():
        raise DataError(f"{path}: ply_file_path {ply} does not exist")
    fields = read_ply(ply)
    xyz = np.stack([fields["x"], fields["y"], fields["z"]], axis=1).astype(np.float32)
    if not all(c in fields for c in ("red", "green", "blue")):
        return xyz, None
    rgb = np.stack([fields["red"], fields["green"], fields["blue"]], axis=1)
    if rgb.dtype != np.uint8:  # float colours in [0, 1]
        rgb = np.clip(np.round(rgb.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return xyz, rgb


def load_transforms(path: str | Path) -> Scene:
    """Load a transforms.json dataset (a .json file, or a folder; see the module docstring).

    Frames whose image is missing are dropped and listed in `Scene.missing_images` (one warning).

    Raises:
        DataError: no transforms file, malformed JSON, missing/NaN `transform_matrix`, no focal
            length, unsupported camera model, unreadable image header, no image at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset path does not exist")
    if path.is_file():
        files = [(path, None)]
    else:
        files = find_transforms_files(path)
        if not files:
            raise DataError(f"{path}: no transforms.json or transforms_{{train,val,test}}.json found")
    root = files[0][0].parent
    frames, missing = [], []
    seen: dict[Path, str] = {}
    points = points_rgb = None
    for file, split in files:
        meta = _read_json(file)
        ns_splits = _nerfstudio_splits(file, meta)
        entries = []
        for i, entry in enumerate(meta["frames"]):
            fsplit = split
            if ns_splits and isinstance(entry, dict) and isinstance(entry.get("file_path"), str):
                fsplit = ns_splits.get(str(Path(entry["file_path"])), split)
            name, frame = _frame(file, meta, entry, i, fsplit)
            if frame is None:
                missing.append(name)
                continue
            if frame.image_path in seen:  # one image twice: double weight, or in both splits (a leak)
                raise DataError(f"{file}: frames[{i}] ({name!r}) names the same image as {seen[frame.image_path]} "
                                f"({frame.image_path}); expected each image once")
            seen[frame.image_path] = f"frames[{i}] of {file.name}" if len(files) > 1 else f"frames[{i}]"
            frames.append(frame)
            entries.append((i, entry, frame))
        _check_sizes(file, meta, entries)
        ply = meta.get("ply_file_path")
        if ply is not None and points is None:
            if not isinstance(ply, str):
                raise DataError(f"{file}: ply_file_path: expected a string; got {ply!r}")
            points, points_rgb = _read_ply_points(file, file.parent / ply)
    source = files[0][0] if len(files) == 1 else root / ("transforms_{" + ",".join(s for _, s in files) + "}.json")
    return finish_scene(source, root, frames, missing, points=points, points_rgb=points_rgb, fmt="transforms")


def write_transforms_json(path: str | Path, frames: Sequence[CameraFrame], image_names: Sequence[str] | None = None,
                          ply_file_path: str | None = None, extra: dict | None = None) -> Path:
    """Write a nerfstudio-style `transforms.json`.

    Intrinsics (`fl_x, fl_y, cx, cy, w, h`, and `k1, k2, p1, p2` with `camera_model` OPENCV when a
    frame has distortion) go to the top level when all frames share them, else into each frame.
    `transform_matrix` is the OpenGL camera -> world matrix; floats are written with full precision.

    Args:
        path: output file.
        frames: the cameras.
        image_names: `file_path` of each frame, relative to the json's folder (default `frame.name`).
        ply_file_path: optional initial point cloud file, relative to the json's folder.
        extra: more top-level keys.

    Returns:
        `path`.
    """
    path = Path(path)
    if image_names is not None and len(image_names) != len(frames):
        raise DataError(f"image_names: expected {len(frames)} names (one per frame); got {len(image_names)}")

    def intrinsics(f: CameraFrame) -> dict:
        d = {"fl_x": float(f.K[0, 0]), "fl_y": float(f.K[1, 1]), "cx": float(f.K[0, 2]), "cy": float(f.K[1, 2]),
             "w": f.width, "h": f.height}
        if f.distortion is not None:
            d.update(camera_model="OPENCV", k1=f.distortion[0], k2=f.distortion[1], p1=f.distortion[2],
                     p2=f.distortion[3])
        return d

    per_frame = [intrinsics(f) for f in frames]
    shared = all(d == per_frame[0] for d in per_frame) if per_frame else False
    meta: dict[str, Any] = {"camera_model": "PINHOLE"}
    if shared:
        meta.update(per_frame[0])
    out_frames = []
    for i, f in enumerate(frames):
        entry: dict[str, Any] = {"file_path": f.name if image_names is None else image_names[i]}
        entry["transform_matrix"] = (f.camtoworld @ OPENGL_TO_OPENCV).tolist()
        if not shared:
            entry.update(per_frame[i])
        out_frames.append(entry)
    if ply_file_path is not None:
        meta["ply_file_path"] = ply_file_path
    meta.update(extra or {})
    meta["frames"] = out_frames
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path
