"""What `p3d view` shows and how it is drawn.

A `Scene` holds layers in world coordinates (for a LiDAR frame, the LiDAR frame: x forward, y
left, z up): point sets, line segments (3D boxes, camera frusta, radar velocity arrows) and text
labels (classes, scores). The `*_layers` functions build them from the toolkit's data; `render`
draws a scene offscreen with Open3D into an RGB image (labels are drawn on the image afterwards,
at their projected positions) and `show` opens an interactive Open3D window.

Cameras are pinhole with OpenCV axes (x right, y down, z forward), as everywhere in the toolkit:
`Camera.K [3, 3]` and `Camera.world_to_camera [4, 4]`. A screenshot saves its camera beside it
(`out.camera.json`) and `p3d view --camera out.camera.json` reproduces the view.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perception3d.errors import DataError

# class colours of boxes (predictions); ground truth is drawn in the same colour, lightened
CLASS_COLORS = {
    "Car": (1.0, 0.15, 0.15), "Van": (1.0, 0.45, 0.6), "Truck": (0.8, 0.35, 0.1), "Tram": (0.6, 0.2, 0.1),
    "Pedestrian": (1.0, 0.6, 0.0), "Person_sitting": (1.0, 0.75, 0.3), "Cyclist": (1.0, 0.1, 1.0),
}
OTHER_COLOR = (0.85, 0.85, 0.85)
RADAR_COLOR = (0.2, 0.9, 1.0)
FRUSTUM_COLOR = (0.95, 0.95, 0.95)
BACKGROUND = (0.05, 0.05, 0.07)
# the 12 edges of a box over `perception3d.geometry.boxes.box_corners`' corner order, plus a cross on
# the front face (corners 0, 1, 4, 5) that shows the heading
_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7),
          (0, 5), (1, 4)]


def class_color(name: str, ground_truth: bool = False) -> np.ndarray:
    c = np.asarray(CLASS_COLORS.get(str(name), OTHER_COLOR), np.float64)
    return 0.5 * c + 0.5 if ground_truth else c


@dataclass
class Points:
    xyz: np.ndarray  # [N, 3]
    rgb: np.ndarray  # [N, 3] in [0, 1]
    size: float = 2.0  # pixels


@dataclass
class Lines:
    segments: np.ndarray  # [M, 2, 3]
    rgb: np.ndarray  # [M, 3]
    width: float = 2.0  # pixels


@dataclass
class Label:
    xyz: np.ndarray  # [3]
    text: str
    rgb: tuple[float, float, float]


@dataclass
class Camera:
    """A pinhole view: `K [3, 3]`, `world_to_camera [4, 4]` (OpenCV axes), image size."""

    K: np.ndarray
    world_to_camera: np.ndarray
    width: int
    height: int

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[N, 3]` world points -> `(uv [N, 2] pixels, depth [N])` (pixel centres at +0.5)."""
        cam = np.asarray(xyz, np.float64) @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]
        z = cam[:, 2]
        uv = (cam @ self.K.T)[:, :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)[:, None]
        return uv, z

    def to_json(self) -> str:
        return json.dumps({"width": self.width, "height": self.height, "K": self.K.tolist(),
                           "world_to_camera": self.world_to_camera.tolist()}, indent=2)

    @classmethod
    def read(cls, path: str | Path) -> "Camera":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            cam = cls(np.asarray(d["K"], np.float64), np.asarray(d["world_to_camera"], np.float64),
                      int(d["width"]), int(d["height"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: expected a camera JSON as `p3d view --screenshot` writes it (width, height, "
                            f"K [3][3], world_to_camera [4][4]): {type(e).__name__}: {e}") from None
        if cam.K.shape != (3, 3) or cam.world_to_camera.shape != (4, 4) or min(cam.width, cam.height) < 1 \
                or not (np.isfinite(cam.K).all() and np.isfinite(cam.world_to_camera).all()):
            raise DataError(f"{path}: K must be 3x3, world_to_camera 4x4 (finite), width and height >= 1")
        return cam


def look_at(eye, target, up, width: int, height: int, fov_y_deg: float = 55.0) -> Camera:
    """The camera at `eye` looking at `target`, with `up` pointing up in the image."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:  # looking along `up`: any horizontal x will do
        x = np.cross(z, [1.0, 0.0, 0.0] if abs(z[0]) < 0.9 else [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    f = 0.5 * height / np.tan(np.radians(fov_y_deg) / 2)
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    return Camera(K, w2c, width, height)


@dataclass
class Scene:
    title: str = ""
    points: list[Points] = field(default_factory=list)
    lines: list[Lines] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    camera: Camera | None = None  # the view to open at; None: `default_camera`
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    legend: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    gaussians: Path | None = None  # the 3DGS .ply shown, for `--splat`
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # behind a splat render

    def extend(self, other: "Scene") -> None:
        self.points += other.points
        self.lines += other.lines
        self.labels += other.labels
        self.legend += [item for item in other.legend if item not in self.legend]


def default_camera(scene: Scene, width: int, height: int) -> Camera:
    """A view from behind and above the middle of what the scene holds (a chase view for LiDAR)."""
    xyz = [p.xyz for p in scene.points] + [ln.segments.reshape(-1, 3) for ln in scene.lines]
    xyz = np.concatenate(xyz) if xyz else np.zeros((1, 3))
    lo, hi = np.percentile(xyz, 2, axis=0), np.percentile(xyz, 98, axis=0)
    centre, radius = (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)) / 2, 1.0)
    up = np.asarray(scene.up, np.float64)
    forward = np.array([1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    target = centre - 0.3 * radius * forward  # a little nearer than the middle: the sensor in view
    return look_at(target - 1.0 * radius * forward + 1.1 * radius * up, target, up, width, height)


# -- layers -------------------------------------------------------------------------------------------
def colour_points(values: np.ndarray, cmap: str = "viridis", lo: float | None = None,
                  hi: float | None = None) -> np.ndarray:
    """`[N]` values -> `[N, 3]` colours (2nd to 98th percentile stretched over the colour map)."""
    import matplotlib

    v = np.asarray(values, np.float64)
    if v.size == 0:
        return np.zeros((0, 3))
    lo = np.percentile(v, 2) if lo is None else lo
    hi = np.percentile(v, 98) if hi is None else hi
    t = np.clip((v - lo) / max(hi - lo, 1e-9), 0, 1)
    return matplotlib.colormaps[cmap](t)[:, :3]


def lidar_layers(points: np.ndarray, color_by: str = "height") -> Scene:
    """LiDAR points `[N, >=3]`, coloured by height (z) or intensity (4th column)."""
    if color_by not in ("height", "intensity"):
        raise DataError(f"--color: expected 'height' or 'intensity', got {color_by!r}")
    pts = np.asarray(points, np.float64)
    if color_by == "intensity" and pts.shape[1] < 4:
        raise DataError("--color intensity: these points have no intensity column")
    rgb = colour_points(pts[:, 2] if color_by == "height" else pts[:, 3])
    return Scene(points=[Points(pts[:, :3], rgb, 2.0)], legend=[(f"points by {color_by}", (0.3, 0.75, 0.5))])


def box_layers(boxes: np.ndarray, names, scores=None, ground_truth: bool = False) -> Scene:
    """LiDAR boxes `[M, 7]` in class colours (ground truth lightened), labelled with class or score."""
    from perception3d.geometry.boxes import box_corners
    import torch

    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    if len(boxes) == 0:
        return Scene()
    corners = box_corners(torch.from_numpy(boxes)).numpy()  # [M, 8, 3]
    idx = np.asarray(_EDGES)
    segments = corners[:, idx]  # [M, E, 2, 3]
    colors = np.stack([class_color(n, ground_truth) for n in names])  # [M, 3]
    labels = []
    for i, n in enumerate(names):
        text = f"{n} {float(scores[i]):.2f}" if scores is not None else str(n)
        top = corners[i, 4:].mean(0) + [0, 0, 0.3]
        labels.append(Label(top, text, tuple(colors[i])))
    kind = "ground truth" if ground_truth else "predictions"
    legend = [(f"{n} ({kind})", tuple(class_color(n, ground_truth))) for n in dict.fromkeys(map(str, names))]
    return Scene(lines=[Lines(segments.reshape(-1, 2, 3), np.repeat(colors, len(_EDGES), axis=0),
                              2.0 if ground_truth else 3.0)], labels=labels, legend=legend)


def frustum_layers(K: np.ndarray, camera_to_world: np.ndarray, width: int, height: int, depth: float,
                   name: str = "") -> Scene:
    """A camera's viewing frustum (pinhole `K`, OpenCV axes) as lines, `depth` long."""
    corners_px = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    rays = np.c_[corners_px, np.ones(4)] @ np.linalg.inv(K).T  # z = 1
    far = rays * depth
    T = np.asarray(camera_to_world, np.float64)
    world = np.r_[np.zeros((1, 3)), far] @ T[:3, :3].T + T[:3, 3]
    o, c = world[0], world[1:]
    segments = np.array([[o, c[i]] for i in range(4)] + [[c[i], c[(i + 1) % 4]] for i in range(4)])
    labels = [Label(o + 0.1 * depth * (T[:3, :3] @ [0, -1.0, 0]), name, FRUSTUM_COLOR)] if name else []
    return Scene(lines=[Lines(segments, np.tile(FRUSTUM_COLOR, (len(segments), 1)), 1.5)], labels=labels)


def radar_layers(radar: np.ndarray, seconds: float = 1.0) -> Scene:
    """Radar points `[K, >=4]` (x, y, z, radial velocity m/s, ...; sensor at the origin) with arrows
    of their radial velocity: where the return moves in `seconds` along its line of sight."""
    r = np.asarray(radar, np.float64)
    if len(r) == 0:
        return Scene()
    xyz = r[:, :3]
    ray = xyz / np.maximum(np.linalg.norm(xyz, axis=1, keepdims=True), 1e-9)
    tips = xyz + ray * r[:, 3:4] * seconds
    moving = np.abs(r[:, 3]) > 0.1
    color = np.asarray(RADAR_COLOR)
    return Scene(points=[Points(xyz, np.tile(color, (len(xyz), 1)), 6.0)],
                 lines=[Lines(np.stack([xyz, tips], axis=1)[moving], np.tile(color, (int(moving.sum()), 1)), 2.0)],
                 legend=[(f"radar, radial velocity x {seconds:g} s", tuple(RADAR_COLOR))])


def gaussian_layers(means: np.ndarray, sh0: np.ndarray, opacities_logit: np.ndarray,
                    min_opacity: float = 0.1) -> Scene:
    """Gaussian centres in their base colour (SH degree 0), the nearly transparent ones left out."""
    from splatting.sh import sh0_to_rgb
    import torch

    keep = 1 / (1 + np.exp(-np.asarray(opacities_logit, np.float64))) >= min_opacity
    rgb = sh0_to_rgb(torch.as_tensor(np.asarray(sh0)[keep]).reshape(-1, 3)).clamp(0, 1).numpy()
    return Scene(points=[Points(np.asarray(means)[keep], rgb, 2.0)],
                 legend=[(f"{int(keep.sum())} Gaussian centres (opacity >= {min_opacity:g})", (0.8, 0.8, 0.8))])


# -- drawing ------------------------------------------------------------------------------------------
def _linear(rgb) -> np.ndarray:
    """sRGB colours -> linear: Open3D's renderer treats vertex colours as linear and writes sRGB, so
    this makes the image show the colours asked for."""
    c = np.clip(np.asarray(rgb, np.float64), 0, 1)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _geometries(scene: Scene):
    """`(name, open3d geometry, material)` for every layer."""
    import open3d as o3d

    out = []
    for i, p in enumerate(scene.points):
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(p.xyz, np.float64)))
        pc.colors = o3d.utility.Vector3dVector(_linear(p.rgb))
        mat = o3d.visualization.rendering.MaterialRecord()
        mat.shader, mat.point_size = "defaultUnlit", float(p.size)
        out.append((f"points{i}", pc, mat))
    for i, ln in enumerate(scene.lines):
        if len(ln.segments) == 0:
            continue
        ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(ln.segments.reshape(-1, 3).astype(np.float64)),
                                  o3d.utility.Vector2iVector(np.arange(2 * len(ln.segments)).reshape(-1, 2)))
        ls.colors = o3d.utility.Vector3dVector(_linear(ln.rgb))
        mat = o3d.visualization.rendering.MaterialRecord()
        mat.shader, mat.line_width = "unlitLine", float(ln.width)
        out.append((f"lines{i}", ls, mat))
    return out


def render(scene: Scene, camera: Camera) -> np.ndarray:
    """Draw `scene` offscreen from `camera`: `uint8 [H, W, 3]`, labels and legend drawn on it."""
    import open3d as o3d

    try:
        renderer = o3d.visualization.rendering.OffscreenRenderer(camera.width, camera.height)
    except RuntimeError as e:  # no EGL / Vulkan: scripts/install.sh installs Mesa's software drivers
        raise DataError(f"Open3D's offscreen renderer could not start ({e}); it needs Mesa's EGL or Vulkan "
                        "drivers (Debian: libegl1 libvulkan1 mesa-vulkan-drivers, as scripts/install.sh installs)") \
            from None
    renderer.scene.set_background([*BACKGROUND, 1.0])
    for name, geom, mat in _geometries(scene):
        renderer.scene.add_geometry(name, geom, mat)
    renderer.setup_camera(camera.K, camera.world_to_camera, camera.width, camera.height)
    image = np.asarray(renderer.render_to_image()).copy()
    return annotate(image, scene, camera)


def annotate(image: np.ndarray, scene: Scene, camera: Camera) -> np.ndarray:
    """Labels at their projected positions (in front of the camera, inside the image) and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    size = max(11, round(camera.height / 45))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    if scene.labels:
        uv, z = camera.project(np.stack([lb.xyz for lb in scene.labels]))
        for lb, (u, v), d in zip(scene.labels, uv, z):
            if d > 0.1 and 0 <= u < camera.width and 0 <= v < camera.height:
                draw.text((u + 3, v - size), lb.text, fill=tuple(int(255 * c) for c in lb.rgb), font=font)
    y = 6
    for text, rgb in ([(scene.title, (1.0, 1.0, 1.0))] if scene.title else []) + scene.legend:
        draw.text((8, y), text, fill=tuple(int(255 * c) for c in rgb), font=font)
        y += size + 3
    return np.asarray(pil)


def show(scene: Scene, camera: Camera) -> None:
    """An interactive Open3D window (mouse to orbit, scroll to zoom) at `camera`, with 3D labels."""
    import open3d as o3d

    gui = o3d.visualization.gui
    app = gui.Application.instance
    app.initialize()
    vis = o3d.visualization.O3DVisualizer(scene.title or "p3d view", camera.width, camera.height)
    vis.set_background(np.array([*BACKGROUND, 1.0]), None)
    vis.show_skybox(False)
    for name, geom, mat in _geometries(scene):
        vis.add_geometry(name, geom, mat)
    for lb in scene.labels:
        vis.add_3d_label(lb.xyz, lb.text)
    vis.setup_camera(camera.K, camera.world_to_camera, camera.width, camera.height)
    app.add_window(vis)
    app.run()
