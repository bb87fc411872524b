"""Seeded synthetic street scenes built from boxes (LiDAR frame, ground at z = -1.73 m).

A scene is a road along +x with sidewalks, buildings, fences, poles and trees (unlabelled
distractors) and 5-25 labelled objects (Car, Pedestrian, Cyclist) built as box compositions (car:
wheels + body + cabin; pedestrian: legs + torso + arms + head; cyclist: wheels + frame + rider). Each
object's label box is the exact tight box of its parts. Footprints never overlap.

Everything is drawn from one `numpy.random.Generator` seeded with `seed`, so the same seed gives
the same scene (and, through `synthetic.dataset`, the same bytes on disk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from perception3d.geometry.camera import KittiCalibration

__all__ = [
    "LidarConfig",
    "CameraConfig",
    "RadarConfig",
    "SceneConfig",
    "Primitives",
    "Scene",
    "generate_scene",
    "kitti_like_calibration",
    "CLASS_SIZE_STATS",
]

# (mean, std) of (length, width, height) in metres, KITTI-like
CLASS_SIZE_STATS = {
    "Car": ((3.9, 0.4), (1.6, 0.1), (1.5, 0.15)),
    "Pedestrian": ((0.8, 0.2), (0.6, 0.1), (1.75, 0.1)),
    "Cyclist": ((1.75, 0.2), (0.6, 0.1), (1.75, 0.1)),
}

# texture codes of primitives (used by the camera shader)
TEX_PLAIN, TEX_BUILDING, TEX_CANOPY, TEX_GLASS = 0, 1, 2, 3


@dataclass(frozen=True)
class LidarConfig:
    """Velodyne HDL-64E-like scanner.

    Attributes:
        height_m: mount height above the ground (the LiDAR frame origin).
        upper_deg / lower_deg: elevation span of the upper 32 and lower 32 beams, degrees.
        azimuth_step_deg: horizontal resolution.
        fov_deg: half-width of the scanned azimuth range around +x (KITTI frames are cropped to the
            camera; 180 scans the full circle).
        crop_to_image: keep only points that project into image_2 (KITTI "reduced" velodyne).
        max_range_m: maximum range.
        range_noise_m: Gaussian range noise sigma.
        dropout: probability of a lost return (plus a range-dependent part for dark surfaces).
        intensity_noise: Gaussian noise on reflectance.
    """

    height_m: float = 1.73
    upper_deg: tuple[float, float] = (2.0, -8.33)
    lower_deg: tuple[float, float] = (-8.83, -24.8)
    azimuth_step_deg: float = 0.15
    fov_deg: float = 45.0
    crop_to_image: bool = True
    max_range_m: float = 80.0
    range_noise_m: float = 0.02
    dropout: float = 0.07
    intensity_noise: float = 0.03


@dataclass(frozen=True)
class CameraConfig:
    """image_2 renderer. `scale` renders at a fraction of 1242x375 and upsamples (speed)."""

    width: int = 1242
    height: int = 375
    scale: float = 1.0
    shadows: bool = True
    pixel_noise: float = 2.0  # sigma in 8-bit levels


@dataclass(frozen=True)
class RadarConfig:
    """Automotive radar: a few points per object plus clutter, within `fov_deg` and `max_range_m`."""

    fov_deg: float = 50.0
    max_range_m: float = 100.0
    points_per_class: tuple[int, int, int] = (5, 2, 3)  # max points for Car, Pedestrian, Cyclist
    position_noise_m: float = 0.3
    velocity_noise_mps: float = 0.1
    clutter: tuple[int, int] = (3, 12)


@dataclass(frozen=True)
class SceneConfig:
    """Scene generator options.

    Attributes:
        num_objects: inclusive range of labelled objects per scene.
        class_probs: sampling probabilities of Car, Pedestrian, Cyclist.
        x_range_m: forward range of object centres.
        max_lateral_m: max |y| of object centres.
        object_fov_deg: object centres lie within this azimuth of +x (so they are mostly in view).
        ground_slope: max |slope| of the ground plane along x and y (dimensionless).
        random_yaw_fraction: fraction of cars placed off-road with a uniformly random yaw.
        num_poles / num_trees / num_clutter: inclusive ranges of distractors.
        lidar / camera / radar: sensor options.
    """

    num_objects: tuple[int, int] = (5, 25)
    class_probs: tuple[float, float, float] = (0.6, 0.25, 0.15)
    x_range_m: tuple[float, float] = (4.0, 70.0)
    max_lateral_m: float = 35.0
    object_fov_deg: float = 40.0
    ground_slope: float = 0.01
    random_yaw_fraction: float = 0.15
    num_poles: tuple[int, int] = (3, 12)
    num_trees: tuple[int, int] = (2, 8)
    num_clutter: tuple[int, int] = (2, 10)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    radar: RadarConfig = field(default_factory=RadarConfig)


@dataclass(frozen=True)
class Primitives:
    """Boxes of a scene, axis-aligned in their own frame.

    Attributes:
        centre: `[B, 3]` metres; half: `[B, 3]` half sizes; yaw: `[B]` radians.
        obj: `[B]` int64 index of the labelled object owning the box, -1 for static boxes
            (objects' boxes are contiguous).
        albedo: `[B, 3]` RGB in [0, 1]; refl: `[B]` LiDAR reflectivity in [0, 1]; tex: `[B]` texture code.
    """

    centre: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    obj: np.ndarray
    albedo: np.ndarray
    refl: np.ndarray
    tex: np.ndarray

    def __len__(self) -> int:
        return int(self.centre.shape[0])


@dataclass(frozen=True)
class Scene:
    """A generated scene (LiDAR frame).

    Attributes:
        boxes_lidar: `[M, 7]` float64 tight label boxes `(x, y, z, dx, dy, dz, yaw)`.
        classes: `[M]` class names.
        velocity: `[M, 2]` object velocity (vx, vy) m/s in the LiDAR frame.
        prims: all boxes (objects first, then static structures).
        plane: ground plane `(nx, ny, nz, d)` with `n . p = d`, unit normal pointing up.
        road_half_m / sidewalk_m: road half width and sidewalk width (ground texture).
        sun: `[3]` unit direction towards the sun.
        calib: camera/LiDAR calibration.
        config: the generating config.
    """

    boxes_lidar: np.ndarray
    classes: np.ndarray
    velocity: np.ndarray
    prims: Primitives
    plane: np.ndarray
    road_half_m: float
    sidewalk_m: float
    sun: np.ndarray
    calib: KittiCalibration
    config: SceneConfig

    def ground_z(self, xy: np.ndarray) -> np.ndarray:
        """Ground height `[N]` at `xy [N, 2]`."""
        n, d = self.plane[:3], self.plane[3]
        return (d - xy[:, 0] * n[0] - xy[:, 1] * n[1]) / n[2]


def kitti_like_calibration() -> KittiCalibration:
    """KITTI-like calibration: P2 of the real rig, R0_rect identity, axis-swap Tr_velo_to_cam + offset."""
    P2 = np.array([[721.5377, 0.0, 609.5593, 44.85728],
                   [0.0, 721.5377, 172.854, 0.2163791],
                   [0.0, 0.0, 1.0, 0.002745884]])
    Tr = np.array([[0.0, -1.0, 0.0, -0.00407],
                   [0.0, 0.0, -1.0, -0.07632],
                   [1.0, 0.0, 0.0, -0.27178]])
    return KittiCalibration(P2, np.eye(3), Tr)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _bev_corners(boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """`[K, 7]` boxes -> `[K, 4, 2]` BEV corners (footprint grown by `margin` on each side)."""
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    hx, hy = boxes[:, 3] / 2 + margin, boxes[:, 4] / 2 + margin
    lx = np.stack([hx, -hx, -hx, hx], 1)
    ly = np.stack([hy, hy, -hy, -hy], 1)
    return np.stack([boxes[:, None, 0] + lx * c[:, None] - ly * s[:, None],
                     boxes[:, None, 1] + lx * s[:, None] + ly * c[:, None]], -1)


def bev_overlaps(box: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Separating-axis test: does the BEV footprint of `box [7]` overlap each of `boxes [K, 7]`? -> `[K]` bool."""
    if len(boxes) == 0:
        return np.zeros(0, bool)
    a = _bev_corners(box[None], margin)  # [1, 4, 2]
    b = _bev_corners(boxes, margin)  # [K, 4, 2]
    yaws = np.concatenate([np.broadcast_to(box[6], (len(boxes), 1)), boxes[:, 6:7]], 1)
    axes = np.concatenate([np.stack([np.cos(yaws), np.sin(yaws)], -1),
                           np.stack([-np.sin(yaws), np.cos(yaws)], -1)], 1)  # [K, 4, 2]
    pa = np.einsum("kac,kpc->kap", axes, np.broadcast_to(a, b.shape))  # [K, 4 axes, 4 pts]
    pb = np.einsum("kac,kpc->kap", axes, b)
    separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return ~separated.any(1)


class _Builder:
    """Accumulates primitives (boxes given by centre, size, yaw in the scene frame)."""

    def __init__(self):
        self.rows: list[tuple] = []

    def add(self, centre, size, yaw, obj, albedo, refl, tex=TEX_PLAIN):
        self.rows.append((np.asarray(centre, float), np.asarray(size, float) / 2, float(yaw), int(obj),
                          np.clip(np.asarray(albedo, float), 0, 1), float(np.clip(refl, 0, 1)), int(tex)))

    def add_local(self, box: np.ndarray, local_min, local_max, obj, albedo, refl, tex=TEX_PLAIN):
        """Add a part given by its min/max corner in the object frame (origin: bottom centre of `box`)."""
        lo, hi = np.asarray(local_min, float), np.asarray(local_max, float)
        mid = (lo + hi) / 2
        c, s = np.cos(box[6]), np.sin(box[6])
        bottom = np.array([box[0], box[1], box[2] - box[5] / 2])
        centre = bottom + np.array([c * mid[0] - s * mid[1], s * mid[0] + c * mid[1], mid[2]])
        self.add(centre, hi - lo, box[6], obj, albedo, refl, tex)

    def build(self) -> Primitives:
        if not self.rows:
            z3 = np.zeros((0, 3))
            return Primitives(z3, z3, np.zeros(0), np.zeros(0, np.int64), z3, np.zeros(0), np.zeros(0, np.int8))
        cols = list(zip(*self.rows))
        return Primitives(np.stack(cols[0]), np.stack(cols[1]), np.array(cols[2]), np.array(cols[3], np.int64),
                          np.stack(cols[4]), np.array(cols[5]), np.array(cols[6], np.int8))


def _car_parts(bld: _Builder, box: np.ndarray, obj: int, rng: np.random.Generator) -> None:
    l, w, h = box[3], box[4], box[5]
    paint = rng.choice([[0.8, 0.8, 0.82], [0.1, 0.1, 0.12], [0.6, 0.08, 0.08], [0.15, 0.2, 0.5],
                        [0.55, 0.56, 0.58], [0.85, 0.75, 0.3], [0.2, 0.4, 0.25]]) * rng.uniform(0.85, 1.1)
    refl = rng.uniform(0.25, 0.6)
    r = rng.uniform(0.3, 0.36)  # wheel radius
    clear = r * 0.8
    body_top = h * rng.uniform(0.52, 0.6)
    # wheels: touch the ground (z = 0) and the box sides
    wx = l / 2 - rng.uniform(0.6, 0.8)
    for sx in (-1, 1):
        for sy in (-1, 1):
            xc = sx * wx
            y0, y1 = (w / 2 - 0.22, w / 2) if sy > 0 else (-w / 2, -w / 2 + 0.22)
            bld.add_local(box, (xc - r, y0, 0.0), (xc + r, y1, 2 * r * 0.95), obj, [0.05, 0.05, 0.05], 0.05)
    # body: full length and width
    bld.add_local(box, (-l / 2, -w / 2 + 0.03, clear), (l / 2, w / 2 - 0.03, body_top), obj, paint, refl)
    # cabin: shorter and narrower, reaches the full height
    c0 = -l / 2 + l * rng.uniform(0.18, 0.3)
    c1 = l / 2 - l * rng.uniform(0.25, 0.38)
    bld.add_local(box, (c0, -w / 2 + 0.1, body_top), (c1, w / 2 - 0.1, h), obj, [0.08, 0.1, 0.13], refl * 0.4,
                  TEX_GLASS)


def _pedestrian_parts(bld: _Builder, box: np.ndarray, obj: int, rng: np.random.Generator) -> None:
    l, w, h = box[3], box[4], box[5]
    shirt = rng.uniform(0.1, 0.9, 3)
    trousers = rng.uniform(0.05, 0.4, 3)
    skin = np.array([0.8, 0.6, 0.45]) * rng.uniform(0.5, 1.1)
    refl = rng.uniform(0.1, 0.3)
    leg_top = 0.47 * h
    # legs in stride: spanning the full length
    ly = min(0.18, w / 2)
    bld.add_local(box, (-l / 2, -ly, 0.0), (-l / 2 + 0.16, -0.02, leg_top), obj, trousers, refl)
    bld.add_local(box, (l / 2 - 0.16, 0.02, 0.0), (l / 2, ly, leg_top), obj, trousers, refl)
    # torso, arms (full width), head (full height)
    tor = min(0.32, l)
    bld.add_local(box, (-tor / 2, -w / 2 + 0.1, leg_top), (tor / 2, w / 2 - 0.1, 0.83 * h), obj, shirt, refl)
    bld.add_local(box, (-0.08, -w / 2, 0.5 * h), (0.08, -w / 2 + 0.1, 0.8 * h), obj, shirt, refl)
    bld.add_local(box, (-0.08, w / 2 - 0.1, 0.5 * h), (0.08, w / 2, 0.8 * h), obj, shirt, refl)
    bld.add_local(box, (-0.1, -0.09, 0.86 * h), (0.1, 0.09, h), obj, skin, refl)


def _cyclist_parts(bld: _Builder, box: np.ndarray, obj: int, rng: np.random.Generator) -> None:
    l, w, h = box[3], box[4], box[5]
    frame_col = rng.uniform(0.1, 0.9, 3)
    shirt = rng.uniform(0.1, 0.9, 3)
    refl = rng.uniform(0.15, 0.4)
    rw = min(0.68, l / 2.3)  # wheel diameter
    bld.add_local(box, (-l / 2, -0.03, 0.0), (-l / 2 + rw, 0.03, rw), obj, [0.05, 0.05, 0.05], 0.1)
    bld.add_local(box, (l / 2 - rw, -0.03, 0.0), (l / 2, 0.03, rw), obj, [0.05, 0.05, 0.05], 0.1)
    bld.add_local(box, (-l / 2 + rw / 2, -0.04, rw * 0.5), (l / 2 - rw / 2, 0.04, rw * 1.2), obj, frame_col, refl)
    seat = 0.55 * h
    # rider: legs to the pedals, torso leaning forward, arms to the handlebar, head
    bld.add_local(box, (-0.25, -0.15, rw * 0.45), (0.05, 0.15, seat), obj, shirt * 0.4, refl)
    bld.add_local(box, (-0.3, -w / 2, seat), (0.15, w / 2, 0.85 * h), obj, shirt, refl)
    ay = min(0.2, w / 2)
    bld.add_local(box, (0.15, -ay, 0.68 * h), (l / 2 - rw / 2 + 0.05, ay, 0.78 * h), obj, shirt, refl)
    bld.add_local(box, (-0.15, -0.1, 0.87 * h), (0.07, 0.1, h), obj, [0.2, 0.2, 0.2], refl)


_PARTS = {"Car": _car_parts, "Pedestrian": _pedestrian_parts, "Cyclist": _cyclist_parts}


def _sample_size(cls: str, rng: np.random.Generator) -> np.ndarray:
    stats = CLASS_SIZE_STATS[cls]
    return np.array([np.clip(rng.normal(m, s), m - 2.5 * s, m + 2.5 * s) for m, s in stats])


# ------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------
def generate_scene(seed: int | Sequence[int], cfg: SceneConfig = SceneConfig()) -> Scene:
    """Generate one scene.

    Args:
        seed: an int or a sequence of ints (e.g. `(dataset_seed, frame_index)`) for
            `numpy.random.default_rng`.
        cfg: generator options.

    Returns:
        A `Scene` with `M in cfg.num_objects` labelled objects.
    """
    rng = np.random.default_rng(seed)
    h0 = cfg.lidar.height_m
    sx, sy = rng.uniform(-cfg.ground_slope, cfg.ground_slope, 2)
    n = np.array([-sx, -sy, 1.0])
    n /= np.linalg.norm(n)
    plane = np.array([*n, -h0 * n[2]])  # passes through (0, 0, -h0)

    def gz(x, y):
        return (plane[3] - n[0] * x - n[1] * y) / n[2]

    road_half = float(rng.uniform(3.5, 7.5))
    sidewalk = float(rng.uniform(1.5, 4.0))
    az = np.deg2rad(rng.uniform(20, 70))
    el = np.deg2rad(rng.uniform(25, 65))
    sun = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])

    # ---- static structures (BEV footprints kept for overlap rejection) ----
    static = _Builder()
    static_boxes: list[np.ndarray] = []

    def add_static(centre_xy, size, yaw, albedo, refl, tex=TEX_PLAIN, z0=None):
        z0 = gz(*centre_xy) if z0 is None else z0
        c = np.array([centre_xy[0], centre_xy[1], z0 + size[2] / 2])
        static.add(c, size, yaw, -1, albedo, refl, tex)
        return np.array([c[0], c[1], c[2], size[0], size[1], size[2], yaw])

    for side in (-1, 1):
        x = -15.0
        setback = road_half + sidewalk + rng.uniform(0.5, 12.0)
        while x < 95.0:
            length = rng.uniform(8, 30)
            if rng.random() < 0.3:  # gap (open lot / side street)
                x += rng.uniform(6, 20)
                continue
            depth, height = rng.uniform(8, 20), rng.uniform(4, 18)
            off = setback + rng.uniform(-1.0, 1.5)
            col = rng.uniform(0.35, 0.85, 3) * np.array([1.0, 0.95, 0.9])
            static_boxes.append(add_static((x + length / 2, side * (off + depth / 2)), (length, depth, height),
                                           rng.normal(0, 0.02), col, rng.uniform(0.2, 0.5), TEX_BUILDING))
            x += length + rng.uniform(0, 2)
        if rng.random() < 0.5:  # fence / low wall along the sidewalk
            fx = rng.uniform(0, 50)
            flen = rng.uniform(5, 25)
            static_boxes.append(add_static((fx + flen / 2, side * (road_half + sidewalk + 0.15)),
                                           (flen, 0.2, rng.uniform(0.8, 2.0)), 0.0, rng.uniform(0.3, 0.7, 3),
                                           rng.uniform(0.2, 0.5)))
    for _ in range(rng.integers(cfg.num_poles[0], cfg.num_poles[1] + 1)):
        side = rng.choice([-1, 1])
        s = rng.uniform(0.15, 0.3)
        static_boxes.append(add_static((rng.uniform(0, 75), side * (road_half + rng.uniform(0.3, 1.0))),
                                       (s, s, rng.uniform(4, 8)), rng.uniform(0, np.pi), [0.45, 0.45, 0.47],
                                       rng.uniform(0.4, 0.8)))
    for _ in range(rng.integers(cfg.num_trees[0], cfg.num_trees[1] + 1)):
        side = rng.choice([-1, 1])
        tx, ty = rng.uniform(0, 75), side * (road_half + rng.uniform(0.8, max(1.0, sidewalk - 0.3)))
        trunk_h = rng.uniform(2.0, 3.5)
        static_boxes.append(add_static((tx, ty), (0.35, 0.35, trunk_h), rng.uniform(0, np.pi), [0.3, 0.2, 0.1], 0.3))
        top = gz(tx, ty) + trunk_h
        green = np.array([0.15, 0.4, 0.12]) * rng.uniform(0.7, 1.3)
        for _ in range(rng.integers(3, 7)):  # noisy canopy: overlapping random boxes
            size = rng.uniform(0.8, 2.5, 3)
            c = np.array([tx, ty, top + size[2] / 2]) + np.array([*rng.normal(0, 0.7, 2), rng.uniform(-0.3, 1.2)])
            static.add(c, size, rng.uniform(0, np.pi), -1, green * rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.6),
                       TEX_CANOPY)
    for _ in range(rng.integers(cfg.num_clutter[0], cfg.num_clutter[1] + 1)):  # bins, boxes, bollards
        side = rng.choice([-1, 1])
        size = rng.uniform(0.4, 1.2, 3)
        static_boxes.append(add_static((rng.uniform(2, 75), side * (road_half + rng.uniform(0.2, sidewalk + 3))),
                                       size, rng.uniform(0, np.pi), rng.uniform(0.1, 0.8, 3), rng.uniform(0.1, 0.7)))
    static_bev = np.array(static_boxes) if static_boxes else np.zeros((0, 7))

    # ---- labelled objects ----
    n_target = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    classes = ("Car", "Pedestrian", "Cyclist")
    probs = np.asarray(cfg.class_probs, float) / np.sum(cfg.class_probs)
    lanes = np.arange(-road_half + 1.75, road_half - 1.0, 3.5)
    fov = np.deg2rad(cfg.object_fov_deg)
    boxes: list[np.ndarray] = []
    names: list[str] = []
    vel: list[np.ndarray] = []
    attempts = 0
    while len(boxes) < n_target and attempts < 2000:
        attempts += 1
        cls = classes[rng.choice(3, p=probs)]
        l, w, h = _sample_size(cls, rng)
        x = rng.uniform(*cfg.x_range_m)
        u = rng.random()
        moving = True
        if cls == "Car":
            if u < 0.5 and len(lanes):
                lane = rng.choice(lanes)
                y = lane + rng.normal(0, 0.3)
                yaw = (0.0 if lane < 0 else np.pi) + rng.normal(0, 0.06)
            elif u < 1.0 - cfg.random_yaw_fraction:
                side = rng.choice([-1, 1])
                y = side * (road_half - w / 2 - rng.uniform(0.05, 0.4))
                yaw = rng.choice([0.0, np.pi]) + rng.normal(0, 0.04)
                moving = False
            else:
                y = rng.uniform(-cfg.max_lateral_m, cfg.max_lateral_m)
                yaw = rng.uniform(-np.pi, np.pi)
                moving = rng.random() < 0.2
        elif cls == "Pedestrian":
            if u < 0.6:
                side = rng.choice([-1, 1])
                y = side * (road_half + rng.uniform(0.3, max(0.4, sidewalk - 0.3)))
            else:
                y = rng.uniform(-cfg.max_lateral_m, cfg.max_lateral_m)
            yaw = rng.uniform(-np.pi, np.pi)
            moving = rng.random() < 0.7
        else:
            if u < 0.7:
                side = rng.choice([-1, 1])
                y = side * (road_half - rng.uniform(0.5, 1.5))
                yaw = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.15)
            else:
                y = rng.uniform(-cfg.max_lateral_m, cfg.max_lateral_m)
                yaw = rng.uniform(-np.pi, np.pi)
        yaw = float(np.arctan2(np.sin(yaw), np.cos(yaw)))
        if abs(y) > cfg.max_lateral_m or abs(np.arctan2(y, x)) > fov:
            continue
        box = np.array([x, y, gz(x, y) + h / 2, l, w, h, yaw])
        margin = 0.25 if cls == "Car" else 0.1
        if boxes and bev_overlaps(box, np.array(boxes), margin).any():
            continue
        if bev_overlaps(box, static_bev, 0.1).any():
            continue
        speed = 0.0
        if moving:
            speed = {"Car": rng.uniform(2, 15), "Pedestrian": rng.uniform(0.5, 1.8), "Cyclist": rng.uniform(2, 7)}[cls]
        boxes.append(box)
        names.append(cls)
        vel.append(speed * np.array([np.cos(yaw), np.sin(yaw)]))

    bld = _Builder()
    for i, (box, cls) in enumerate(zip(boxes, names)):
        _PARTS[cls](bld, box, i, rng)
    bld.rows.extend(static.rows)
    return Scene(
        boxes_lidar=np.array(boxes).reshape(-1, 7),
        classes=np.array(names, dtype="<U10"),
        velocity=np.array(vel).reshape(-1, 2),
        prims=bld.build(),
        plane=plane,
        road_half_m=road_half,
        sidewalk_m=sidewalk,
        sun=sun,
        calib=kitti_like_calibration(),
        config=cfg,
    )
