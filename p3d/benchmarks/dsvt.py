"""Benchmark: DSVT backbone forward vs the spconv baseline, onnxruntime vs torch, the Waymo preset.

* Input: one synthetic KITTI-layout frame (``perception3d.synthetic.generate_frame(0)``), cut to
  the range of ``configs/detection/dsvt_pillar.yaml`` and voxelized as each model does it:
  0.2 m pillars (dynamic voxels, pillar VFE) for DSVT, 0.1 m hard voxels (mean VFE) for the
  baseline of ``configs/detection/second.yaml``. Models with their initial weights
  (the timing does not depend on the values), eval mode, no grad, batch 1, 2 threads.
* ``ms_dsvt``: the DSVT backbone's plan (set partitions) + run, sparse features out.
  ``ms_spconv_baseline``: the SECOND backbone's sparse convs, sparse features out. The VFE and the
  scatter to the dense BEV map are excluded from both.
* ``ms_dsvt_onnxruntime``: the same plan in torch + the exported graph in onnxruntime (CPU, 2
  intra-op threads); ``onnx_max_abs_err``: max |onnxruntime - torch| of its output.
* ``ms_waymo_pillar_10k`` / ``_20k``: the paper's Waymo pillar backbone (grid 468x468x1, window
  12x12 with hybrid shift to 24x24, set size 36, 4 blocks, d=192, 8 heads, FFN 384; plan + input
  layer + blocks, no VFE or head) on 10,000 and 20,000 pillars drawn uniformly without
  duplicates, features N(0, 1).
Medians of ``repeats`` runs after 2 warm-ups.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detection.config import DetectionConfig
from detection.models.detector import CenterPointDetector
from detection.models.dsvt import DSVTBackbone, DSVTOptions, export_onnx
from detection.structures import collate
from perception3d.config import load_config
from perception3d.synthetic import generate_frame

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 1)


def _model(config: str) -> CenterPointDetector:
    cfg = load_config(ROOT / "configs" / "detection" / config, DetectionConfig)
    return CenterPointDetector(cfg.model).eval()


def _waymo_ms(num_pillars: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(num_pillars)
    net = DSVTBackbone(192, (1, 468, 468), DSVTOptions()).eval()
    lin = torch.randperm(468 * 468, generator=g)[:num_pillars]
    coords = torch.stack([lin * 0, lin * 0, lin // 468, lin % 468], 1).int()
    feats = torch.randn(num_pillars, 192, generator=g)
    return _median_ms(lambda: net.run(feats, net.plan(coords)[0]), repeats)


@torch.no_grad()
def run(repeats: int = 5, quick: bool = False) -> dict:
    import onnxruntime as ort

    waymo = (1_000, 2_000) if quick else (10_000, 20_000)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    dsvt, second = _model("dsvt_pillar.yaml"), _model("second.yaml")
    r = dsvt.cfg.pc_range_m
    pts = torch.from_numpy(np.asarray(generate_frame(0).points_lidar, np.float32))
    pts = pts[(pts[:, 0] >= r[0]) & (pts[:, 0] < r[3]) & (pts[:, 1] >= r[1]) & (pts[:, 1] < r[4])
              & (pts[:, 2] >= r[2]) & (pts[:, 2] < r[5])]
    batch = collate([{"points": pts, "gt_boxes": torch.zeros(0, 7), "gt_labels": torch.zeros(0, dtype=torch.long),
                      "frame_id": "0"}])
    pillars, voxels = dsvt.voxelize(batch), second.voxelize(batch)
    net = dsvt.backbone3d
    ms_dsvt = _median_ms(lambda: net.run(pillars.feats, net.plan(pillars.coords)[0]), repeats)
    ms_second = _median_ms(lambda: second.backbone3d.forward_sparse(voxels), repeats)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dsvt.onnx"
        names = export_onnx(net, pillars.feats, pillars.coords, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def onnx_forward():
        plan, _ = net.plan(pillars.coords)
        return sess.run(None, {n: t.numpy() for n, t in zip(names, (pillars.feats, *plan))})[0]

    ms_ort = _median_ms(onnx_forward, repeats)
    err = float(np.abs(onnx_forward() - net.run(pillars.feats, net.plan(pillars.coords)[0]).numpy()).max())
    return {
        "voxels": pillars.num_voxels,
        "voxels_spconv_baseline": voxels.num_voxels,
        "ms_dsvt": ms_dsvt,
        "ms_spconv_baseline": ms_second,
        "ms_dsvt_onnxruntime": ms_ort,
        "onnx_max_abs_err": err,
        "waymo_pillars": list(waymo),
        "ms_waymo_pillar_10k": _waymo_ms(waymo[0], repeats),
        "ms_waymo_pillar_20k": _waymo_ms(waymo[1], repeats),
        "threads": THREADS,
    }
