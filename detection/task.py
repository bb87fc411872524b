"""The detection experiment end to end: data -> training -> evaluation -> metrics and pictures.

Entry points used by `p3d train` and `p3d eval` (through `p3d/tasks.py`):
`train(cfg, out_dir, resume)` and `evaluate(cfg, ckpt, out_dir)`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from detection.config import DataConfig, DetectionConfig
from detection.data import DetectionDataset, frame_targets
from detection.evaluation import Evaluation, evaluate_detections, write_missed
from detection.models.detector import CenterPointDetector
from detection.predictions import read_predictions, write_predictions
from detection.quant import is_quantized_file, load_quantized, read_quantized_config
from detection.structures import CLASSES, collate
from detection.viz import draw_bev, draw_camera, save_figure
from perception3d.config import config_differences, config_to_dict
from perception3d.engine import distributed, fit, load_checkpoint, read_checkpoint, seed_everything
from perception3d.errors import ConfigError, DataError
from perception3d.io.atomic import atomic_write_text
from perception3d.io.kitti import KittiDataset, KittiLabels, read_image
from perception3d.structures import Detections3D

__all__ = ["prepare_data", "train", "evaluate", "evaluate_model"]

log = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig, training: bool = True) -> Path:
    """Return the dataset root, generating the synthetic dataset first if it is configured and absent.

    A root holding `ImageSets/` without a generator record (a real dataset) is used as it is. A
    generated root records its settings (`synthetic.json`); when they differ from
    `data.synthetic`, a ConfigError names each one (set `data.synthetic: null` to use the folder
    as it is). Generation writes into a temporary folder renamed into place at the end
    (`write_kitti_dataset`), so an interrupted run never leaves a half-written dataset behind.

    Args:
        cfg: the data config.
        training: the caller trains (the train split must not be empty), else only evaluates.

    Raises:
        ConfigError: all before anything is written: no dataset at `data.root` and no
            `data.synthetic`, a folder there that is no dataset, a generated dataset with other
            settings, or settings that leave a needed split empty.
    """
    from perception3d.synthetic.dataset import (dataset_settings, read_settings_record, settings_differences,
                                                write_kitti_dataset)

    root = Path(cfg.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.root={root}: is a file; expected a KITTI-layout folder (training/, ImageSets/)")
    record = read_settings_record(root) if root.is_dir() else None
    has_dataset = (root / "ImageSets").is_dir()
    syn = cfg.synthetic
    if has_dataset and (record is None or syn is None):
        return root  # a real dataset, or a generated one used as it is
    if syn is None:
        raise ConfigError(f"data.root={root}: no KITTI-layout dataset there (ImageSets/ missing) "
                          "and data.synthetic is null, so none is generated")
    wanted = dataset_settings(syn.frames, syn.seed, val_fraction=syn.val_fraction)
    if record is not None:
        diff = settings_differences(record, wanted)
        if diff:
            names = {"frames": "data.synthetic.frames", "seed": "data.synthetic.seed",
                     "val_fraction": "data.synthetic.val_fraction"}
            what = "; ".join(f"{names.get(k, k)}={b!r} but the folder has {a!r}" for k, a, b in diff)
            raise ConfigError(f"data.root={root}: holds a synthetic dataset generated with other settings "
                              f"({root / 'synthetic.json'}): {what}. Point data.root at another folder, set "
                              "data.synthetic to the recorded settings, or set data.synthetic: null to use the "
                              "folder as it is")
    _check_synthetic_splits(cfg, training)
    if record is None:
        if root.is_dir() and any(root.iterdir()):
            raise ConfigError(f"data.root={root}: the folder exists but holds no KITTI-layout dataset (no "
                              "ImageSets/), so data.synthetic cannot generate one there; remove it or point "
                              "data.root elsewhere")
        print(f"[data] generating {syn.frames} synthetic KITTI-layout frames (seed {syn.seed}) into {root}")
        try:
            write_kitti_dataset(root, num_frames=syn.frames, seed=syn.seed, val_fraction=syn.val_fraction,
                                workers=syn.workers, progress=True)
        except OSError as e:  # a read-only or full disk, a parent that is a file
            raise ConfigError(f"data.root={root}: cannot generate the synthetic dataset there "
                              f"({e.strerror or e}: {e.filename or root})") from None
    return root


def _check_synthetic_splits(cfg: DataConfig, training: bool) -> None:
    """The splits `data.synthetic` generates must hold what the run reads (before generating)."""
    from perception3d.synthetic.dataset import split_sizes

    syn = cfg.synthetic
    sizes = dict(zip(("train", "val"), split_sizes(syn.frames, syn.val_fraction)))
    needed = [("train_split", cfg.train_split)] if training else []
    needed.append(("val_split", cfg.val_split))
    for field_name, split in needed:
        if split not in sizes:
            raise ConfigError(f"data.{field_name}={split!r}: the synthetic generator (data.synthetic) writes the "
                              "splits 'train' and 'val' only")
        if sizes[split] == 0:
            settings = f"data.synthetic.val_fraction={syn.val_fraction} with data.synthetic.frames={syn.frames}"
            if field_name == "train_split":
                raise ConfigError(f"{settings} leaves no training frames (ImageSets/train.txt would be empty): "
                                  "training needs a non-empty train split; val_fraction 1.0 is meant for a "
                                  "held-out test set evaluated with tools/eval.py")
            raise ConfigError(f"{settings} leaves the '{split}' split (data.{field_name}) empty: "
                              f"round({syn.frames} x {syn.val_fraction}) = {sizes['val']} frames are held out and "
                              f"{sizes['train']} trained on; it needs at least one frame")


@torch.no_grad()
def predict(model, dataset: DetectionDataset, batch_size: int = 2, desc: str = "predict") -> list[Detections3D]:
    """Run the detector over a dataset; one `Detections3D` per frame, in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Detections3D] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
        out.extend(Detections3D(d.boxes.to("cpu"), d.scores.cpu(), d.labels.cpu()) for d in model(batch))
    return out


def evaluate_model(model, dataset: DetectionDataset, distance_bins_m=(0.0, 20.0, 40.0, 70.4),
                   baseline: Sequence[KittiLabels] | None = None) -> tuple[Evaluation, list[Detections3D]]:
    """Run the detector on `dataset` and evaluate it (`detection.evaluation.evaluate_detections`:
    the official KITTI and nuScenes numbers and our `diag/` diagnostics); `baseline`: another
    model's result files of the same frames (`read_predictions`) for the paired difference.

    Returns `(evaluation, detections)`."""
    dets = predict(model, dataset, desc="eval")
    return evaluate_detections(dataset.kitti, dets, dataset.classes, distance_bins_m, baseline), dets


def _draw_frame(path: Path, points, frame, gt_boxes, det: Detections3D, pc_range, title: str,
                min_score: float) -> None:
    fig = plt.figure(figsize=(13, 6.5))
    ax_bev = fig.add_axes([0.0, 0.0, 0.38, 1.0])
    ax_cam = fig.add_axes([0.40, 0.25, 0.60, 0.5])
    keep = (det.scores >= min_score).numpy()
    boxes, scores = det.boxes.tensor.numpy()[keep], det.scores.numpy()[keep]
    draw_bev(ax_bev, points, gt_boxes, boxes, scores, pc_range, title=f"{title}: BEV (scores >= {min_score:g})")
    if frame.image is not None:
        draw_camera(ax_cam, frame.image, frame.calib, gt_boxes, boxes, title="camera (green GT, red predicted)")
    else:
        ax_cam.axis("off")
    save_figure(fig, path)


def _pictures(model, cfg: DetectionConfig, val_set: DetectionDataset, dets, out_dir: Path,
              real_ds: KittiDataset | None = None) -> list[str]:
    pic_dir = out_dir / "pictures"
    written = []
    for i in range(min(cfg.eval.num_pictures, len(val_set))):
        fid = val_set.kitti.ids[i]
        has_image = val_set.kitti.path("image_2", fid).is_file()  # LiDAR-only data: BEV only
        frame = KittiDataset(val_set.kitti.root, ids=[fid], load_image=has_image)[0]
        gt_boxes, _, _ = frame_targets(frame, val_set.classes)
        path = pic_dir / f"val_{frame.frame_id}.png"
        _draw_frame(path, frame.points_lidar, frame, gt_boxes, dets[i], val_set.pc_range, f"synthetic {frame.frame_id}",
                    cfg.eval.picture_score)
        written.append(str(path))
    if real_ds is not None:
        device = next(model.parameters()).device
        model.eval()
        for j in range(len(real_ds)):
            frame = real_ds[j]
            gt_boxes, gt_labels, _ = frame_targets(frame, CLASSES)
            r = val_set.pc_range
            pts = frame.points_lidar
            pts = pts[(pts[:, 0] >= r[0]) & (pts[:, 0] < r[3]) & (pts[:, 1] >= r[1]) & (pts[:, 1] < r[4])
                      & (pts[:, 2] >= r[2]) & (pts[:, 2] < r[5])]
            from detection.data import DetectionSample

            batch = collate([DetectionSample(pts, gt_boxes, gt_labels, str(frame.frame_id))]).to(device)
            with torch.no_grad():
                det = model(batch)[0]
            det = Detections3D(det.boxes.to("cpu"), det.scores.cpu(), det.labels.cpu())
            path = pic_dir / f"real_kitti_{frame.frame_id}.png"
            _draw_frame(path, frame.points_lidar, frame, gt_boxes, det, r, f"real KITTI {frame.frame_id}",
                        cfg.eval.picture_score)
            written.append(str(path))
    return written


_REAL_PICTURES = 2  # frames of eval.real_kitti_root drawn after evaluation


def _check_before_work(cfg: DetectionConfig, val_set: DetectionDataset):
    """Read or check, before any training or evaluation, what the end of the run reads: the
    images drawn, `eval.real_kitti_root`'s frames and `eval.baseline`'s detections, so that a
    bad file fails now and not after an hour of training. Returns `(baseline, real_ds)`."""
    kitti = val_set.kitti
    for i in range(min(cfg.eval.num_pictures, len(val_set))):
        p = kitti.path("image_2", kitti.ids[i])
        if p.is_file():
            read_image(p)  # decoded in full: the picture needs every pixel
    real_ds = None
    real = cfg.eval.real_kitti_root
    if real and (Path(real) / "training" / "velodyne").is_dir():
        try:
            listed = KittiDataset(real, split="training", load_image=False)
            ids = listed.ids[:_REAL_PICTURES]
            real_ds = KittiDataset(real, split="training", ids=ids, load_image=True) if ids else None
            if real_ds is not None:
                real_ds.source = listed.source
                real_ds.check(images="required")
                for fid in ids:
                    read_image(real_ds.path("image_2", fid))
        except DataError as e:
            raise DataError(f"eval.real_kitti_root={real}: {e}") from None
    baseline = None
    if cfg.eval.baseline is not None:
        try:
            baseline = read_predictions(kitti, cfg.eval.baseline, val_set.classes)
        except DataError as e:
            raise DataError(f"eval.baseline={cfg.eval.baseline}: {e}") from None
    return baseline, real_ds


def _summary(metrics: dict) -> str:
    keys = [k for k in metrics if (not k.startswith(("diag/", "nuscenes/")) and "/3d_R40/" in k)
            or k.endswith(("/bev_R40/moderate", "/bbox_R40/moderate", "/3d_recall/moderate"))
            or ("/3d_R40_minus_baseline/" in k and k.endswith("moderate"))] + ["nuscenes/mAP", "nuscenes/NDS"]
    intervals = {k: "diag/" + k.replace("/3d_R40/", "/3d_R40_interval95/") for k in keys
                 if k.endswith("/3d_R40/moderate") and not k.startswith("mAP/")}
    intervals.update({k: k for k in keys if "_minus_baseline/" in k})

    def line(k):
        v = metrics[k]
        if v != v:
            return f"  {k:44s}    n/a"
        lo, hi = metrics.get(intervals.get(k, "") + "_low"), metrics.get(intervals.get(k, "") + "_high")
        extra = f"  (95% interval over frames {lo:.2f} to {hi:.2f})" if lo is not None and lo == lo else ""
        return f"  {k:44s} {v:6.2f}{extra}"

    return "\n".join(line(k) for k in keys if k in metrics)


def _finish(model, cfg: DetectionConfig, val_set, out_dir: Path, extra: dict, baseline, real_ds,
            evaluated=None) -> dict:
    ev, dets = evaluated or evaluate_model(model, val_set, cfg.eval.distance_bins_m, baseline)
    metrics = ev.metrics
    write_predictions(val_set.kitti, ev.labels, out_dir / "predictions")
    num_missed = write_missed(val_set.kitti, ev, out_dir / "missed.csv")
    pictures = _pictures(model, cfg, val_set, dets, out_dir, real_ds)
    # undefined numbers (NaN, e.g. a nuScenes error without a match) become null in JSON
    clean = {k: (None if v != v else v) for k, v in metrics.items()}
    kitti = val_set.kitti  # where the frames of predictions/ are (`p3d view` reads it)
    result = {"metrics": clean, "pictures": pictures, "val_frames": len(val_set),
              "data": {"root": str(kitti.root.resolve()), "split": kitti.split}, **extra}
    if cfg.eval.baseline is not None:
        result["baseline"] = str(cfg.eval.baseline)  # what the `..._minus_baseline` metrics are against
    result["report"] = str(out_dir / "report.html")
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    from detection.report import write_report

    write_report(out_dir, result, ev, f"{cfg.model.backbone} detector: {out_dir.name}")
    print(f"[eval] {len(val_set)} held-out frames; AP (%), the official KITTI evaluation (R40; diag/: our "
          f"diagnostics) and nuScenes':\n{_summary(metrics)}")
    print(f"[eval] {num_missed} valid moderate objects no detection found at the 3D overlap threshold: "
          f"{out_dir / 'missed.csv'}")
    print(f"[eval] metrics: {out_dir / 'metrics.json'}; report: {out_dir / 'report.html'}; "
          f"pictures: {', '.join(pictures)}")
    return result


def train(cfg: DetectionConfig, out_dir: str | Path, resume: bool = False,
          on_start: Callable[[], None] | None = None) -> dict:
    """Train the detector described by `cfg`, evaluate it on the held-out split, write metrics and
    pictures. `on_start` is called once training is set up (see `perception3d.engine.fit`)."""
    out_dir = Path(out_dir)
    root = prepare_data(cfg.data, training=True)
    train_set = DetectionDataset(root, cfg.data.train_split, cfg.model.pc_range_m, cfg.data.augment)
    val_set = DetectionDataset(root, cfg.data.val_split, cfg.model.pc_range_m, None)
    baseline, real_ds = _check_before_work(cfg, val_set)
    seed_everything(cfg.train.seed)
    model = CenterPointDetector(cfg.model)

    last = {}  # the latest full evaluation, reused for the final metrics and pictures

    def evaluate_fn(m, step):
        last["step"], last["result"] = step, evaluate_model(m, val_set, cfg.eval.distance_bins_m, baseline)
        return {k: v for k, v in last["result"][0].metrics.items()
                if (k.endswith("/moderate") and "_R11/" not in k) or k in ("nuscenes/mAP", "nuscenes/NDS")}

    stats = fit(model, train_set, collate, cfg.train, out_dir, evaluate_fn=evaluate_fn, resume=resume,
                run_config=config_to_dict(cfg), on_start=on_start)
    if not distributed.is_main_process():
        return {"train": stats}
    evaluated = last["result"] if last.get("step") == stats["step"] else None
    return _finish(model, cfg, val_set, out_dir, {"train": stats}, baseline, real_ds, evaluated)


# model settings that only decide which boxes are output, not the weights: a user may change them
INFERENCE_SETTINGS = ("model.max_voxels_test", "model.head.score_threshold", "model.head.nms_iou",
                      "model.head.nms_pre_max", "model.head.max_detections", "model.head.top_k")


def load_weights(ckpt: str | Path, model: CenterPointDetector, cfg: DetectionConfig) -> dict:
    """Load a checkpoint or shipped weights (`.safetensors`) into `model`, after checking that the
    model config they were trained with (stored in them) is `cfg.model`, inference settings
    (`INFERENCE_SETTINGS`) apart.

    Raises:
        DataError: naming the file and every model setting that differs, before loading.
    """
    state = read_checkpoint(ckpt)
    _check_model_config(ckpt, state.get("config") or {}, cfg)
    return load_checkpoint(ckpt, model)


def _check_model_config(ckpt, config: dict, cfg: DetectionConfig) -> None:
    saved = config.get("model")
    if saved is not None:
        diff = [d for d in config_differences({"model": saved}, {"model": config_to_dict(cfg)["model"]})
                if not d.startswith(INFERENCE_SETTINGS)]
        if diff:
            raise DataError(f"{ckpt}: these weights were trained with another model config (setting: as "
                            "trained -> as configured): " + "; ".join(diff[:12])
                            + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
                            + ". Evaluate them with the config they were trained with")


def _int8_dense_runtime(model: CenterPointDetector) -> str:
    """Run a quantized model's dense part (BEV backbone + head) on onnxruntime's INT8 kernels when
    onnxruntime is installed (the `deploy` / `test` extras); else it stays simulated INT8."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "simulated INT8 (onnxruntime is not installed)"
    from detection.quant import OrtDense

    model.dense = OrtDense(model)
    return "onnxruntime INT8"


def evaluate(cfg: DetectionConfig, ckpt: str | Path, out_dir: str | Path) -> dict:
    """Evaluate a checkpoint on the held-out split; metrics and pictures go to `out_dir`."""
    out_dir = Path(out_dir)
    root = prepare_data(cfg.data, training=False)
    val_set = DetectionDataset(root, cfg.data.val_split, cfg.model.pc_range_m, None)
    baseline, real_ds = _check_before_work(cfg, val_set)
    model = CenterPointDetector(cfg.model)
    extra = {"checkpoint": str(ckpt)}
    if is_quantized_file(ckpt):  # an INT8 model of `p3d quantize` (detection/quant.py)
        _check_model_config(ckpt, read_quantized_config(ckpt), cfg)
        extra["quantization"] = load_quantized(ckpt, model)["info"]
        extra["quantization"]["dense_runtime"] = _int8_dense_runtime(model)
    else:
        load_weights(ckpt, model, cfg)
    return _finish(model, cfg, val_set, out_dir, extra, baseline, real_ds)
