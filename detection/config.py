"""The detection experiment's config: `task: detection` YAML files under `configs/`.

Every field is documented here; `configs/quickstart.yaml` and `configs/detection/*.yaml` set them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from detection.data import AugmentConfig
from detection.models.detector import ModelConfig
from perception3d.engine import TrainConfig
from perception3d.errors import ConfigError

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

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"data.synthetic.frames: expected a number of frames >= 1, got {self.frames}")
        if self.seed < 0:
            raise ConfigError(f"data.synthetic.seed: expected an integer >= 0, got {self.seed}")
        if not (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction <= 1.0):
            raise ConfigError(f"data.synthetic.val_fraction: expected a fraction in [0, 1] (the share of frames "
                              f"held out in ImageSets/val.txt), got {self.val_fraction}")
        if self.workers < 1:
            raise ConfigError(f"data.synthetic.workers: expected a number of processes >= 1, got {self.workers}")


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

    def __post_init__(self) -> None:
        if not self.root.strip():
            raise ConfigError("data.root: expected a folder path, got an empty string")
        for name in ("train_split", "val_split"):
            value = getattr(self, name)
            if not value.strip() or "/" in value or "\\" in value:
                raise ConfigError(f"data.{name}: expected the name of an ImageSets/<name>.txt file (e.g. "
                                  f"'train'), got {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and pictures.

    Attributes:
        distance_bins_m: BEV range bins for AP by distance.
        num_pictures: validation frames drawn (BEV + camera) after evaluation.
        picture_score: the lowest score of a detection drawn in the pictures (the metrics use
            every detection).
        real_kitti_root: a real KITTI-layout root to run inference on and draw (skipped if absent).
        baseline: a folder of KITTI result files for the held-out frames (another run's
            `predictions/`, which every evaluation writes) to compare with: the metrics then hold
            the moderate 3D AP's difference to it and the difference's paired 95% bootstrap
            interval over frames (`<class>/3d_R40_minus_baseline/moderate[_low|_high]`).
    """

    distance_bins_m: tuple[float, ...] = (0.0, 20.0, 40.0, 70.4)
    num_pictures: int = 2
    picture_score: float = 0.3
    real_kitti_root: Optional[str] = "../shared/data/kitti"
    baseline: Optional[str] = None

    def __post_init__(self) -> None:
        bins = tuple(self.distance_bins_m)
        if (len(bins) < 2 or not all(math.isfinite(b) for b in bins) or bins[0] < 0
                or any(b >= c for b, c in zip(bins, bins[1:]))):
            raise ConfigError(f"eval.distance_bins_m: expected at least 2 finite, strictly increasing BEV ranges "
                              f">= 0 in metres (bin edges, e.g. [0, 20, 40, 70.4]), got {list(bins)}")
        if self.num_pictures < 0:
            raise ConfigError(f"eval.num_pictures: expected a count >= 0, got {self.num_pictures}")
        if not 0.0 <= self.picture_score <= 1.0:
            raise ConfigError(f"eval.picture_score: expected a score in [0, 1], got {self.picture_score}")
        for name in ("real_kitti_root", "baseline"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ConfigError(f"eval.{name}: expected a folder path or null, got an empty string")


@dataclass(frozen=True)
class DetectionConfig:
    """A detection experiment: data, model, training schedule, evaluation."""

    task: str = "detection"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.task != "detection":
            raise ConfigError(f"task: expected 'detection' for a DetectionConfig, got {self.task!r}")
        if self.model.num_point_features > 4:
            raise ConfigError(f"model.num_point_features: KITTI points have 4 columns (x, y, z, intensity); "
                              f"expected 3 or 4, got {self.model.num_point_features}")
