"""Multi-view datasets for Gaussian splatting: COLMAP, transforms.json (Blender / instant-ngp /
nerfstudio) and LLFF readers into one `Scene`, the `SplatDataset` a trainer iterates, and a seeded
synthetic scene generator (no download needed).

Data flow: files on disk -> `load_scene` (format detected) -> `Scene` (frames with OpenCV
camera -> world poses, pinhole K, distortion; SfM points) -> `SplatDataset(scene, split, downscale)`
-> `SplatSample` (undistorted, downscaled float image + camera) and `cameras()` (viewmats, Ks).
"""
from splatting.data.colmap import (
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    load_colmap,
    read_colmap_model,
    write_colmap_binary,
    write_colmap_text,
)
from splatting.data.llff import load_llff
from splatting.data.scene import (
    CameraFrame,
    MissingImagesWarning,
    Scene,
    SplatDataset,
    SplatSample,
    load_scene,
    read_image,
    undistort_image,
)
from splatting.data.synthetic import (
    SyntheticScene,
    make_synthetic_scene,
    orbit_cameras,
    render_view,
    write_synthetic_scene,
)
from splatting.data.transforms_json import load_transforms, write_transforms_json

__all__ = [
    "CameraFrame",
    "Scene",
    "SplatDataset",
    "SplatSample",
    "MissingImagesWarning",
    "load_scene",
    "read_image",
    "undistort_image",
    "ColmapCamera",
    "ColmapImage",
    "ColmapModel",
    "load_colmap",
    "read_colmap_model",
    "write_colmap_text",
    "write_colmap_binary",
    "load_transforms",
    "write_transforms_json",
    "load_llff",
    "SyntheticScene",
    "make_synthetic_scene",
    "orbit_cameras",
    "render_view",
    "write_synthetic_scene",
]
