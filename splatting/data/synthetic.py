"""A seeded, object-centric multi-view scene for Gaussian splatting, rendered by ray casting (numba).

The scene (world z up, units of metres): a few boxes and spheres with procedural textures
(checkers, stripes, value noise) standing on a textured ground disc at z = 0, lit by one
directional light plus ambient light (Lambertian: `albedo * (ambient + (1 - ambient) * max(0, n.l))`,
no shadows), in front of a plain (or vertical-gradient) background. Cameras sit on a ring of
varying elevation around the scene and look at its centre (OpenCV pinhole, see `orbit_cameras`).

Images are rendered with `samples_per_side ** 2` stratified samples per pixel (anti-aliasing:
Gaussian splats cannot reproduce aliasing, which would cap the reachable PSNR). Everything is
deterministic: the same seed and options give the same bytes.

`write_synthetic_scene` writes one scene in two formats at once, so that both readers can be
checked against each other::

    root/images/0000.png ...          RGB PNGs
    root/transforms.json              nerfstudio style (fl_x, fl_y, cx, cy, w, h, OpenGL transform_matrix,
                                      ply_file_path)
    root/points3D.ply                 the "SfM-like" initial point cloud (x, y, z, red, green, blue)
    root/sparse/0/{cameras,images,points3D}.txt   the same cameras and points as a COLMAP text model
    root/synthetic.json               the generator's options (to detect a stale scene)

Timing (2-core CPU, after numba's first compile, cached on disk): a 200x150 view with 16 samples
per pixel renders in about 0.05 s.
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numba
import numpy as np

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_folder
from perception3d.synthetic.raycast import slab_intersect
from splatting.data.colmap import write_colmap_text
from splatting.data.scene import CameraFrame
from splatting.data.transforms_json import write_transforms_json

__all__ = [
    "TEXTURE_KINDS",
    "Texture",
    "Box",
    "Sphere",
    "SyntheticScene",
    "make_synthetic_scene",
    "look_at",
    "orbit_cameras",
    "render_view",
    "cast_rays",
    "sample_surface_points",
    "synthetic_options",
    "read_synthetic_record",
    "write_synthetic_scene",
]

TEXTURE_KINDS = ("solid", "checker", "stripes", "noise", "checker_noise")
_BOX, _SPHERE, _DISC = 0, 1, 2
_NCOL = 19  # kind, centre(3), half/radius(3), cos yaw, sin yaw, texture kind, colour a(3), colour b(3), scale, seed,
# softness


@dataclass(frozen=True)
class Texture:
    """A procedural texture over a surface's local coordinates.

    Attributes:
        kind: "solid" (`color_a`), "checker" (cells of `scale` metres), "stripes" (diagonal bands
            of width `scale`), "noise" (2-octave value noise of cell `scale`, blending a -> b),
            "checker_noise" (checker whose brightness is modulated by value noise).
        color_a: RGB in [0, 1].
        color_b: RGB in [0, 1].
        scale: cell size, metres.
        seed: noise seed.
        softness: checker and stripe edges ramp smoothly over `softness` cells on each side (0: hard
            edges). Soft edges keep the images band-limited, which Gaussian splats fit quickly.
    """

    kind: str = "solid"
    color_a: tuple[float, float, float] = (0.8, 0.8, 0.8)
    color_b: tuple[float, float, float] = (0.2, 0.2, 0.2)
    scale: float = 0.25
    seed: int = 0
    softness: float = 0.0

    def __post_init__(self):
        if self.kind not in TEXTURE_KINDS:
            raise DataError(f"Texture.kind={self.kind!r}: expected one of {TEXTURE_KINDS}")
        if not self.scale > 0:
            raise DataError(f"Texture.scale={self.scale}: expected > 0")
        if not 0 <= self.softness <= 0.5:
            raise DataError(f"Texture.softness={self.softness}: expected within [0, 0.5] (cells)")


@dataclass(frozen=True)
class Box:
    """A box of edge lengths `size` (x, y, z) centred at `centre`, rotated by `yaw` radians about +z."""

    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float = 0.0
    texture: Texture = field(default_factory=Texture)


@dataclass(frozen=True)
class Sphere:
    """A sphere of `radius` metres centred at `centre`."""

    centre: tuple[float, float, float]
    radius: float
    texture: Texture = field(default_factory=Texture)


@dataclass(frozen=True)
class SyntheticScene:
    """Geometry, materials, light and background of a synthetic scene.

    Attributes:
        boxes, spheres: the objects.
        ground_radius: radius of the ground disc at z = 0 centred at the origin (0: no ground).
        ground_texture: its texture (over world x, y).
        light_dir: direction towards the light (normalised when used).
        ambient: ambient fraction in [0, 1].
        background_top, background_bottom: background RGB of rays looking straight up / down
            (linear blend in the ray's z; equal colours give a plain background).
        target: the point cameras look at.
    """

    boxes: tuple[Box, ...] = ()
    spheres: tuple[Sphere, ...] = ()
    ground_radius: float = 3.0
    ground_texture: Texture = field(default_factory=Texture)
    light_dir: tuple[float, float, float] = (0.45, 0.3, 0.84)
    ambient: float = 0.35
    background_top: tuple[float, float, float] = (1.0, 1.0, 1.0)
    background_bottom: tuple[float, float, float] = (1.0, 1.0, 1.0)
    target: tuple[float, float, float] = (0.0, 0.0, 0.35)

    def object_table(self) -> np.ndarray:
        """`float64 [O, 19]` packed objects for the kernels (boxes, spheres, then the ground disc)."""
        rows = []

        def tex(t: Texture) -> list[float]:
            return [TEXTURE_KINDS.index(t.kind), *t.color_a, *t.color_b, t.scale, t.seed, t.softness]

        for b in self.boxes:
            rows.append([_BOX, *b.centre, *(0.5 * np.asarray(b.size, np.float64)), math.cos(b.yaw),
                         math.sin(b.yaw), *tex(b.texture)])
        for s in self.spheres:
            rows.append([_SPHERE, *s.centre, s.radius, 0.0, 0.0, 1.0, 0.0, *tex(s.texture)])
        if self.ground_radius > 0:
            rows.append([_DISC, 0.0, 0.0, 0.0, self.ground_radius, 0.0, 0.0, 1.0, 0.0, *tex(self.ground_texture)])
        table = np.asarray(rows, np.float64).reshape(-1, _NCOL)
        if not np.isfinite(table).all():
            raise DataError("SyntheticScene: object parameters contain NaN or inf")
        return np.ascontiguousarray(table)

    def shading(self) -> np.ndarray:
        """`float64 [10]`: unit light direction (3), ambient, background top (3) and bottom (3)."""
        light = np.asarray(self.light_dir, np.float64)
        light = light / np.linalg.norm(light)
        return np.concatenate([light, [self.ambient], self.background_top, self.background_bottom]).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _hash01(ix, iy, iz, seed):  # pragma: no cover - numba
    h = ix * 374761393 + iy * 668265263 + iz * 1440662683 + seed * 2246822519
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF) / 16777216.0


@numba.njit(cache=True)
def _value_noise(x, y, z, seed):  # pragma: no cover - numba
    fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
    ix, iy, iz = np.int64(fx), np.int64(fy), np.int64(fz)
    tx, ty, tz = x - fx, y - fy, z - fz
    tx = tx * tx * (3.0 - 2.0 * tx)
    ty = ty * ty * (3.0 - 2.0 * ty)
    tz = tz * tz * (3.0 - 2.0 * tz)
    out = 0.0
    for dz in range(2):
        wz = tz if dz else 1.0 - tz
        for dy in range(2):
            wy = ty if dy else 1.0 - ty
            for dx in range(2):
                wx = tx if dx else 1.0 - tx
                out += wx * wy * wz * _hash01(ix + dx, iy + dy, iz + dz, seed)
    return out


@numba.njit(cache=True)
def _soft_step(parity, edge, softness):  # pragma: no cover - numba
    """Weight of colour b: `parity` (0 or 1) far from a cell edge, ramping to 0.5 at the edge.

    `edge` is the distance to the nearest cell edge in cell units (0 .. 0.5); the ramp is
    `softness` cells wide on each side, so the texture is continuous (band-limited edges).
    """
    if softness <= 0.0 or edge >= softness:
        return float(parity)
    t = edge / softness
    t = t * t * (3.0 - 2.0 * t)
    return 0.5 + (parity - 0.5) * t


@numba.njit(cache=True)
def _albedo(obj, qx, qy, qz):  # pragma: no cover - numba
    """Texture colour at local coordinates q (metres)."""
    kind = int(obj[9])
    s = obj[16]
    seed = np.int64(obj[17])
    soft = obj[18]
    x, y, z = qx / s, qy / s, qz / s
    w = 0.0  # weight of colour b
    bright = 1.0
    if kind == 1 or kind == 4:  # checker
        fx, fy, fz = math.floor(x), math.floor(y), math.floor(z)
        parity = (np.int64(fx) + np.int64(fy) + np.int64(fz)) & 1
        edge = min(min(0.5 - abs(x - fx - 0.5), 0.5 - abs(y - fy - 0.5)), 0.5 - abs(z - fz - 0.5))
        w = _soft_step(parity, edge, soft)
        if kind == 4:
            n = 0.65 * _value_noise(2.0 * x, 2.0 * y, 2.0 * z, seed) + 0.35 * _value_noise(5.0 * x, 5.0 * y, 5.0 * z,
                                                                                          seed + 1)
            bright = 0.75 + 0.5 * n
    elif kind == 2:  # stripes
        a = x + y + z
        fa = math.floor(a)
        w = _soft_step(np.int64(fa) & 1, 0.5 - abs(a - fa - 0.5), soft)
    elif kind == 3:  # noise
        w = 0.65 * _value_noise(x, y, z, seed) + 0.35 * _value_noise(2.7 * x, 2.7 * y, 2.7 * z, seed + 1)
    r = bright * ((1.0 - w) * obj[10] + w * obj[13])
    g = bright * ((1.0 - w) * obj[11] + w * obj[14])
    b = bright * ((1.0 - w) * obj[12] + w * obj[15])
    return r, g, b


@numba.njit(cache=True)
def _trace(ox, oy, oz, dx, dy, dz, objs):  # pragma: no cover - numba
    """Nearest hit of a unit ray: (t, object index or -1, normal (3) facing the ray, texture coords (3))."""
    best = np.inf
    best_i = -1
    nx = ny = nz = 0.0
    qx = qy = qz = 0.0
    for i in range(objs.shape[0]):
        kind = int(objs[i, 0])
        cx, cy, cz = objs[i, 1], objs[i, 2], objs[i, 3]
        if kind == 1:  # sphere
            r = objs[i, 4]
            lx, ly, lz = ox - cx, oy - cy, oz - cz
            b = lx * dx + ly * dy + lz * dz
            c = lx * lx + ly * ly + lz * lz - r * r
            disc = b * b - c
            if disc < 0.0:
                continue
            sq = math.sqrt(disc)
            t = -b - sq
            if t <= 1e-9:
                continue
            if t < best:
                best = t
                best_i = i
                px, py, pz = lx + t * dx, ly + t * dy, lz + t * dz
                nx, ny, nz = px / r, py / r, pz / r
                qx, qy, qz = px, py, pz
        elif kind == 2:  # ground disc z = cz
            if -1e-12 < dz < 1e-12:
                continue
            t = (cz - oz) / dz
            if t <= 1e-9 or t >= best:
                continue
            px, py = ox + t * dx, oy + t * dy
            if (px - cx) * (px - cx) + (py - cy) * (py - cy) > objs[i, 4] * objs[i, 4]:
                continue
            best = t
            best_i = i
            nx, ny, nz = 0.0, 0.0, (1.0 if dz < 0 else -1.0)
            qx, qy, qz = px, py, 0.5 * objs[i, 16]
        else:  # box rotated by yaw about z
            cs, sn = objs[i, 7], objs[i, 8]
            rx, ry, rz = ox - cx, oy - cy, oz - cz
            lo0 = cs * rx + sn * ry
            lo1 = -sn * rx + cs * ry
            lo2 = rz
            ld0 = cs * dx + sn * dy
            ld1 = -sn * dx + cs * dy
            ld2 = dz
            tmin, tmax, axis, sign = slab_intersect(lo0, lo1, lo2, ld0, ld1, ld2, objs[i, 4], objs[i, 5], objs[i, 6])
            if tmin > tmax or tmin <= 1e-9 or tmin >= best:
                continue
            best = tmin
            best_i = i
            p0, p1, p2 = lo0 + tmin * ld0, lo1 + tmin * ld1, lo2 + tmin * ld2
            half_cell = 0.5 * objs[i, 16]  # the face's own axis sits mid-cell: never a texture edge
            if axis == 0:
                nx, ny, nz = sign * cs, sign * sn, 0.0
                qx, qy, qz = half_cell, p1, p2
            elif axis == 1:
                nx, ny, nz = -sign * sn, sign * cs, 0.0
                qx, qy, qz = p0, half_cell, p2
            else:
                nx, ny, nz = 0.0, 0.0, sign
                qx, qy, qz = p0, p1, half_cell
    return best, best_i, nx, ny, nz, qx, qy, qz


@numba.njit(cache=True)
def _shade(ox, oy, oz, dx, dy, dz, objs, shading):  # pragma: no cover - numba
    """(r, g, b, t, hit index) of one ray."""
    t, i, nx, ny, nz, qx, qy, qz = _trace(ox, oy, oz, dx, dy, dz, objs)
    if i < 0:
        w = 0.5 + 0.5 * dz
        return ((1.0 - w) * shading[7] + w * shading[4], (1.0 - w) * shading[8] + w * shading[5],
                (1.0 - w) * shading[9] + w * shading[6], t, i)
    ar, ag, ab = _albedo(objs[i], qx, qy, qz)
    ndl = nx * shading[0] + ny * shading[1] + nz * shading[2]
    lam = shading[3] + (1.0 - shading[3]) * max(ndl, 0.0)
    return ar * lam, ag * lam, ab * lam, t, i


@numba.njit(cache=True)
def _render(c2w, K, width, height, sps, objs, shading):  # pragma: no cover - numba
    img = np.zeros((height, width, 3))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    ox, oy, oz = c2w[0, 3], c2w[1, 3], c2w[2, 3]
    inv = 1.0 / (sps * sps)
    for v in range(height):
        for u in range(width):
            r = g = b = 0.0
            for sy in range(sps):
                yc = (v + (sy + 0.5) / sps - cy) / fy
                for sx in range(sps):
                    xc = (u + (sx + 0.5) / sps - cx) / fx
                    dx = c2w[0, 0] * xc + c2w[0, 1] * yc + c2w[0, 2]
                    dy = c2w[1, 0] * xc + c2w[1, 1] * yc + c2w[1, 2]
                    dz = c2w[2, 0] * xc + c2w[2, 1] * yc + c2w[2, 2]
                    nrm = math.sqrt(dx * dx + dy * dy + dz * dz)
                    cr, cg, cb, _, _ = _shade(ox, oy, oz, dx / nrm, dy / nrm, dz / nrm, objs, shading)
                    r += cr
                    g += cg
                    b += cb
            img[v, u, 0] = r * inv
            img[v, u, 1] = g * inv
            img[v, u, 2] = b * inv
    return img


@numba.njit(cache=True)
def _cast(origins, dirs, objs, shading):  # pragma: no cover - numba
    n = dirs.shape[0]
    t_out = np.full(n, np.inf)
    hit = np.full(n, -1, np.int64)
    rgb = np.zeros((n, 3))
    for k in range(n):
        o = 0 if origins.shape[0] == 1 else k
        r, g, b, t, i = _shade(origins[o, 0], origins[o, 1], origins[o, 2], dirs[k, 0], dirs[k, 1], dirs[k, 2],
                               objs, shading)
        t_out[k] = t
        hit[k] = i
        rgb[k, 0], rgb[k, 1], rgb[k, 2] = r, g, b
    return t_out, hit, rgb


# ------------------------------------------------------------------------------------------------
# scene and cameras
# ------------------------------------------------------------------------------------------------
def _colour(rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """A saturated colour and a contrasting second colour (HSV picks)."""
    h = float(rng.uniform(0, 1))
    a = colorsys.hsv_to_rgb(h, float(rng.uniform(0.55, 0.85)), float(rng.uniform(0.65, 0.9)))
    b = colorsys.hsv_to_rgb((h + float(rng.uniform(0.3, 0.7))) % 1.0, float(rng.uniform(0.2, 0.6)),
                            float(rng.uniform(0.25, 0.55)))
    return tuple(round(c, 4) for c in a), tuple(round(c, 4) for c in b)


def make_synthetic_scene(seed: int = 0, num_boxes: int = 3, num_spheres: int = 2,
                         ground_radius: float = 3.0, background_rgb: Sequence[float] = (1.0, 1.0, 1.0),
                         softness: float = 0.25) -> SyntheticScene:
    """A random (seeded) arrangement of boxes and spheres on a textured ground disc.

    Objects stand on the ground (boxes with their bottom at z = 0, spheres touching it) within 1.9 m
    of the origin, without overlapping; textures cycle through checker, stripes and noise (cells of
    0.13-0.26 m on objects, 0.65 m on the ground, edges softened by `softness` cells).
    """
    rng = np.random.default_rng(seed)
    kinds = ["checker", "stripes", "noise"]
    placed: list[tuple[float, float, float]] = []  # (x, y, footprint radius)

    def place(radius: float) -> tuple[float, float]:
        for _ in range(1000):
            x, y = rng.uniform(-1.5, 1.5, size=2)
            if math.hypot(x, y) + radius > 1.9:
                continue
            if all(math.hypot(x - px, y - py) > radius + pr + 0.1 for px, py, pr in placed):
                placed.append((float(x), float(y), radius))
                return float(x), float(y)
        raise DataError(f"make_synthetic_scene: cannot place {num_boxes} boxes and {num_spheres} spheres "
                        "without overlap; use fewer objects")

    boxes, spheres = [], []
    for i in range(num_boxes):
        size = (float(rng.uniform(0.45, 0.9)), float(rng.uniform(0.45, 0.9)), float(rng.uniform(0.4, 1.0)))
        x, y = place(0.5 * math.hypot(size[0], size[1]))
        a, b = _colour(rng)
        tex = Texture(kinds[i % 3], a, b, float(rng.uniform(0.16, 0.26)), int(rng.integers(0, 2**31)), softness)
        boxes.append(Box((x, y, 0.5 * size[2]), size, float(rng.uniform(-math.pi, math.pi)), tex))
    for i in range(num_spheres):
        r = float(rng.uniform(0.25, 0.45))
        x, y = place(r)
        a, b = _colour(rng)
        tex = Texture(kinds[(i + 1 + num_boxes) % 3], a, b, float(rng.uniform(0.13, 0.2)), int(rng.integers(0, 2**31)),
                      softness)
        spheres.append(Sphere((x, y, r), r, tex))
    ground = Texture("checker_noise", (0.62, 0.58, 0.5), (0.42, 0.45, 0.38), 0.65, int(rng.integers(0, 2**31)),
                     softness)
    bg = tuple(float(c) for c in background_rgb)
    return SyntheticScene(tuple(boxes), tuple(spheres), ground_radius, ground, background_top=bg,
                          background_bottom=bg)


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """`float64 [4, 4]` OpenCV camera -> world for a camera at `eye` looking at `target`.

    The camera's x axis (right) is horizontal (perpendicular to `up`), y points down, z at the target.
    """
    eye = np.asarray(eye, np.float64)
    forward = np.asarray(target, np.float64) - eye
    norm = np.linalg.norm(forward)
    if norm == 0:
        raise DataError("look_at: eye and target coincide")
    forward /= norm
    right = np.cross(forward, np.asarray(up, np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise DataError("look_at: the viewing direction is parallel to `up`")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_cameras(num_views: int, width: int, height: int, seed: int = 0, radius: float = 4.5,
                  fov_x_deg: float = 55.0, elevation_deg: tuple[float, float] = (15.0, 55.0),
                  target: Sequence[float] = (0.0, 0.0, 0.35),
                  arc_deg: float = 360.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cameras on a ring (or an arc of `arc_deg` of it) of varying elevation around `target`, all
    looking at it.

    View i has azimuth `arc i / num_views` (plus a small seeded jitter), an elevation spread over
    `elevation_deg` by the golden ratio (on an arc, over the middle `arc / 360` of that range, so
    that neighbouring views stay as close as on the ring), a distance `radius` +- 5 %, square
    pixels and the principal point at the image centre.

    Returns:
        `[(camtoworld float64 [4, 4], K float64 [3, 3])]` per view.
    """
    if not 0.0 < arc_deg <= 360.0:
        raise DataError(f"orbit_cameras: arc_deg={arc_deg!r}: expected an angle in (0, 360]")
    if num_views < 1 or width < 1 or height < 1:
        raise DataError(f"orbit_cameras: need num_views, width, height >= 1; got {num_views}, {width}, {height}")
    rng = np.random.default_rng([seed, 1])
    f = 0.5 * width / math.tan(math.radians(0.5 * fov_x_deg))
    K = np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])
    lo, hi = (math.radians(e) for e in elevation_deg)
    shrink = 0.5 * (hi - lo) * (1.0 - arc_deg / 360.0)
    lo, hi = lo + shrink, hi - shrink
    target = np.asarray(target, np.float64)
    out = []
    for i in range(num_views):
        arc = math.radians(arc_deg)
        az = arc * i / num_views + float(rng.uniform(-0.3, 0.3)) * 0.5 * arc / num_views
        el = lo + (hi - lo) * ((i * 0.6180339887498949 + 0.5) % 1.0)
        d = radius * float(rng.uniform(0.95, 1.05))
        eye = target + d * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        out.append((look_at(eye, target), K.copy()))
    return out


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
def render_view(scene: SyntheticScene, camtoworld: np.ndarray, K: np.ndarray, width: int, height: int,
                samples_per_side: int = 4) -> np.ndarray:
    """Ray-cast one view.

    Args:
        scene: the scene.
        camtoworld: `[4, 4]` OpenCV camera -> world.
        K: `[3, 3]` pinhole intrinsics (pixel `u`'s centre at `u + 0.5`; skew ignored).
        width, height: image size, pixels.
        samples_per_side: `s`: `s x s` stratified samples per pixel, averaged.

    Returns:
        `float64 [H, W, 3]` linear RGB (values of lit colours stay within [0, 1] for albedos <= 0.8).
    """
    if samples_per_side < 1:
        raise DataError(f"samples_per_side={samples_per_side}: expected >= 1")
    c2w = np.ascontiguousarray(np.asarray(camtoworld, np.float64))
    return _render(c2w, np.ascontiguousarray(np.asarray(K, np.float64)), int(width), int(height),
                   int(samples_per_side), scene.object_table(), scene.shading())


def cast_rays(scene: SyntheticScene, origins: np.ndarray,
              dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shade single rays.

    Args:
        origins: `[1, 3]` (shared) or `[R, 3]`; dirs: `[R, 3]` unit directions.

    Returns:
        `(t [R] distance (inf on a miss), hit [R] int64 object row (-1: background), rgb [R, 3] float64)`;
        rows are boxes, then spheres, then the ground disc.
    """
    o = np.ascontiguousarray(np.asarray(origins, np.float64).reshape(-1, 3))
    d = np.ascontiguousarray(np.asarray(dirs, np.float64).reshape(-1, 3))
    return _cast(o, d, scene.object_table(), scene.shading())


def sample_surface_points(scene: SyntheticScene, cameras: Sequence[tuple[np.ndarray, np.ndarray]], width: int,
                          height: int, num_points: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An "SfM-like" point cloud: surface points seen by the cameras, with their shaded colours.

    Casts random rays through each camera's image, keeps the hits (at most `num_points`, a seeded
    subset), and returns their positions and colours, so every point is visible in some view.

    Returns:
        `(xyz float32 [P, 3], rgb uint8 [P, 3])`, `P <= num_points`.
    """
    rng = np.random.default_rng([seed, 2])
    per_view = max(1, math.ceil(3 * num_points / max(len(cameras), 1)))
    xyz, rgb = [], []
    for c2w, K in cameras:
        u = rng.uniform(0, width, per_view)
        v = rng.uniform(0, height, per_view)
        d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(per_view)], axis=1)
        d = d_cam @ c2w[:3, :3].T
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        t, hit, col = cast_rays(scene, c2w[None, :3, 3], d)
        keep = hit >= 0
        xyz.append(c2w[:3, 3] + t[keep, None] * d[keep])
        rgb.append(col[keep])
    xyz_all = np.concatenate(xyz) if xyz else np.zeros((0, 3))
    rgb_all = np.concatenate(rgb) if rgb else np.zeros((0, 3))
    if len(xyz_all) > num_points:
        idx = np.sort(rng.choice(len(xyz_all), num_points, replace=False))
        xyz_all, rgb_all = xyz_all[idx], rgb_all[idx]
    return xyz_all.astype(np.float32), _to_uint8(rgb_all)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# on disk
# ------------------------------------------------------------------------------------------------
def synthetic_options(seed: int = 0, num_views: int = 40, width: int = 200, height: int = 150, num_points: int = 4000,
                      samples_per_side: int = 4, background_rgb: Sequence[float] = (1.0, 1.0, 1.0),
                      arc_deg: float = 360.0) -> dict:
    """The generator settings `write_synthetic_scene` records in `root/synthetic.json` (checked here).

    ``arc_deg`` is recorded only when the cameras span less than the full ring, so that the records
    of full-ring scenes written before the option existed still match.

    Raises:
        DataError: a setting no scene can be made with (no views, an empty image, no points, ...),
            naming it; raised before anything is written.
    """
    def whole(name: str, v, low: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise DataError(f"synthetic scene: {name}={v!r}: expected a whole number >= {low}")
        return int(v)

    bg = [float(c) for c in background_rgb]
    if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
        raise DataError(f"synthetic scene: background_rgb={tuple(background_rgb)!r}: expected 3 numbers in [0, 1]")
    if isinstance(arc_deg, bool) or not isinstance(arc_deg, (int, float)) or not 0.0 < arc_deg <= 360.0:
        raise DataError(f"synthetic scene: arc_deg={arc_deg!r}: expected an angle in (0, 360]")
    arc = {} if arc_deg == 360.0 else {"arc_deg": float(arc_deg)}
    return {"generator": "splatting.data.synthetic", "version": 1, "seed": whole("seed", seed, 0),
            "num_views": whole("num_views", num_views, 1), "width": whole("width", width, 1),
            "height": whole("height", height, 1), "num_points": whole("num_points", num_points, 1),
            "samples_per_side": whole("samples_per_side", samples_per_side, 1), "background_rgb": bg, **arc}


def read_synthetic_record(root: str | Path) -> dict | None:
    """The settings recorded in `root/synthetic.json`, or None when there is no such file.

    Raises:
        DataError: the file exists but is not a JSON object.
    """
    meta = Path(root) / "synthetic.json"
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{meta}: not a valid synthetic scene record ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{meta}: not a valid synthetic scene record (expected a JSON object)")
    return record


def write_synthetic_scene(root: str | Path, seed: int = 0, num_views: int = 40, width: int = 200, height: int = 150,
                          num_points: int = 4000, samples_per_side: int = 4,
                          background_rgb: Sequence[float] = (1.0, 1.0, 1.0), exist_ok: bool = False,
                          arc_deg: float = 360.0) -> Path:
    """Generate a synthetic scene and write it as transforms.json + COLMAP text (see the module docstring).

    Writing goes into a temporary sibling folder of its own (`perception3d.io.atomic_folder`),
    renamed onto `root` at the end, so an interrupted or failed run leaves no half-written scene, and
    two processes generating the same scene at once never see each other's files: the first rename
    wins, the other finds the finished scene (with `exist_ok`) and discards its copy. Same arguments
    -> identical bytes. The settings are recorded in `root/synthetic.json`, written last.

    Args:
        root: output folder (must not exist, unless `exist_ok`).
        seed: scene, camera and point seed.
        num_views: number of cameras.
        width, height: image size, pixels.
        num_points: size of the initial point cloud.
        samples_per_side: anti-aliasing, `s x s` samples per pixel.
        background_rgb: plain background colour.
        arc_deg: the cameras' azimuths span this much of the ring (360: all around; less: a
            frontal arc, as in sparse-view benchmarks).
        exist_ok: return `root` untouched when it already holds a scene generated with the same
            arguments (its `synthetic.json` matches).

    Returns:
        `root`.

    Raises:
        DataError: invalid settings (checked before anything is written).
        FileExistsError: `root` exists (and, with `exist_ok`, was not made with these arguments).
        OSError: `root` cannot be created (its parent is a file, or not writable).
    """
    from PIL import Image

    from perception3d.io.pointcloud import write_ply

    root = Path(root)
    options = synthetic_options(seed, num_views, width, height, num_points, samples_per_side, background_rgb, arc_deg)

    def existing() -> Path:
        if exist_ok and read_synthetic_record(root) == options:
            return root
        raise FileExistsError(f"{root}: already exists" + (f" and was not generated with {options}" if exist_ok else
                                                            " (pass exist_ok=True to reuse a matching scene)"))

    if root.exists():
        return existing()
    scene = make_synthetic_scene(seed, background_rgb=background_rgb)
    cameras = orbit_cameras(num_views, width, height, seed=seed, target=scene.target, arc_deg=arc_deg)
    try:
        with atomic_folder(root) as tmp:
            (tmp / "images").mkdir()
            frames, names = [], []
            for i, (c2w, K) in enumerate(cameras):
                name = f"{i:04d}.png"
                img = render_view(scene, c2w, K, width, height, samples_per_side)
                Image.fromarray(_to_uint8(img)).save(tmp / "images" / name, format="PNG")
                frames.append(CameraFrame(name=name, image_path=root / "images" / name, camtoworld=c2w, K=K,
                                          width=width, height=height))
                names.append(name)
            xyz, rgb = sample_surface_points(scene, cameras, width, height, num_points, seed)
            write_colmap_text(tmp / "sparse" / "0", frames, xyz, rgb)
            write_ply(tmp / "points3D.ply", {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "red": rgb[:, 0],
                                             "green": rgb[:, 1], "blue": rgb[:, 2]})
            write_transforms_json(tmp / "transforms.json", frames, image_names=[f"images/{n}" for n in names],
                                  ply_file_path="points3D.ply")
            (tmp / "synthetic.json").write_text(json.dumps(options, indent=2) + "\n")
    except FileExistsError:  # another process generated its scene there first
        return existing()
    return root
