"""Optical flow between the input views, with forward-backward consistency masks.

The default is OpenCV's DIS (Kroeger et al. 2016, ``cv2.DISOpticalFlow``, medium preset) on the
grey images; Farneback (``cv2.calcOpticalFlowFarneback``) is the other classical choice, and a
learned network (RAFT-style, :mod:`splatting.coherent.nets`) can be used from a local file.

A flow vector is used only where the image has texture (the grey 5 x 5 patch's standard deviation
is at least 0.01; in flat regions any flow fits the images) and where it survives the
epipolar check (with the cameras known, a match must land within 2 px of its pixel's epipolar
line; wide baselines make DIS return displacements that fit the images but not the geometry) and
the forward-backward check: when following it forward and the backward flow
from where it lands returns close to the start (Sundaram et al. 2010; the thresholds of UnFlow):
``|f(p) + b(p + f(p))|^2 < alpha (|f(p)|^2 + |b(p + f(p))|^2) + beta``. Occluded and mismatched
pixels fail it.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from perception3d.errors import DataError

__all__ = ["optical_flow", "forward_backward_mask", "textured", "epipolar_distance", "sample_map", "pixel_grid",
           "pair_flows"]


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, np.float32).mean(-1), 0, 1) * 255 + 0.5).astype(np.uint8)


def optical_flow(a: np.ndarray, b: np.ndarray, method: Literal["dis", "farneback"] = "dis",
                 net: Callable[..., np.ndarray] | None = None) -> np.ndarray:
    """Dense flow from image ``a`` to ``b`` (``float32 [H, W, 3]`` in [0, 1]): ``float32 [H, W, 2]``, pixels.

    ``flow[y, x] = (dx, dy)``: the content at pixel ``(x, y)`` of ``a`` is at ``(x + dx, y + dy)`` in ``b``.
    With ``net`` (a loaded flow network) it is used instead of ``method``.
    """
    import cv2

    if a.shape != b.shape:
        raise DataError(f"optical_flow: images of different sizes {a.shape} and {b.shape}")
    if net is not None:
        return _net_flow(net, a, b)
    ga, gb = _grey_uint8(a), _grey_uint8(b)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(ga, gb, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, pyr_scale=0.5, levels=5, winsize=15, iterations=5,
                                            poly_n=7, poly_sigma=1.5, flags=0)
    else:
        raise DataError(f"optical_flow: method={method!r}: expected 'dis' or 'farneback'")
    return np.asarray(flow, np.float32)


def _net_flow(net: Callable[..., np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    H, W = a.shape[:2]
    H8, W8 = -(-H // 8) * 8, -(-W // 8) * 8

    def prep(img: np.ndarray) -> np.ndarray:
        x = np.pad(np.asarray(img, np.float32), ((0, H8 - H), (0, W8 - W), (0, 0)), mode="edge")
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    out = np.asarray(net(prep(a), prep(b)), np.float32)
    if out.ndim != 4 or out.shape[:2] != (1, 2) or out.shape[2] < H or out.shape[3] < W:
        raise DataError(f"coherent.flow_model: expected an output of shape [1, 2, {H8}, {W8}], got {list(out.shape)}")
    return np.ascontiguousarray(out[0, :, :H, :W].transpose(1, 2, 0))


def sample_map(values: torch.Tensor, xy: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``values [C, H, W]`` at pixel positions ``xy [..., 2]`` (pixel centres at +0.5): ``[..., C]``.

    Positions outside the image take the border value."""
    C, H, W = values.shape
    g = torch.stack([xy[..., 0] * (2.0 / W) - 1.0, xy[..., 1] * (2.0 / H) - 1.0], -1).reshape(1, -1, 1, 2)
    out = F.grid_sample(values[None].to(g.dtype), g, mode=mode, padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.reshape(*xy.shape[:-1], C)


def pixel_grid(h: int, w: int, stride: int = 1) -> torch.Tensor:
    """``float32 [h, w, 2]``: the (x, y) pixel positions of the centres of an ``h x w`` grid of
    ``stride`` x ``stride`` pixel blocks (stride 1: the pixel centres, ``u + 0.5``)."""
    ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float32) + 0.5) * stride,
                            (torch.arange(w, dtype=torch.float32) + 0.5) * stride, indexing="ij")
    return torch.stack([xs, ys], -1)


def forward_backward_mask(forward: np.ndarray, backward: np.ndarray, alpha: float = 0.01,
                          beta: float = 0.5) -> np.ndarray:
    """``bool [H, W]``: where the forward flow ``[H, W, 2]`` passes the check against the backward flow
    (see the module docstring); pixels whose flow leaves the image fail it."""
    H, W = forward.shape[:2]
    f = torch.from_numpy(np.asarray(forward, np.float32))
    grid = pixel_grid(H, W)
    land = grid + f
    b = sample_map(torch.from_numpy(np.asarray(backward, np.float32)).permute(2, 0, 1), land)
    err = ((f + b) ** 2).sum(-1)
    ok = err < alpha * ((f ** 2).sum(-1) + (b ** 2).sum(-1)) + beta
    inside = (land[..., 0] >= 0) & (land[..., 0] <= W) & (land[..., 1] >= 0) & (land[..., 1] <= H)
    return (ok & inside).numpy()


def textured(image: np.ndarray, window: int = 5, min_std: float = 0.01) -> np.ndarray:
    """``bool [H, W]``: where the grey ``window`` x ``window`` patch of ``image [H, W, 3]`` has a standard
    deviation of at least ``min_std``."""
    g = torch.from_numpy(np.asarray(image, np.float32).mean(-1))[None, None]
    mean = F.avg_pool2d(g, window, stride=1, padding=window // 2, count_include_pad=False)
    var = F.avg_pool2d(g * g, window, stride=1, padding=window // 2, count_include_pad=False) - mean ** 2
    return (var.clamp(min=0).sqrt()[0, 0] >= min_std).numpy()


def epipolar_distance(flow: np.ndarray, viewmat_a: torch.Tensor, K_a: torch.Tensor, viewmat_b: torch.Tensor,
                      K_b: torch.Tensor) -> np.ndarray:
    """``[H, W]``: pixels between where ``flow`` (view a -> b) lands and the epipolar line of its pixel in b."""
    H, W = flow.shape[:2]
    rel = viewmat_b.double() @ torch.linalg.inv(viewmat_a.double())  # camera a -> camera b
    R, t = rel[:3, :3], rel[:3, 3]
    tx = torch.tensor([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]], dtype=torch.float64)
    Fm = torch.linalg.inv(K_b.double()).T @ tx @ R @ torch.linalg.inv(K_a.double())
    p = torch.cat([pixel_grid(H, W).double(), torch.ones(H, W, 1, dtype=torch.float64)], -1)
    q = torch.cat([p[..., :2] + torch.from_numpy(np.asarray(flow, np.float64)), p[..., 2:]], -1)
    line = p @ Fm.T  # l = F p in b
    return ((q * line).sum(-1).abs() / line[..., :2].norm(dim=-1).clamp(min=1e-12)).float().numpy()


def pair_flows(images: list[np.ndarray], method: str = "dis", net: Callable[..., np.ndarray] | None = None,
               progress: bool = False, viewmats: torch.Tensor | None = None, Ks: torch.Tensor | None = None,
               max_epipolar_px: float = 2.0) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Flow and mask (textured, consistent and, with the cameras given, epipolar) for every ordered pair
    of views: ``{(i, j): (flow i -> j, mask)}``."""
    from tqdm import tqdm

    pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
    out = {}
    for i, j in tqdm(pairs, desc="[coherent] optical flow", disable=not progress, leave=False):
        fij, fji = optical_flow(images[i], images[j], method, net), optical_flow(images[j], images[i], method, net)
        out[(i, j)] = fij, forward_backward_mask(fij, fji) & textured(images[i])
        out[(j, i)] = fji, forward_backward_mask(fji, fij) & textured(images[j])
        if viewmats is not None:
            for a, b in ((i, j), (j, i)):
                f, m = out[(a, b)]
                out[(a, b)] = f, m & (epipolar_distance(f, viewmats[a], Ks[a], viewmats[b], Ks[b]) < max_epipolar_px)
    return out
