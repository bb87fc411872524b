"""Benchmark (needs a CUDA GPU): gsplat's CUDA rasterizer against our CPU kernel on the same inputs.

Scene: the garden Gaussians of ``raster.py`` (138,766, 3 cameras at 648x420, SH degree 3). For the
render modes RGB (classic), RGB+ED (classic) and RGB+D (antialiased), both backends render and
backpropagate one loss (a fixed random weighting of the image, plus alpha, plus 0.01 x depth); per
mode: ``radii_equal`` (fraction of (camera, Gaussian) radii that agree), the largest, 99.9th
percentile and fraction-above-1e-4 of the absolute difference of each output (image, alpha,
depth), and ``max_rel_err_grads`` (over means, quats, scales, opacities, sh0, shN: ``max |cpu -
gpu| / max |gpu|``). Then gsplat's forward and forward+backward times on the GPU (medians of
``4 * repeats`` after 3 warm-ups). The CPU side uses all of the process's torch threads.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from perception3d.errors import DataError
from splatting.gaussians import render_raw
from splatting.rasterize import has_gsplat_cuda

MODES = (("RGB", "classic"), ("RGB+ED", "classic"), ("RGB+D", "antialiased"))
GRADS = ("means", "quats", "scales", "opacities", "sh0", "shN")


def _raster_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_raster", Path(__file__).with_name("raster.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(repeats: int = 5, quick: bool = False) -> dict:
    if not has_gsplat_cuda():
        raise DataError("bench gsplat_parity: needs a CUDA GPU and the gsplat package (this machine has "
                        f"torch.cuda.is_available()={torch.cuda.is_available()})")
    cuda = torch.device("cuda")  # gsplat's side of the comparison
    raster = _raster_module()
    gs, viewmats, Ks, W, H, source = raster.load_scene()
    if quick:
        gs, viewmats, Ks, W, H = raster._shrink(gs, viewmats, Ks, W, H)
    weights = torch.rand(len(viewmats), H, W, 3, generator=torch.Generator().manual_seed(1))
    base = (gs.means, gs.quats, gs.scales_log, gs.opacities_logit, gs.sh0, gs.shN)

    def render(device, mode, rmode, grad=True):
        params = [t.detach().to(device).clone().requires_grad_(grad) for t in base]
        with torch.set_grad_enabled(grad):
            rgb, alpha, depth, meta = render_raw(*params, viewmats.to(device), Ks.to(device), W, H, 3,
                                                 render_mode=mode, rasterize_mode=rmode)
            if grad:
                loss = (rgb * weights.to(device)).sum() + alpha.sum() + (0 if depth is None else 0.01 * depth.sum())
                loss.backward()
        outs = [t.detach().cpu() for t in (rgb, alpha, depth) if t is not None]
        return outs, [p.grad.cpu() for p in params] if grad else [], meta["radii"].cpu()

    result = {"gaussians": len(gs), "cameras": len(viewmats), "width": W, "height": H, "scene": source,
              "gpu": torch.cuda.get_device_name(), "gsplat_version": __import__("gsplat").__version__,
              "cpu_threads": torch.get_num_threads()}
    for mode, rmode in MODES:
        cpu, g_cpu, r_cpu = render("cpu", mode, rmode)
        gpu, g_gpu, r_gpu = render(cuda, mode, rmode)
        diffs = [(a - b).abs().flatten() for a, b in zip(cpu, gpu)]
        result[f"{mode}/{rmode}"] = {
            "radii_equal": float((r_cpu == r_gpu).float().mean()),
            "max_abs_err": [float(d.max()) for d in diffs],
            "p999_abs_err": [float(d.sort().values[int(0.999 * (len(d) - 1))]) for d in diffs],
            "frac_abs_err_gt_1e-4": [float((d > 1e-4).float().mean()) for d in diffs],
            "max_rel_err_grads": {n: float((a - b).abs().max() / b.abs().max()) for n, a, b in zip(GRADS, g_cpu, g_gpu)},
        }

    params = [t.detach().to(cuda).clone().requires_grad_(True) for t in base]
    vm, K, wt = viewmats.to(cuda), Ks.to(cuda), weights.to(cuda)

    def timed(backward: bool) -> float:
        def once():
            with torch.set_grad_enabled(backward):
                rgb = render_raw(*params, vm, K, W, H, 3)[0]
                if backward:
                    (rgb * wt).sum().backward()

        for _ in range(3):
            once()
        torch.cuda.synchronize()
        times = []
        for _ in range(4 * repeats):
            t0 = time.perf_counter()
            once()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e3, 3)

    result["ms_fwd_gsplat"] = timed(False)
    result["ms_fwd_bwd_gsplat"] = timed(True)
    return result
