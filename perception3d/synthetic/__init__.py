"""Seeded synthetic KITTI-layout scenes: box-built streets, LiDAR / camera / radar simulation."""
from perception3d.synthetic.dataset import SyntheticFrame, generate_frame, write_frame, write_kitti_dataset
from perception3d.synthetic.scene import CameraConfig, LidarConfig, RadarConfig, Scene, SceneConfig, generate_scene

__all__ = [
    "CameraConfig",
    "LidarConfig",
    "RadarConfig",
    "Scene",
    "SceneConfig",
    "SyntheticFrame",
    "generate_frame",
    "generate_scene",
    "write_frame",
    "write_kitti_dataset",
]
