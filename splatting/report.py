"""The HTML report of a splatting run or evaluation (`OUT/report.html`, beside `metrics.json`): the
held-out metrics, the training curves of a run and, for each saved view, the render beside the
ground truth, the rendered expected depth and the error image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from perception3d.engine.report import Report, loss_figure

__all__ = ["write_report"]

_SHOWN = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("num_gaussians", "Gaussians"),
          ("ms_per_view", "ms / view"), ("fps", "FPS"), ("views", "held-out views")]


def write_report(out_dir: Path, result: dict, render_dir: Path, title: str) -> Path:
    """Write `out_dir/report.html` for `result` (as metrics.json holds it), with `render_dir`'s views."""
    m = result["metrics"]
    r = Report(title, f"checkpoint {result.get('checkpoint', '?')}")
    r.heading("Held-out views")
    shown = [(k, name) for k, name in _SHOWN if k in m] + [(k, f"{k[3:]} file (MB)") for k in m if k.startswith("mb_")]
    r.table([name for _, name in shown], [[m[k] for k, _ in shown]])
    loss = loss_figure(out_dir / "log.jsonl", ["loss", "l1", "d_ssim", "loss_mask", "loss_vq", "loss_tv",
                                                     "loss_flow"])
    if loss is not None:
        r.heading("Training")
        r.figure(loss, "Training loss (L1 + D-SSIM) and its terms, log scale; dashed: held-out PSNR when evaluated "
                       "during training.")
    views = sorted(p for p in render_dir.glob("*.png") if not p.stem.endswith(("_depth", "_error"))) \
        if render_dir.is_dir() else []
    if views:
        r.heading("Renders")
        r.note("Each row: render | ground truth | expected depth (turbo: near red, far blue; black where the "
               "Gaussians cover under half) | mean absolute error (inferno: black 0, yellow 0.25 or more).")
        for p in views:
            parts = [np.asarray(Image.open(p).convert("RGB"))]
            parts += [np.asarray(Image.open(q).convert("RGB")) for q in
                      (p.with_name(f"{p.stem}_depth.png"), p.with_name(f"{p.stem}_error.png")) if q.is_file()]
            row = np.concatenate(parts, axis=1) if len({a.shape[0] for a in parts}) == 1 else parts[0]
            r.image(row, p.stem, width=max(row.shape[1], 960))  # small renders shown larger
    inputs = sorted((out_dir / "inputs").glob("*.png")) if (out_dir / "inputs").is_dir() else []
    if inputs:
        r.heading("Input views (CoherentGS)")
        r.note("Each row: input view | initial depth (white outlines: the plane-sweep depths kept; the rest is "
               "filled) | depth of its Gaussians after training. Turbo: near red, far blue.")
        for p in inputs:
            row = np.asarray(Image.open(p).convert("RGB"))
            r.image(row, p.stem, width=max(row.shape[1], 960))
    r.heading("Every number")
    r.table(["metric", "value"], sorted(m.items()), f"all {len(m)} values of metrics.json", collapsed=True)
    return r.save(out_dir / "report.html")
