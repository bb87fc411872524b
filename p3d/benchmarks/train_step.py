"""Benchmark: one whole 3DGS training iteration on CPU at OpenSplat's measured size.

The size of the issue's peer measurement: 100,000 Gaussians, fox at 1/4 resolution (266x475 after
the undistortion crop; the peer's 269x479). The run is set up as ``tools/train.py --config
configs/splatting/3dgs_fox.yaml`` does, except for its Gaussians, at SH degree 3:

* ``ms_train_step``: 100k random Gaussians (the peer's count; the config triangulates about 25k
  points), faint and small, as a fresh run starts; needs no trained model.
* ``ms_train_step_trained``: 100k Gaussians drawn (seeded) from the trained fox model in
  ``outputs/3dgs_fox/ckpt/latest.pt``, the Gaussians of a real run that have grown onto the
  surfaces; ``null`` until that run has been trained.

The training images are decoded into the dataset's cache (as after the first epoch), then
``splatting.trainer.train_step`` is timed: render (projection, SH, binning, compositing), L1 +
D-SSIM loss, backward, six Adam steps, the position schedule and the densification bookkeeping.
Densification itself (every 100 steps from step 500) is outside the timed window;
``sh_degree_interval`` is set to 1 so that the timed steps (after 4 warm-up steps) use the most
expensive colour model, SH degree 3.

Without ``../shared/data/fox`` the synthetic multi-view scene is used at the same 270x480 size.
Reports the median steps and the breakdown of the rasterizer's forward and backward (projection,
SH and the C++ kernels, on the random Gaussians and the first training view) to compare with
OpenSplat's 0.62 s + 0.43 s.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from perception3d.config import load_config
from perception3d.engine.checkpoint import read_checkpoint
from splatting.config import SplatConfig
from splatting.gaussians import render_raw
from splatting.trainer import _optimizers, _scheduler, build, train_step

ROOT = Path(__file__).resolve().parents[2]
FOX = ROOT.parent / "shared" / "data" / "fox"
TRAINED = ROOT / "outputs" / "3dgs_fox" / "ckpt" / "latest.pt"  # written by the fox config's run
# both workloads: SH degree 3 from the start, no densification in the timed window
TIMING = ["model.sh_degree_interval=1", "strategy.refine_start_iter=100000", "train.progress=false"]


def _time_steps(cfg: SplatConfig, ts, repeats: int, warmup: int = 4) -> list[float]:
    for i in range(len(ts.train_set)):  # decode every image once: the steady state after the first epoch
        ts.train_set[i]
    for step in range(warmup):
        train_step(cfg, ts, step)
    times = []
    for step in range(warmup, warmup + repeats):
        t0 = time.perf_counter()
        train_step(cfg, ts, step)
        times.append(time.perf_counter() - t0)
    return times


def _trained_step_ms(repeats: int) -> float | None:
    """The median step on 100k Gaussians drawn (seeded) from a trained fox run's checkpoint, or None
    without one."""
    if not (FOX.exists() and TRAINED.exists()):
        return None
    cfg = load_config(ROOT / "configs" / "splatting" / "3dgs_fox.yaml", SplatConfig,
                      overrides=TIMING + ["model.init=random", "model.init_num_points=1000", f"data.root={FOX}"])
    ts = build(cfg)
    trained = read_checkpoint(TRAINED)["model"]
    n = len(trained["means"])
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(n, 100_000)]
    for k in ts.params.keys():
        ts.params[k] = torch.nn.Parameter(trained[k][keep].clone())
    scene_scale = ts.train_set.scene_scale()
    ts.optimizers = _optimizers(cfg, ts.params, scene_scale)
    ts.scheduler = _scheduler(cfg, ts.optimizers)
    ts.strategy_state = ts.strategy.initialize_state(scene_scale=scene_scale)
    return round(statistics.median(_time_steps(cfg, ts, repeats)) * 1e3, 1)


def run(repeats: int = 10, quick: bool = False) -> dict:
    # 100k random Gaussians in a cube of the scene scale, starting at opacity 0.01 (the fox config before
    # it triangulated its initial points)
    overrides = TIMING + ["model.init=random", f"model.init_num_points={2_000 if quick else 100_000}",
                          "model.init_extent=1.0", "model.init_opacity=0.01"]
    if quick:  # a tiny synthetic scene, written to a temporary folder
        config = "3dgs_synthetic.yaml"
        tmp = tempfile.TemporaryDirectory()
        overrides += [f"data.root={Path(tmp.name) / 'scene'}", "data.synthetic.width=48", "data.synthetic.height=64",
                      "data.synthetic.num_views=8", "data.synthetic.num_points=300"]
    elif FOX.exists():
        config = "3dgs_fox.yaml"
        overrides.append(f"data.root={FOX}")
    else:
        config = "3dgs_synthetic.yaml"
        overrides += [f"data.root={ROOT / 'data_cache' / 'synthetic_views_270x480'}", "data.synthetic.width=270",
                      "data.synthetic.height=480"]
    cfg = load_config(ROOT / "configs" / "splatting" / config, SplatConfig, overrides=overrides)
    ts = build(cfg)
    times = _time_steps(cfg, ts, repeats)

    # the rasterizer alone on the same Gaussians and the first training view
    p = ts.params
    s = ts.train_set[0]
    viewmat, K = torch.linalg.inv(s.camtoworld)[None], s.K[None]
    fwd, bwd, visible = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rgb, _, _, meta = render_raw(p["means"], p["quats"], p["scales"], p["opacities"], p["sh0"], p["shN"],
                                     viewmat, K, s.width, s.height, 3, backgrounds=ts.background)
        t1 = time.perf_counter()
        rgb.sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        visible = int((meta["radii"] > 0).sum())
        for v in p.values():
            v.grad = None
    return {
        "gaussians": len(p["means"]),
        "visible": visible,
        "width": s.width,
        "height": s.height,
        "scene": "fox" if FOX.exists() and not quick else "synthetic",
        "ms_train_step": round(statistics.median(times) * 1e3, 1),
        "ms_render_fwd": round(statistics.median(fwd) * 1e3, 1),
        "ms_render_bwd": round(statistics.median(bwd) * 1e3, 1),
        "ms_train_step_trained": None if quick else _trained_step_ms(repeats),
        "threads": torch.get_num_threads(),
    }
