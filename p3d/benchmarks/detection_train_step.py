"""Benchmark: one whole detector training step, fp32 against bf16 autocast (`train.precision`).

* Models: the zoo's DSVT (``configs/detection/dsvt_pillar.yaml``: 0.2 m pillars, a 0.4 m BEV
  stage), SECOND (``second.yaml``) and PointPillars (``pointpillars.yaml``), initial weights,
  train mode, 2 threads.
* Input: a batch of 4 synthetic KITTI-layout frames (``perception3d.synthetic.generate_frame``
  seeds 0-3, the configs' batch size) with their boxes, cut to the point-cloud range, without
  augmentation.
* A step: forward (under ``torch.autocast(bfloat16)`` for bf16, as ``perception3d.engine.fit``
  runs it), loss, backward, AdamW step. ``ms_*``: medians of ``repeats`` steps after 2 warm-ups,
  all on that one batch.
* ``ms_*_bf16_new_batches``: the bf16 step as training meets it, each step on another batch
  (frames 4-7, 8-11, ...; the warm-ups too): every batch has its own number of voxels, so oneDNN
  builds kernels for new shapes instead of reusing cached ones.
* ``cpu_amx_bf16``: whether the CPU reports AMX bf16 units (Linux ``/proc/cpuinfo``); bf16 is
  fast only with them (or on a GPU).
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from detection.config import DetectionConfig
from detection.data import DetectionSample, frame_targets
from detection.models.detector import CenterPointDetector
from detection.structures import DetectionBatch, collate
from perception3d.config import load_config
from perception3d.engine.numerics import denormals_flushed
from perception3d.synthetic import generate_frame

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
CONFIGS = {"dsvt": "dsvt_pillar.yaml", "second": "second.yaml", "pointpillars": "pointpillars.yaml"}


_frame = functools.lru_cache(maxsize=None)(generate_frame)  # both models see the same frames


def _batch(pc_range, first_seed: int = 0, size: int = 4) -> DetectionBatch:
    samples = []
    for seed in range(first_seed, first_seed + size):
        frame = _frame(seed)
        pts = np.asarray(frame.points_lidar, np.float32)
        boxes, labels, _ = frame_targets(frame)
        r = pc_range
        inside = lambda p: (p[:, 0] >= r[0]) & (p[:, 0] < r[3]) & (p[:, 1] >= r[1]) & (p[:, 1] < r[4])  # noqa: E731
        pts = pts[inside(pts) & (pts[:, 2] >= r[2]) & (pts[:, 2] < r[5])]
        keep = inside(boxes)
        samples.append(DetectionSample(pts, boxes[keep], labels[keep], str(seed)))
    return collate(samples)


def _step_ms(model, opt, batches: list[DetectionBatch], bf16: bool, repeats: int) -> float:
    """Median of `repeats` steps after 2 warm-ups; step i runs on `batches[i % len(batches)]`."""
    times = []
    for i in range(repeats + 2):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        with denormals_flushed(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as engine.fit
            loss = model(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 1)


def run(repeats: int = 5, quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    size = 1 if quick else 4
    try:
        amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    result: dict = {}
    for name, config in CONFIGS.items():
        cfg = load_config(ROOT / "configs" / "detection" / config, DetectionConfig)
        batch = _batch(cfg.model.pc_range_m, 0, size)
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = CenterPointDetector(cfg.model).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            result[f"ms_{name}_{precision}"] = _step_ms(model, opt, [batch], precision == "bf16", repeats)
        new_batches = [_batch(cfg.model.pc_range_m, size * (i + 1), size) for i in range(repeats + 2)]
        result[f"ms_{name}_bf16_new_batches"] = _step_ms(model, opt, new_batches, True, repeats)
        with torch.no_grad():
            result[f"voxels_{name}"] = model.voxelize(batch).num_voxels
    for name in CONFIGS:
        result[f"speedup_{name}_bf16"] = round(result[f"ms_{name}_fp32"] / result[f"ms_{name}_bf16"], 2)
    result.update(batch_size=size, threads=THREADS, cpu_amx_bf16=amx)
    return result
