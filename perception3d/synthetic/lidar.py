"""Simulated Velodyne HDL-64E-like LiDAR scans of a synthetic scene (LiDAR frame at the sensor)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception3d.synthetic.materials import box_material, ground_material
from perception3d.synthetic.raycast import GROUND, RayHits, raycast
from perception3d.synthetic.scene import LidarConfig, Scene

__all__ = ["LidarScan", "beam_directions", "simulate_lidar"]


@dataclass(frozen=True)
class LidarScan:
    """A simulated scan.

    Attributes:
        points: `float32 [N, 4]` (x, y, z metres, reflectance in [0, 1]).
        hit_obj: `int64 [N]` labelled object index of each point (-1 for background).
        obj_visible: `int64 [M]` rays whose nearest hit is object m (before dropout and cropping).
        obj_total: `int64 [M]` rays crossing object m at any depth (an unoccluded scan).
    """

    points: np.ndarray
    hit_obj: np.ndarray
    obj_visible: np.ndarray
    obj_total: np.ndarray


def beam_directions(cfg: LidarConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Unit ray directions `[64 * A, 3]` of one scan (A azimuths within +-fov_deg).

    Elevations: 32 upper beams evenly over `upper_deg`, 32 lower beams over `lower_deg`; with `rng`,
    per-beam elevation errors (sigma 0.02 deg) and azimuth jitter (sigma step/10) are added.
    """
    elev = np.concatenate([np.linspace(*cfg.upper_deg, 32), np.linspace(*cfg.lower_deg, 32)])
    step = cfg.azimuth_step_deg
    az = np.arange(-cfg.fov_deg, cfg.fov_deg, step) + step / 2
    if rng is not None:
        elev = elev + rng.normal(0, 0.02, elev.shape)
    E, A = np.meshgrid(np.deg2rad(elev), np.deg2rad(az), indexing="ij")
    if rng is not None:
        A = A + rng.normal(0, np.deg2rad(step / 10), A.shape)
    return np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)


def simulate_lidar(scene: Scene, rng: np.random.Generator, cfg: LidarConfig | None = None,
                   noise: bool = True) -> LidarScan:
    """Ray cast one scan against the scene.

    Args:
        scene: the scene (LiDAR at the origin).
        rng: random generator (noise, dropout).
        cfg: scanner options (default `scene.config.lidar`).
        noise: add range noise, dropout, intensity noise and beam jitter.

    Returns:
        `LidarScan`; points are in scan order (beam-major).
    """
    cfg = cfg or scene.config.lidar
    dirs = beam_directions(cfg, rng if noise else None)
    pr = scene.prims
    m = len(scene.boxes_lidar)
    hits: RayHits = raycast(np.zeros((1, 3)), dirs, pr.centre, pr.half, pr.yaw, scene.plane, cfg.max_range_m,
                            pr.obj, m)
    keep = np.isfinite(hits.t)
    t, idx, nrm, d = hits.t[keep], hits.hit[keep], hits.normal[keep], dirs[keep]
    p = d * t[:, None]
    refl = np.empty(len(t))
    g = idx == GROUND
    refl[g] = ground_material(scene, p[g])[1]
    refl[~g] = box_material(scene, idx[~g], p[~g], nrm[~g])[1]
    obj = np.where(g, -1, pr.obj[np.maximum(idx, 0)])
    obj_visible = np.bincount(obj[obj >= 0], minlength=m)[:m] if m else np.zeros(0, np.int64)
    cos_inc = np.abs(np.sum(nrm * d, axis=1))
    inten = refl * (0.35 + 0.65 * cos_inc)
    if noise:
        t = t + rng.normal(0, cfg.range_noise_m, t.shape)
        p = d * t[:, None]
        inten = inten + rng.normal(0, cfg.intensity_noise, t.shape)
        # random dropout, more for dark far surfaces and grazing angles
        p_drop = cfg.dropout + 0.25 * (t / cfg.max_range_m) ** 2 * (1 - refl) + 0.1 * (cos_inc < 0.1)
        alive = rng.random(t.shape) >= p_drop
        p, inten, obj = p[alive], inten[alive], obj[alive]
    inten = np.round(np.clip(inten, 0, 1), 2)
    if cfg.crop_to_image:
        uv, depth = scene.calib.lidar_to_image(p)
        w, h = scene.config.camera.width, scene.config.camera.height
        inside = (depth > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        p, inten, obj = p[inside], inten[inside], obj[inside]
    pts = np.concatenate([p, inten[:, None]], axis=1).astype(np.float32)
    return LidarScan(pts, obj.astype(np.int64), obj_visible.astype(np.int64), hits.obj_total)
