"""Ray-cast image_2 renderer for synthetic scenes (Lambertian shading, sun shadows, sky, textures)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perception3d.geometry.camera import KittiCalibration
from perception3d.synthetic.materials import box_material, ground_material
from perception3d.synthetic.raycast import GROUND, NO_HIT, raycast
from perception3d.synthetic.scene import CameraConfig, Scene

__all__ = ["CameraRender", "camera_rays", "render_camera"]

_RAY_CACHE: dict = {}
_HORIZON = np.array([0.78, 0.84, 0.9])
_ZENITH = np.array([0.3, 0.5, 0.85])


@dataclass(frozen=True)
class CameraRender:
    """A rendered image.

    Attributes:
        image: `uint8 [H, W, 3]` RGB at the full configured resolution.
        instance: `int64 [h, w]` labelled object index per rendered pixel (-1 background), at the
            render resolution (`scale` x full).
        scale: render scale relative to the full resolution.
        obj_visible: `int64 [M]` rendered pixels showing object m.
        obj_total: `int64 [M]` rendered pixels whose ray crosses object m at any depth (unoccluded).
    """

    image: np.ndarray
    instance: np.ndarray
    scale: float
    obj_visible: np.ndarray
    obj_total: np.ndarray


def camera_rays(calib: KittiCalibration, width: int, height: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rays of image_2 in the LiDAR frame.

    Returns:
        `(origin [1, 3], dirs [h * w, 3])` with `h, w = round(height * scale), round(width * scale)`;
        ray k goes through the centre of render pixel `(k // w, k % w)` (full-res coordinate
        `(j + 0.5) / scale - 0.5`, OpenCV convention: integer coordinates are pixel centres).
    """
    key = (calib.P2.tobytes(), calib.T_cam_lidar.tobytes(), int(width), int(height), float(scale))
    if key not in _RAY_CACHE:
        P = np.asarray(calib.P2, np.float64)
        K_inv = np.linalg.inv(P[:, :3])
        t = K_inv @ P[:, 3]  # P2 = K [I | t]
        w, h = int(round(width * scale)), int(round(height * scale))
        u = (np.arange(w) + 0.5) / scale - 0.5
        v = (np.arange(h) + 0.5) / scale - 0.5
        T = calib.T_lidar_cam
        M = T[:3, :3] @ K_inv  # pixel (u, v, 1) -> LiDAR-frame direction
        d = u[None, :, None] * M[:, 0] + v[:, None, None] * M[:, 1] + M[:, 2]
        d = d.reshape(-1, 3)
        d /= np.sqrt(np.einsum("ij,ij->i", d, d))[:, None]
        origin = T[:3, :3] @ (-t) + T[:3, 3]
        d.setflags(write=False)
        if len(_RAY_CACHE) > 8:
            _RAY_CACHE.clear()
        _RAY_CACHE[key] = (origin[None], d)
    return _RAY_CACHE[key]


def render_camera(scene: Scene, rng: np.random.Generator, cfg: CameraConfig | None = None) -> CameraRender:
    """Render image_2 of the scene.

    Args:
        scene: the scene.
        rng: random generator (pixel noise).
        cfg: renderer options (default `scene.config.camera`).

    Returns:
        `CameraRender`.
    """
    cfg = cfg or scene.config.camera
    origin, dirs = camera_rays(scene.calib, cfg.width, cfg.height, cfg.scale)
    h, w = int(round(cfg.height * cfg.scale)), int(round(cfg.width * cfg.scale))
    pr = scene.prims
    m = len(scene.boxes_lidar)
    hits = raycast(origin, dirs, pr.centre, pr.half, pr.yaw, scene.plane, 400.0, pr.obj, m)
    hit = hits.hit
    # sky
    up = np.clip(dirs[:, 2] * 4, 0, 1)[:, None]
    sky = _HORIZON * (1 - up) + _ZENITH * up
    rgb = sky.copy()
    got = hit != NO_HIT
    p = origin + dirs[got] * hits.t[got, None]
    idx, nrm = hit[got], hits.normal[got]
    albedo = np.empty((len(idx), 3))
    g = idx == GROUND
    albedo[g] = ground_material(scene, p[g])[0]
    albedo[~g] = box_material(scene, idx[~g], p[~g], nrm[~g])[0]
    lam = np.clip(nrm @ scene.sun, 0, 1)
    if cfg.shadows:
        lit = lam > 0
        sh = raycast(p[lit] + nrm[lit] * 1e-4, np.broadcast_to(scene.sun, (int(lit.sum()), 3)), pr.centre,
                     pr.half, pr.yaw, None, 200.0)
        lam[np.flatnonzero(lit)[sh.hit != NO_HIT]] = 0.0
    shade = 0.35 + 0.35 * np.clip(nrm[:, 2], 0, 1) + 0.8 * lam  # ambient (sky-facing brighter) + sun
    col = albedo * shade[:, None] * np.array([1.0, 0.98, 0.94])
    fog = 1 - np.exp(-hits.t[got] / 350.0)
    rgb[got] = col * (1 - fog[:, None]) + _HORIZON * fog[:, None]
    rgb = rgb.reshape(h, w, 3)
    if (h, w) != (cfg.height, cfg.width):
        from PIL import Image

        chans = [np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), mode="F")
                            .resize((cfg.width, cfg.height), Image.BILINEAR)) for c in range(3)]
        rgb = np.stack(chans, -1)
    img = rgb * 255 + (rng.normal(0, cfg.pixel_noise, rgb.shape) if cfg.pixel_noise > 0 else 0)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    obj = np.full(len(hit), -1, np.int64)
    box_hit = hit >= 0
    obj[box_hit] = pr.obj[hit[box_hit]]
    visible = np.bincount(obj[obj >= 0], minlength=m)[:m] if m else np.zeros(0, np.int64)
    return CameraRender(image, obj.reshape(h, w), float(cfg.scale), visible.astype(np.int64), hits.obj_total)
