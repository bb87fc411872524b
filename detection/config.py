"""The detection experiment's config: `task: detection` YAML files under `configs/`.

Every field is documented here; `configs/quickstart.yaml` and `configs/detection/*.yaml` set them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from detection.data import AugmentConfig
from detection.models.detector import ModelConfig
from perception3d.engine import TrainConfig

__all__ = ["SyntheticDataConfig", "DataConfig", "EvalConfig", "DetectionConfig"]


@dataclass(frozen=True)
class SyntheticDataConfig:
    """Generate a synthetic KITTI-layout dataset at `data.root` when it does not exist yet.

    Attributes:
        frames: number of frames (train + val).
        seed: generator seed (same seed, same bytes).
        val_fraction: share of frames listed in `ImageSets/val.txt` (held out).
        workers: generator processes.
    """

    frames: int = 200
    seed: int = 0
    val_fraction: float = 0.2
    workers: int = 2


@dataclass(frozen=True)
class DataConfig:
    """Where the frames come from.

    Attributes:
        root: KITTI-layout folder (`training/{velodyne,image_2,calib,label_2}`, `ImageSets/`);
            relative paths are relative to the working directory.
        train_split, val_split: `ImageSets/<name>.txt` files listing frame ids.
        synthetic: if set and `root` is missing, the synthetic generator writes it first.
        augment: training-time augmentation.
    """

    root: str = "data_cache/synthetic_kitti"
    train_split: str = "train"
    val_split: str = "val"
    synthetic: Optional[SyntheticDataConfig] = field(default_factory=SyntheticDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and pictures.

    Attributes:
        distance_bins_m: BEV range bins for AP by distance.
        num_pictures: validation frames drawn (BEV + camera) after evaluation.
        real_kitti_root: a real KITTI-layout root to run inference on and draw (skipped if absent).
        baseline: a folder of KITTI result files for the held-out frames (another run's
            `predictions/`, which every evaluation writes) to compare with: the metrics then hold
            the moderate 3D AP's difference to it and the difference's paired 95% bootstrap
            interval over frames (`<class>/3d_R40_minus_baseline/moderate[_low|_high]`).
    """

    distance_bins_m: tuple[float, ...] = (0.0, 20.0, 40.0, 70.4)
    num_pictures: int = 2
    real_kitti_root: Optional[str] = "../shared/data/kitti"
    baseline: Optional[str] = None


@dataclass(frozen=True)
class DetectionConfig:
    """A detection experiment: data, model, training schedule, evaluation."""

    task: str = "detection"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
