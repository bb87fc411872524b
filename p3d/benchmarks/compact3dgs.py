"""Benchmark: Compact 3DGS vs our vanilla 3DGS, same scene and schedule.

Trains ``configs/splatting/3dgs_quickstart.yaml`` (vanilla) and
``configs/splatting/compact3dgs_quickstart.yaml`` (the same schedule with the ``compact`` section) on
the synthetic scene (generated under ``data_cache/`` if missing), 2 threads, and reads their
held-out metrics:

* ``psnr_*``: held-out PSNR (compact: rendered from the post-processed file);
* ``mb_vanilla``: the standard 3DGS .ply; ``mb_compact``: the plain Compact 3DGS file (float32,
  uint8 indices: "without post-processing"); ``mb_compact_post``: the post-processed file;
* ``gaussians_*``: Gaussians kept; ``fps_*``: held-out rendering speed (views per second).

``repeats`` is ignored: each training runs once (minutes). ``quick``: 30 steps on a tiny scene.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from perception3d.config import load_config
from splatting import trainer
from splatting.config import SplatConfig

ROOT = Path(__file__).resolve().parents[2]


# a tiny scene and schedule, to check the benchmark end to end in seconds
QUICK = ["data.synthetic.num_views=8", "data.synthetic.width=40", "data.synthetic.height=30",
         "data.synthetic.num_points=300", "train.max_steps=30", "strategy.refine_start_iter=10",
         "strategy.refine_stop_iter=25", "strategy.refine_every=10"]


def _train(name: str, out: Path, overrides: list[str]) -> dict:
    cfg = load_config(ROOT / "configs" / "splatting" / name, SplatConfig,
                      overrides=["train.progress=false", "eval.num_renders=0", *overrides])
    return trainer.train(cfg, out)["metrics"]


def run(repeats: int = 1, quick: bool = False) -> dict:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*QUICK, f"data.root={Path(tmp) / 'scene'}"] if quick else []
        v = _train("3dgs_quickstart.yaml", Path(tmp) / "vanilla", overrides)
        c = _train("compact3dgs_quickstart.yaml", Path(tmp) / "compact", overrides)
    return {
        "psnr_vanilla": round(v["psnr"], 3),
        "psnr_compact": round(c["psnr"], 3),
        "mb_vanilla": round(v["mb_ply"], 4),
        "mb_compact": round(c["mb_cgs_plain"], 4),
        "mb_compact_post": round(c["mb_cgs"], 4),
        "gaussians_vanilla": v["num_gaussians"],
        "gaussians_compact": c["num_gaussians"],
        "fps_vanilla": round(v["fps"], 1),
        "fps_compact": round(c["fps"], 1),
        "ratio_compact": round(v["mb_ply"] / c["mb_cgs_plain"], 1),
        "ratio_compact_post": round(v["mb_ply"] / c["mb_cgs"], 1),
    }
