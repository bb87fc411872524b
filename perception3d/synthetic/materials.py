"""Surface materials of synthetic scenes: albedo (camera) and reflectivity (LiDAR) at hit points."""
from __future__ import annotations

import numpy as np

from perception3d.synthetic.scene import TEX_BUILDING, TEX_CANOPY, TEX_GLASS, Scene

__all__ = ["hash_noise", "ground_material", "box_material"]


def hash_noise(ix: np.ndarray, iy: np.ndarray, salt: int = 0) -> np.ndarray:
    """Deterministic per-cell noise in [0, 1) from integer cell coordinates (same shape as inputs)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def ground_material(scene: Scene, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground albedo `[N, 3]` and reflectivity `[N]` at points `p [N, 3]`: asphalt with dashed lane
    markings, tiled sidewalks, gravel/grass beyond."""
    x, y = p[:, 0], p[:, 1]
    ay = np.abs(y)
    fine = hash_noise(np.floor(x / 0.2), np.floor(y / 0.2), 1)
    coarse = hash_noise(np.floor(x / 2.0), np.floor(y / 2.0), 2)
    albedo = np.empty((len(p), 3))
    refl = np.empty(len(p))
    road = ay <= scene.road_half_m
    walk = (ay > scene.road_half_m) & (ay <= scene.road_half_m + scene.sidewalk_m)
    rest = ~(road | walk)
    g = 0.22 + 0.06 * fine + 0.04 * coarse
    albedo[road] = g[road, None] * np.array([1.0, 1.0, 1.02])
    refl[road] = 0.08 + 0.05 * fine[road]
    tile = ((np.floor(x / 0.5) + np.floor(y / 0.5)) % 2) * 0.05
    albedo[walk] = (0.5 + tile[walk] + 0.05 * fine[walk])[:, None] * np.array([1.0, 0.97, 0.92])
    refl[walk] = 0.2 + 0.05 * fine[walk]
    albedo[rest] = (0.25 + 0.15 * coarse[rest] + 0.05 * fine[rest])[:, None] * np.array([0.75, 0.9, 0.5])
    refl[rest] = 0.25 + 0.1 * coarse[rest]
    # dashed lane markings (centre line and lane boundaries) and solid edge lines
    lines = np.arange(-scene.road_half_m + 3.5, scene.road_half_m - 0.5, 3.5)
    if len(lines):
        d = np.abs(y[:, None] - lines[None]).min(1)
        mark = road & (d < 0.075) & ((x % 9.0) < 3.0)
    else:
        mark = np.zeros(len(p), bool)
    mark |= road & (np.abs(ay - (scene.road_half_m - 0.25)) < 0.075)
    albedo[mark] = 0.85
    refl[mark] = 0.75
    return albedo, refl


def box_material(scene: Scene, idx: np.ndarray, p: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Albedo `[N, 3]` and reflectivity `[N]` of hits `p [N, 3]` on primitives `idx [N]` (windows on
    buildings, leafy noise on canopies, reflective glass)."""
    pr = scene.prims
    albedo = pr.albedo[idx].copy()
    refl = pr.refl[idx].copy()
    tex = pr.tex[idx]
    # local hit coordinates
    rel = p - pr.centre[idx]
    c, s = np.cos(pr.yaw[idx]), np.sin(pr.yaw[idx])
    lx, ly = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    lz = rel[:, 2] + pr.half[idx, 2]  # height above the box bottom
    b = tex == TEX_BUILDING
    if b.any():
        u = lx[b] + ly[b]  # on a vertical face one term is constant, the other runs along the face
        win = ((u % 3.0) > 0.9) & ((u % 3.0) < 2.1) & ((lz[b] % 3.2) > 1.0) & ((lz[b] % 3.2) < 2.4) & (lz[b] > 0.8)
        win &= np.abs(normal[b, 2]) < 0.5
        shade = 0.9 + 0.1 * hash_noise(np.floor(u / 0.4), np.floor(lz[b] / 0.4), 3)
        albedo[b] = np.where(win[:, None], np.array([0.12, 0.15, 0.2]), albedo[b] * shade[:, None])
        refl[b] = np.where(win, 0.05, refl[b])
    k = tex == TEX_CANOPY
    if k.any():
        nz = hash_noise(np.floor(p[k, 0] / 0.15), np.floor((p[k, 1] + p[k, 2]) / 0.15), 4)
        albedo[k] *= (0.6 + 0.7 * nz)[:, None]
    g = tex == TEX_GLASS
    if g.any():
        albedo[g] *= 1.0 + 1.5 * np.clip(normal[g, 2], 0, 1)[:, None]  # sky reflection on the roof
    return np.clip(albedo, 0, 1), np.clip(refl, 0, 1)
