"""Benchmark: the C++ CPU rasterizer vs the pure-torch reference, forward and forward+backward.

Scene: the 138,766 points of ``../shared/data/garden/test_garden.npz`` (a real Mip-NeRF 360 scene,
from gsplat's assets) as 3DGS-initialised Gaussians (isotropic, 3-nearest-neighbour scale, opacity
0.8, then made anisotropic with random rotations and log-normal scale jitter, as in a trained
scene; SH degree 3 with small random higher coefficients so every gradient is non-trivial), rendered
at 648x420 from its 3 cameras in one call. Without the file, a synthetic cloud of the same size.

Both backends run the same mathematics: the CPU backend projects, colours, bins and composites
in C++ with analytic backwards, the reference in vectorised torch with autograd. ``max_abs_err``
is the largest absolute difference between the two rendered images and ``frac_abs_err_gt_1e-5``
the fraction of pixel values that differ by more than 1e-5 (the two projections round differently
in float32, which flips the odd Gaussian at the 1/255 alpha cut-off); ``max_rel_err_grads`` the
largest, over the gradients of means, quats, scales, opacities and SH coefficients (loss: a fixed
random weighting of the image summed over all pixels, so gradients reach 1e4), of
``max |cpu - ref| / max |ref|``. Times are medians over ``repeats``
(the reference: over ``min(repeats, 2)``), with the process's torch thread count.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splatting.gaussians import Gaussians, render_raw

GARDEN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "garden" / "test_garden.npz"


def load_scene() -> tuple[Gaussians, torch.Tensor, torch.Tensor, int, int, str]:
    """(Gaussians, viewmats [C, 4, 4], Ks [C, 3, 3], width, height, source)."""
    g = torch.Generator().manual_seed(0)
    if GARDEN.exists():
        d = np.load(GARDEN)
        pts, rgb = torch.from_numpy(d["means3d"]).float(), torch.from_numpy(d["colors"]).float() / 255
        viewmats, Ks = torch.from_numpy(d["viewmats"]).float(), torch.from_numpy(d["Ks"]).float()
        W, H, source = int(d["width"]), int(d["height"]), "garden"
    else:  # same size: a noisy sphere shell seen from 3 cameras on a circle
        n = 138_766
        dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
        pts = dirs * (2 + 0.2 * torch.rand(n, 1, generator=g))
        rgb = torch.rand(n, 3, generator=g)
        W, H, source = 648, 420, "synthetic"
        viewmats = []
        for a in (0.0, 2.1, 4.2):
            eye = torch.tensor([6 * np.cos(a), 6 * np.sin(a), 1.0], dtype=torch.float32)  # np.cos: float64
            z = torch.nn.functional.normalize(-eye, dim=0)
            x = torch.nn.functional.normalize(torch.cross(z, torch.tensor([0.0, 0.0, 1.0]), dim=0), dim=0)
            y = torch.cross(z, x, dim=0)
            R = torch.stack([x, y, z])
            vm = torch.eye(4)
            vm[:3, :3], vm[:3, 3] = R, -R @ eye
            viewmats.append(vm)
        viewmats = torch.stack(viewmats)
        Ks = torch.tensor([[500.0, 0, W / 2], [0, 500.0, H / 2], [0, 0, 1]]).repeat(3, 1, 1)
    gs = Gaussians.from_points(pts, rgb, sh_degree=3, init_opacity=0.8)
    n = len(gs)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    scales_log = gs.scales_log + 0.3 * torch.randn(n, 3, generator=g)
    shN = 0.05 * torch.randn(gs.shN.shape, generator=g)
    gs = Gaussians(gs.means, quats, scales_log, gs.opacities_logit, gs.sh0, shN)
    return gs, viewmats, Ks, W, H, source


def _shrink(gs: Gaussians, viewmats, Ks, W: int, H: int, n: int = 3_000, factor: int = 4):
    """The quick mode's inputs: `n` of the Gaussians, images `factor` times smaller."""
    keep = torch.randperm(len(gs), generator=torch.Generator().manual_seed(2))[:n]
    gs = Gaussians(gs.means[keep], gs.quats[keep], gs.scales_log[keep], gs.opacities_logit[keep], gs.sh0[keep],
                   gs.shN[keep])
    Ks = Ks.clone()
    Ks[:, :2] /= factor
    return gs, viewmats, Ks, W // factor, H // factor


def run(repeats: int = 5, quick: bool = False) -> dict:
    gs, viewmats, Ks, W, H, source = load_scene()
    if quick:
        gs, viewmats, Ks, W, H = _shrink(gs, viewmats, Ks, W, H)
    weights = torch.rand(len(viewmats), H, W, 3, generator=torch.Generator().manual_seed(1))

    def step(backend: str, backward: bool):
        params = [t.clone().requires_grad_(backward) for t in (gs.means, gs.quats, gs.scales_log,
                                                                gs.opacities_logit, gs.sh0, gs.shN)]
        with torch.set_grad_enabled(backward):
            rgb, _, _, _ = render_raw(*params, viewmats, Ks, W, H, 3, backend=backend)
            if backward:
                (rgb * weights).sum().backward()
        grads = [p.grad for p in params] if backward else []
        return rgb.detach(), grads

    def timed(backend: str, backward: bool, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(backend, backward)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    step("cpu", True)  # warm-up (and build of the extension if needed)
    ms_fwd = timed("cpu", False, repeats)
    ms_fwd_bwd = timed("cpu", True, repeats)
    ms_ref = timed("reference", True, min(repeats, 2))

    rgb_c, g_c = step("cpu", True)
    rgb_r, g_r = step("reference", True)
    rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_c, g_r))
    return {
        "gaussians": len(gs),
        "cameras": len(viewmats),
        "width": W,
        "height": H,
        "scene": source,
        "ms_fwd": round(ms_fwd, 1),
        "ms_fwd_bwd": round(ms_fwd_bwd, 1),
        "ms_fwd_bwd_reference": round(ms_ref, 1),
        "speedup_vs_reference": round(ms_ref / ms_fwd_bwd, 1),
        "max_abs_err": float((rgb_c - rgb_r).abs().max()),
        "frac_abs_err_gt_1e-5": float(((rgb_c - rgb_r).abs() > 1e-5).float().mean()),
        "max_rel_err_grads": rel,
        "threads": torch.get_num_threads(),
    }
