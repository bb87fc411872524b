"""Benchmark: LiDAR-PTQ (INT8 post-training quantization, detection/quant.py) of the shipped
PointPillars and SECOND: accuracy of each calibration, the ablation, the QAT baseline and the INT8
speed.

* Weights: ``weights/{pointpillars,second}.safetensors`` with their zoo configs.
* PTQ: 16 calibration frames of the zoo data's training split, ``quantize_model`` (``p3d
  quantize``); ``ptq_seconds`` is LiDAR-PTQ's (sparsity-based calibration, then 64 steps of
  adaptive rounding with the TGPL) on 2 threads. Quick: a 6-frame synthetic set, 2 calibration
  frames, 2 steps.
* ``ap_*``: Car 3D AP@0.7 (R40, moderate, official KITTI metric) on the zoo data's 160 held-out
  frames (quick: 4): ``ap_fp32`` the float model; ``ap_int8`` LiDAR-PTQ; ``ap_int8_minmax`` /
  ``ap_int8_entropy`` the calibration baselines; ``ap_int8_qat`` the quantization-aware
  fine-tune (``qat_steps`` steps of the config's batch size on the training split, from the
  ``sparse`` calibration; ``qat_seconds`` its time, calibration included). All INT8 models run
  their dense part on onnxruntime's INT8 kernels and the rest (pillar encoder / sparse 3D backbone)
  simulated INT8.
* ``ablation``: LiDAR-PTQ's components added one at a time, each row's Car AP: max-min;
  the non-zero values' max-min (sparsity-based ranges); + the clipping search counting every
  value; + the search weighted to the objects (``sparse``); + adaptive rounding on the
  reconstruction alone; + the TGPL (``lidar-ptq``).
* ``ms_dense_*``: the dense part (BEV backbone + head) on one frame's BEV map: FP32 as the
  detector runs it (torch, channels-last), INT8 on onnxruntime; medians of ``repeats`` calls of
  each, FP32 and INT8 alternating, after a warm-up, 2 threads. ``ms_frame_*``: the whole forward pass of one frame (voxelization to the head's
  maps, no decoding), FP32 against the INT8 model.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from detection.config import DetectionConfig
from detection.data import DetectionDataset
from detection.evaluation import evaluate_detections
from detection.models.detector import CenterPointDetector
from detection.quant import OrtDense, calibrate, prepare, quantize_model
from detection.structures import collate
from detection.task import load_weights, predict, prepare_data
from perception3d.config import load_config

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
MODELS = ("pointpillars", "second")


def _car_ap(model, dataset) -> float:
    dets = predict(model, dataset, desc="bench eval")
    return float(evaluate_detections(dataset.kitti, dets, dataset.classes).metrics["Car/3d_R40/moderate"])


def _paired_ms(fa, fb, repeats: int) -> tuple[float, float]:
    """Medians (ms) of `fa` and `fb`, called alternately after a warm-up of each: the machine's
    drift (up to 30 % between runs here) hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ta), 1000 * statistics.median(tb)


def _maps(model, batch):
    sv = model.voxelize(batch)
    bev, _ = model.backbone3d(sv)
    return model.dense(bev) if model.dense is not None else \
        model.head(model.bev_backbone(bev.contiguous(memory_format=torch.channels_last)))


class _Subset:
    """The first `n` frames of a DetectionDataset (what `predict` and the evaluation read)."""

    def __init__(self, ds: DetectionDataset, n: int):
        self.ds, self.n = ds, min(n, len(ds))
        self.kitti = copy.copy(ds.kitti)
        self.kitti.ids = ds.kitti.ids[:self.n]
        self.classes = ds.classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


ABLATION = (  # (row, calibrate's method and options)
    ("max-min", "minmax", {}),
    ("non-zero max-min", "sparse", {"search": "none"}),
    ("+ clipping search", "sparse", {"search": "plain"}),
    ("+ weighted to objects", "sparse", {}),
    ("+ adaptive rounding", "lidar-ptq", {"tgpl_weight": 0.0}),
    ("+ TGPL (LiDAR-PTQ)", "lidar-ptq", {}),
)


def run(repeats: int = 5, quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    results = []
    for name in MODELS:
        # quick: a 6-frame set of the same generator instead of the zoo's 800 frames (8 min to generate)
        tiny = [f"data.root={ROOT / 'data_cache' / 'bench_ptq_quick'}", "data.synthetic.frames=6",
                "data.synthetic.val_fraction=0.5"] if quick else []
        cfg = load_config(ROOT / "configs" / "detection" / f"{name}.yaml", DetectionConfig, overrides=tiny)
        root = prepare_data(cfg.data, training=True)
        train = DetectionDataset(root, cfg.data.train_split, cfg.model.pc_range_m, None)
        val = _Subset(DetectionDataset(root, cfg.data.val_split, cfg.model.pc_range_m, None), 4 if quick else 160)
        calib_n, steps = (2, 2) if quick else (16, None)
        calib = [collate([train[int(i)]]) for i in np.linspace(0, len(train) - 1, calib_n).round().astype(int)]
        fp32 = CenterPointDetector(cfg.model)
        load_weights(ROOT / "weights" / f"{name}.safetensors", fp32, cfg)
        fp32.eval()
        row = {"model": name, "frames": len(val), "calib_frames": calib_n}
        with torch.no_grad():
            row["ap_fp32"] = _car_ap(fp32, val)

        def int8_ap(q) -> float:
            q.dense = OrtDense(q, THREADS)
            with torch.no_grad():
                return _car_ap(q, val)

        models = {}
        for method in ("lidar-ptq", "minmax", "entropy", "qat"):
            q = copy.deepcopy(fp32)
            data = DetectionDataset(root, cfg.data.train_split, cfg.model.pc_range_m, cfg.data.augment) \
                if method == "qat" else train
            info = quantize_model(q, data, method, calib_n, steps, cfg.train.batch_size, cfg.train.seed)["info"]
            key = {"lidar-ptq": "ap_int8", "qat": "ap_int8_qat"}.get(method, f"ap_int8_{method}")
            row[key] = int8_ap(q)
            models[method] = q
            if method == "lidar-ptq":
                row["ptq_seconds"] = info["seconds"]
            if method == "qat":
                row["qat_seconds"], row["qat_steps"] = info["seconds"], info["qat"]["steps"]
        row["ablation"] = []
        for label, method, options in ABLATION:
            if label == "max-min":
                ap = row["ap_int8_minmax"]
            elif method == "lidar-ptq" and not options:
                ap = row["ap_int8"]
            else:
                q = prepare(copy.deepcopy(fp32))
                calibrate(q, calib, method, rounding_iters=2 if quick else 64, **options)
                ap = int8_ap(q)
            row["ablation"].append({"row": label, "ap": ap})
        with torch.no_grad():
            batch = collate([val[0]])
            bev = fp32.backbone3d(fp32.voxelize(batch))[0]
            q = models["lidar-ptq"]
            row["ms_dense_fp32"], row["ms_dense_int8"] = _paired_ms(
                lambda: fp32.head(fp32.bev_backbone(bev.contiguous(memory_format=torch.channels_last))),
                lambda: q.dense(bev), repeats)
            row["ms_frame_fp32"], row["ms_frame_int8"] = _paired_ms(lambda: _maps(fp32, batch), lambda: _maps(q, batch),
                                                                    repeats)
        row["dense_speedup"] = row["ms_dense_fp32"] / row["ms_dense_int8"]
        results.append(row)
    return {"threads": THREADS, "results": results}
