"""Benchmark: CoherentGS against our vanilla 3DGS on the same 3 views of the synthetic scene.

Trains ``configs/splatting/coherentgs_synthetic.yaml`` and ``configs/splatting/3dgs_sparse_synthetic.yaml``
(vanilla 3DGS with points triangulated from the same 3 views and the same number of steps) on the
40-degree-arc synthetic scene (generated under ``data_cache/`` if missing), 2 threads, and reads
their held-out metrics:

* ``views``: training views; ``psnr_*`` / ``ssim_*``: on the held-out views;
* ``s_train``: CoherentGS's wall time (set-up: flow and plane sweep; stage 1; stage 2), and
  ``s_train_vanilla``; ``gaussians_*``; ``fps_*``: held-out rendering speed;
* the runs stay in ``outputs/bench_coherentgs/{coherentgs,vanilla}`` (reports, renders), and
  ``outputs/bench_coherentgs/depth_side_by_side.png`` shows one row per held-out view: the ground
  truth, then CoherentGS's render and rendered depth, then vanilla's.

``repeats`` is ignored: each training runs once (minutes). ``quick``: a tiny scene and 20 steps,
in a temporary folder.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from perception3d.config import load_config
from splatting import trainer
from splatting.config import SplatConfig

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "bench_coherentgs"
QUICK = ["data.synthetic.num_views=9", "data.synthetic.width=60", "data.synthetic.height=45",
         "data.synthetic.num_points=300", "train.max_steps=20"]
QUICK_COHERENT = ["coherent.align_steps=10"]
QUICK_VANILLA = ["strategy.refine_start_iter=5", "strategy.refine_stop_iter=15", "strategy.refine_every=5"]


def _train(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    cfg = load_config(ROOT / "configs" / "splatting" / name, SplatConfig, overrides=["train.progress=false", *overrides])
    t0 = time.perf_counter()
    result = trainer.train(cfg, out)
    return result, time.perf_counter() - t0


def side_by_side(coherent_run: Path, vanilla_run: Path, out: Path) -> Path | None:
    """One row per held-out view: ground truth | CoherentGS render, depth | vanilla 3DGS render, depth."""
    from PIL import Image

    from perception3d.io.atomic import atomic_path

    step_dirs = [sorted((run / "renders").glob("step_*"))[-1] for run in (coherent_run, vanilla_run)]
    rows = []
    for render in sorted(p for p in step_dirs[0].glob("*.png") if not p.stem.endswith(("_depth", "_error"))):
        parts = []
        for d in step_dirs:
            pair = np.asarray(Image.open(d / render.name).convert("RGB"))  # render | ground truth
            w = pair.shape[1] // 2
            parts.append((pair[:, w:], pair[:, :w], np.asarray(Image.open(d / f"{render.stem}_depth.png").convert("RGB"))))
        gap = np.full((parts[0][0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([parts[0][0], gap, parts[0][1], parts[0][2], gap, parts[1][1], parts[1][2]], 1))
    if not rows:
        return None
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
    return out


def run(repeats: int = 1, quick: bool = False) -> dict:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) if quick else OUT
        overrides = [*QUICK, f"data.root={Path(tmp) / 'scene'}"] if quick else []
        c, s_c = _train("coherentgs_synthetic.yaml", base / "coherentgs", overrides + quick * QUICK_COHERENT)
        v, s_v = _train("3dgs_sparse_synthetic.yaml", base / "vanilla", overrides + quick * QUICK_VANILLA)
        picture = side_by_side(base / "coherentgs", base / "vanilla", base / "depth_side_by_side.png")
    cm, vm = c["metrics"], v["metrics"]
    return {
        "views": c["train_views"],
        "psnr_coherentgs": round(cm["psnr"], 3),
        "psnr_vanilla": round(vm["psnr"], 3),
        "ssim_coherentgs": round(cm["ssim"], 4),
        "ssim_vanilla": round(vm["ssim"], 4),
        "s_train": round(s_c, 1),
        "s_train_vanilla": round(s_v, 1),
        "gaussians_coherentgs": cm["num_gaussians"],
        "gaussians_vanilla": vm["num_gaussians"],
        "fps_coherentgs": round(cm["fps"], 1),
        "fps_vanilla": round(vm["fps"], 1),
        "test_views": cm["views"],
        "picture": None if quick or picture is None else str(picture.relative_to(ROOT)),
    }
