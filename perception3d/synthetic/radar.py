"""Simulated automotive radar returns: a few points per object plus static clutter."""
from __future__ import annotations

import numpy as np

from perception3d.synthetic.scene import RadarConfig, Scene

__all__ = ["RCS_DBSM", "simulate_radar"]

RCS_DBSM = {"Car": (10.0, 3.0), "Pedestrian": (-5.0, 2.0), "Cyclist": (0.0, 2.0)}  # (mean, std)
_CLASS_INDEX = {"Car": 0, "Pedestrian": 1, "Cyclist": 2}


def simulate_radar(scene: Scene, rng: np.random.Generator, objects: np.ndarray,
                   visible_fraction: np.ndarray | None = None, cfg: RadarConfig | None = None) -> np.ndarray:
    """Radar points `float32 [K, 6] = (x, y, z, radial velocity m/s, rcs dBsm, object id)`.

    Args:
        scene: the scene (radar at the LiDAR origin, static ego).
        rng: random generator.
        objects: indices of the scene objects that may return points; a point's id is the position in
            this array (i.e. the row of the object in the label file), -1 for clutter.
        visible_fraction: `[len(objects)]` in [0, 1]; the point count scales with it.
        cfg: radar options (default `scene.config.radar`).
    """
    cfg = cfg or scene.config.radar
    rows = []
    for k, i in enumerate(np.asarray(objects, np.int64)):  # per object (a handful), not per point
        box, cls = scene.boxes_lidar[i], str(scene.classes[i])
        rng_m = np.hypot(box[0], box[1])
        if rng_m > cfg.max_range_m or abs(np.degrees(np.arctan2(box[1], box[0]))) > cfg.fov_deg:
            continue
        vis = 1.0 if visible_fraction is None else float(visible_fraction[k])
        n_max = cfg.points_per_class[_CLASS_INDEX[cls]]
        n = int(rng.binomial(n_max, min(1.0, 0.25 + 0.75 * vis) * max(0.3, 1 - rng_m / cfg.max_range_m)))
        if n == 0:
            continue
        local = rng.uniform(-0.5, 0.5, (n, 3)) * box[3:6]
        c, s = np.cos(box[6]), np.sin(box[6])
        pos = box[:3] + np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1)
        pos += rng.normal(0, cfg.position_noise_m, pos.shape)
        los = pos / np.linalg.norm(pos, axis=1, keepdims=True)
        v = np.array([*scene.velocity[i], 0.0])
        vr = los @ v + rng.normal(0, cfg.velocity_noise_mps, n)
        rcs = rng.normal(*RCS_DBSM[cls], n)
        rows.append(np.concatenate([pos, vr[:, None], rcs[:, None], np.full((n, 1), float(k))], 1))
    n_cl = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
    r = rng.uniform(3, cfg.max_range_m, n_cl)
    a = np.deg2rad(rng.uniform(-cfg.fov_deg, cfg.fov_deg, n_cl))
    xy = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    z = scene.ground_z(xy) + rng.uniform(0, 3, n_cl)
    clutter = np.concatenate([xy, z[:, None], rng.normal(0, cfg.velocity_noise_mps, (n_cl, 1)),
                              rng.uniform(-10, 5, (n_cl, 1)), np.full((n_cl, 1), -1.0)], 1)
    rows.append(clutter)
    return np.concatenate(rows, 0).astype(np.float32)
