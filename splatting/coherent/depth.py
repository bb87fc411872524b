"""Initial depth of every input view for CoherentGS, with no download.

``initial_depths`` runs, per training view (all at the dataset's resolution):

1. **Depth range** from the optical flow: consistent flow matches between views are triangulated
   with the known cameras (midpoint of the two rays); near / far are the 2nd / 98th percentiles of
   the view's match depths, widened to 0.7x and 1.5x.
2. **Plane-sweep stereo** (Collins 1996) against the other input views: ``planes`` fronto-parallel
   planes uniform in inverse depth; for each, the source views are warped into the reference
   view and compared by zero-mean normalised cross-correlation over a ``window`` x ``window``
   patch of the grey image (cost ``1 - NCC``). Per pixel the costs of the better half of the
   sources are averaged (a source that is occluded there does not vote), the best plane wins and
   a parabola through its neighbours refines the inverse depth.
3. **Filtering**: a depth is kept when the patch has texture, its NCC is at least ``min_ncc`` and
   it is geometrically consistent with another view's depth map (reprojected there and back within
   1.5 px and 2 % depth, as in COLMAP's and MVSNet's fusion).
4. **Filling and smoothing**: every rejected pixel takes the farthest depth among its nearest kept
   neighbours (holes next to depth edges are occluded background, so the far side is the better
   guess), then a 5 x 5 median filter smooths the map without blurring its edges.

Other sources replace step 2-4's result when a user has them: ``depth_source: folder`` reads one
``<image stem>.npy`` (float, depth) or ``.png`` (16-bit, depth in any unit) per view,
``depth_source: model`` runs a monocular depth network from a local file
(:mod:`splatting.coherent.nets`). Both are relative at best, so each view's map is aligned in
scale and offset (in disparity, least squares with the worst 20 % of residuals trimmed twice) to
that view's kept plane-sweep depths. Training then refines the alignment (its first stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from perception3d.errors import DataError
from splatting.coherent.flow import pixel_grid, sample_map
from splatting.coherent.nets import IMAGENET_MEAN, IMAGENET_STD, load_net

__all__ = ["InitialDepth", "initial_depths", "plane_sweep", "geometric_consistency", "fill_and_smooth",
           "align_disparity", "depth_range_from_flow", "read_depth_folder", "model_disparity", "pixel_rays",
           "rays_through", "project"]


def rays_through(uv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame rays ``[..., 3]`` through pixel positions ``uv [..., 2]``, scaled to z = 1 (so
    ``depth * ray`` is the point at z-depth ``depth``)."""
    return torch.stack([(uv[..., 0] - K[0, 2]) / K[0, 0], (uv[..., 1] - K[1, 2]) / K[1, 1],
                        torch.ones_like(uv[..., 0])], -1)


def pixel_rays(K: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """:func:`rays_through` the ``H x W`` pixel centres: ``[H, W, 3]``."""
    return rays_through(pixel_grid(H, W), K)


def project(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``[..., 3]`` -> pixel positions ``[..., 2]`` (centres at +0.5) and camera z ``[...]``."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[..., 2]
    zs = z.clamp(min=1e-8)
    return torch.stack([K[0, 0] * cam[..., 0] / zs + K[0, 2], K[1, 1] * cam[..., 1] / zs + K[1, 2]], -1), z


def _box(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window`` x ``window`` patch of ``[N, H, W]`` (the patch shrinks at the border)."""
    return F.avg_pool2d(x[:, None], window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]


def plane_sweep(images: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, near: torch.Tensor,
                far: torch.Tensor, planes: int = 64, window: int = 5,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plane-sweep depth of every view against the others (step 2 of the module docstring).

    Args:
        images: ``float32 [V, H, W, 3]`` in [0, 1], V >= 2.
        viewmats, Ks: ``[V, 4, 4]`` world -> camera, ``[V, 3, 3]`` intrinsics at this resolution.
        near, far: ``[V]`` depth range per view.

    Returns:
        ``(depth [V, H, W], ncc [V, H, W] of the winning plane, texture [V, H, W])`` (texture: the
        grey patch's standard deviation).
    """
    from tqdm import tqdm

    V, H, W, _ = images.shape
    grey = images.mean(-1)
    depth, score, texture = (torch.empty(V, H, W) for _ in range(3))
    for r in tqdm(range(V), desc="[coherent] plane sweep", disable=not progress, leave=False):
        inv = torch.linspace(1.0 / float(near[r]), 1.0 / float(far[r]), planes)
        c2w = torch.linalg.inv(viewmats[r])
        rays = pixel_rays(Ks[r], H, W) @ c2w[:3, :3].T  # world directions, z-depth scaled
        ref = grey[r][None]
        mu_r = _box(ref, window)
        var_r = (_box(ref * ref, window) - mu_r ** 2).clamp(min=0)
        pts = c2w[:3, 3] + rays[None] / inv[:, None, None, None]  # [P, H, W, 3]: the pixels on every plane
        costs = []
        for s in range(V):
            if s == r:
                continue
            uv, z = project(pts, viewmats[s], Ks[s])
            warped = sample_map(grey[s][None], uv)[..., 0]
            inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] <= W) & (uv[..., 1] >= 0) & (uv[..., 1] <= H)
            mu_w = _box(warped, window)
            var_w = (_box(warped * warped, window) - mu_w ** 2).clamp(min=0)
            cov = _box(warped * ref, window) - mu_w * mu_r
            ncc = cov / (var_r * var_w + 1e-8).sqrt()
            costs.append(torch.where(inside, 1.0 - ncc, torch.full_like(ncc, 2.0)))
        c = torch.stack(costs)  # [S, P, H, W]
        keep = -(-len(costs) // 2)
        c = c.sort(0).values[:keep].mean(0)  # the better half of the sources
        best = c.argmin(0)
        i0 = best.clamp(1, planes - 2)
        cm, c0, cp = (c.gather(0, (i0 + o)[None])[0] for o in (-1, 0, 1))
        denom = cm - 2 * c0 + cp
        offset = torch.where(denom > 1e-6, 0.5 * (cm - cp) / denom.clamp(min=1e-6), torch.zeros_like(c0))
        offset = torch.where(best == i0, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))
        step = (inv[-1] - inv[0]) / max(planes - 1, 1)
        inv_best = inv[0] + (best.float() + offset) * step
        depth[r] = 1.0 / inv_best.clamp(min=1e-8)
        score[r] = 1.0 - c.gather(0, best[None])[0]
        texture[r] = var_r[0].sqrt()
    return depth, score, texture


def _backproject(depth: torch.Tensor, uv: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """World points of pixel positions ``uv [..., 2]`` at z-depth ``depth [...]`` of a camera."""
    cam = rays_through(uv, K) * depth[..., None]
    c2w = torch.linalg.inv(viewmat)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def geometric_consistency(depths: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, max_px: float = 1.5,
                          max_rel: float = 0.02) -> torch.Tensor:
    """``int [V, H, W]``: in how many other views each pixel's depth is confirmed (reprojected into the
    other view at that view's depth and back, it lands within ``max_px`` and ``max_rel`` of itself)."""
    V, H, W = depths.shape
    grid = pixel_grid(H, W)
    count = torch.zeros(V, H, W, dtype=torch.int64)
    for r in range(V):
        X = _backproject(depths[r], grid, viewmats[r], Ks[r])
        for s in range(V):
            if s == r:
                continue
            uv, z = project(X, viewmats[s], Ks[s])
            inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] <= W) & (uv[..., 1] >= 0) & (uv[..., 1] <= H)
            d_s = sample_map(depths[s][None], uv, mode="nearest")[..., 0]
            back, z_r = project(_backproject(d_s, uv, viewmats[s], Ks[s]), viewmats[r], Ks[r])
            ok = inside & ((back - grid).norm(dim=-1) < max_px) & ((z_r - depths[r]).abs() < max_rel * depths[r])
            count[r] += ok
    return count


def fill_and_smooth(depth: np.ndarray, valid: np.ndarray, median: int = 5) -> np.ndarray:
    """Fill every invalid pixel with the farthest depth among its nearest valid pixels, then median
    filter (step 4 of the module docstring). No valid pixel at all: DataError."""
    from scipy.ndimage import median_filter

    if not valid.any():
        raise DataError("fill_and_smooth: no valid depth to fill from")
    d = torch.from_numpy(np.where(valid, depth, -np.inf).astype(np.float32))[None, None]
    known = torch.from_numpy(valid.copy())[None, None]
    while not bool(known.all()):
        grown = F.max_pool2d(d, 3, stride=1, padding=1)
        new = ~known & torch.isfinite(grown)
        d = torch.where(new, grown, d)
        known = known | new
    return median_filter(d[0, 0].numpy(), size=median, mode="nearest").astype(np.float32)


def align_disparity(source: np.ndarray, target: np.ndarray, mask: np.ndarray, trims: int = 2,
                    trim: float = 0.2) -> tuple[float, float]:
    """``(a, b)`` minimising ``|a source + b - target|^2`` over ``mask``, refitted ``trims`` times
    without the worst ``trim`` fraction of residuals. DataError with fewer than 20 masked pixels."""
    x, y = source[mask].astype(np.float64), target[mask].astype(np.float64)
    if len(x) < 20:
        raise DataError(f"align_disparity: {len(x)} pixels to align on (need 20): the plane sweep kept too few "
                        "depths in this view")
    keep = np.ones(len(x), bool)
    for _ in range(trims + 1):
        A = np.stack([x[keep], np.ones(int(keep.sum()))], 1)
        (a, b), *_ = np.linalg.lstsq(A, y[keep], rcond=None)
        res = np.abs(a * x + b - y)
        keep = res <= np.quantile(res, 1.0 - trim)
    return float(a), float(b)


def depth_range_from_flow(flows: dict, viewmats: torch.Tensor, Ks: torch.Tensor, H: int, W: int,
                          min_angle_deg: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(near [V], far [V])`` from the triangulated consistent flow matches (step 1 of the module docstring).

    Raises:
        DataError: a view has fewer than 50 usable matches (no overlap with the other views)."""
    V = len(viewmats)
    zs: list[list[torch.Tensor]] = [[] for _ in range(V)]
    grid = pixel_grid(H, W)
    cos_min = math.cos(math.radians(min_angle_deg))
    for (i, j), (flow, mask) in flows.items():
        m = torch.from_numpy(mask)
        p_i, p_j = grid[m], grid[m] + torch.from_numpy(flow)[m]
        c2w_i, c2w_j = torch.linalg.inv(viewmats[i]), torch.linalg.inv(viewmats[j])
        o_i, o_j = c2w_i[:3, 3], c2w_j[:3, 3]
        d_i = _backproject(torch.ones(len(p_i)), p_i, viewmats[i], Ks[i]) - o_i
        d_j = _backproject(torch.ones(len(p_j)), p_j, viewmats[j], Ks[j]) - o_j
        # closest points of the two rays o + t d: solve the 2 x 2 normal equations
        w0 = o_i - o_j
        a, b, c = (d_i * d_i).sum(-1), (d_i * d_j).sum(-1), (d_j * d_j).sum(-1)
        d, e = (d_i * w0).sum(-1), (d_j * w0).sum(-1)
        den = a * c - b * b
        t_i = (b * e - c * d) / den.clamp(min=1e-12)
        t_j = (a * e - b * d) / den.clamp(min=1e-12)
        cos = b / (a * c).sqrt()
        ok = (t_i > 0) & (t_j > 0) & (cos < cos_min)
        zs[i].append(t_i[ok])  # d_i has z = 1 in camera i, so t_i is the z-depth
    near, far = torch.empty(V), torch.empty(V)
    for v in range(V):
        z = torch.cat(zs[v]) if zs[v] else torch.empty(0)
        if len(z) < 50:
            raise DataError(f"input view {v}: {len(z)} optical-flow matches with the other input views could be "
                            "triangulated (need 50): do the views overlap?")
        lo, hi = torch.quantile(z[:100_000], torch.tensor([0.02, 0.98]))
        near[v], far[v] = 0.7 * lo, 1.5 * hi
    return near, far


def read_depth_folder(folder: str | Path, names: list[str], H: int, W: int) -> list[np.ndarray]:
    """One depth map per image name from ``folder`` (``<stem>.npy`` float or ``<stem>.png`` 16-bit),
    resized to ``H x W``; non-positive or non-finite values become NaN (unknown).

    Raises:
        DataError: the folder or a view's file is missing or unreadable, naming it."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"coherent.depth_folder={folder}: folder not found")
    out = []
    for name in names:
        stem = Path(name).stem
        npy, png = root / f"{stem}.npy", root / f"{stem}.png"
        try:
            if npy.is_file():
                d = np.load(npy, allow_pickle=False)
                src = npy
            elif png.is_file():
                with Image.open(png) as im:
                    d = np.asarray(im)
                src = png
            else:
                raise DataError(f"coherent.depth_folder={folder}: no depth for view {name!r} (expected {npy.name} "
                                f"or {png.name})")
        except (OSError, ValueError) as e:
            raise DataError(f"{npy if npy.is_file() else png}: not a readable depth map ({e})") from None
        d = np.asarray(d, np.float32)
        if d.ndim == 3 and d.shape[-1] == 1:
            d = d[..., 0]
        if d.ndim != 2:
            raise DataError(f"{src}: expected a [H, W] depth map, got shape {list(d.shape)}")
        d = np.where(np.isfinite(d) & (d > 0), d, np.nan)
        t = torch.from_numpy(d)[None, None]
        out.append(F.interpolate(t, size=(H, W), mode="nearest")[0, 0].numpy())
    return out


def model_disparity(net, image: np.ndarray, size: int, output: str) -> np.ndarray:
    """Relative disparity ``[H, W]`` of ``image [H, W, 3]`` from a monocular depth network (NaN where
    it is not positive); see :mod:`splatting.coherent.nets` for the calling convention."""
    H, W = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - torch.from_numpy(IMAGENET_MEAN)[:, None, None]) / torch.from_numpy(IMAGENET_STD)[:, None, None]
    out = np.asarray(net(x.numpy()), np.float32)
    if out.ndim == 4 and out.shape[:2] == (1, 1):
        out = out[:, 0]
    if out.ndim != 3 or out.shape[0] != 1:
        raise DataError(f"coherent.depth_model: expected an output of shape [1, H, W] or [1, 1, H, W], "
                        f"got {list(out.shape)}")
    d = F.interpolate(torch.from_numpy(out)[None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    disp = d if output == "disparity" else 1.0 / np.where(d > 0, d, np.nan)
    return np.where(np.isfinite(disp) & (disp > 0), disp, np.nan).astype(np.float32)


@dataclass
class InitialDepth:
    """The initial depth of the input views.

    Attributes:
        depth: ``float32 [V, H, W]`` z-depth, every pixel filled.
        kept: ``bool [V, H, W]`` the plane-sweep depths that passed the filters.
        near, far: ``[V]`` the depth range swept.
        source: ``"mvs"``, ``"folder"`` or ``"model"``.
    """

    depth: np.ndarray
    kept: np.ndarray
    near: np.ndarray
    far: np.ndarray
    source: str


def initial_depths(images: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, flows: dict, opts,
                   names: list[str], progress: bool = False) -> InitialDepth:
    """The module docstring's pipeline for the input views ``images [V, H, W, 3]`` with the options of
    :class:`splatting.coherent.model.CoherentOptions` (``depth_source``, ``mvs_planes``, ...)."""
    V, H, W, _ = images.shape
    near, far = depth_range_from_flow(flows, viewmats, Ks, H, W)
    depth, ncc, texture = plane_sweep(images, viewmats, Ks, near, far, opts.mvs_planes, opts.mvs_window, progress)
    consistent = geometric_consistency(depth, viewmats, Ks)
    kept = ((ncc >= opts.mvs_min_ncc) & (texture >= 0.01) & (consistent >= 1)).numpy()
    mvs = np.stack([fill_and_smooth(depth[v].numpy(), kept[v]) if kept[v].any()
                    else np.full((H, W), float(np.sqrt(near[v] * far[v])), np.float32) for v in range(V)])
    if opts.depth_source == "mvs":
        return InitialDepth(mvs, kept, near.numpy(), far.numpy(), "mvs")
    if opts.depth_source == "folder":
        relative = [1.0 / d for d in read_depth_folder(opts.depth_folder, names, H, W)]
    else:
        net = load_net(opts.depth_model, "coherent.depth_model")
        relative = [model_disparity(net, images[v].numpy(), opts.depth_model_input, opts.depth_model_output)
                    for v in range(V)]
    out = np.empty((V, H, W), np.float32)
    for v in range(V):
        known = np.isfinite(relative[v])
        a, b = align_disparity(np.nan_to_num(relative[v]), 1.0 / depth[v].numpy(), kept[v] & known)
        disp = a * relative[v] + b
        good = known & (disp > 0)
        if not good.any():
            raise DataError(f"view {names[v]!r}: its {opts.depth_source} depth aligned to the plane sweep has no "
                            "positive disparity")
        out[v] = fill_and_smooth(1.0 / np.where(good, disp, 1.0), good, median=1)
    return InitialDepth(out, kept, near.numpy(), far.numpy(), opts.depth_source)
