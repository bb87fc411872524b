"""Typed containers for 3D boxes and detections (conventions in `perception3d/design.md`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from perception3d.errors import DataError

__all__ = ["Boxes3D", "Detections3D"]


@dataclass(frozen=True)
class Boxes3D:
    """LiDAR-frame boxes `tensor [N, 7] = (x, y, z, dx, dy, dz, yaw)`, centre-based, metres."""

    tensor: torch.Tensor

    def __post_init__(self):
        t = self.tensor
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != 7:
            raise DataError(f"Boxes3D expects a tensor of shape [N, 7], got {getattr(t, 'shape', type(t))}")
        if not torch.isfinite(t).all():
            raise DataError("Boxes3D: box parameters contain NaN or inf")
        if t.numel() and (t[:, 3:6] <= 0).any():
            raise DataError("Boxes3D: box sizes (dx, dy, dz) must be positive")

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def centers(self) -> torch.Tensor:
        return self.tensor[:, :3]

    @property
    def dims(self) -> torch.Tensor:
        return self.tensor[:, 3:6]

    @property
    def yaw(self) -> torch.Tensor:
        return self.tensor[:, 6]

    def to(self, device) -> "Boxes3D":
        return Boxes3D(self.tensor.to(device))

    def __getitem__(self, idx) -> "Boxes3D":
        return Boxes3D(self.tensor[idx].reshape(-1, 7))


@dataclass(frozen=True)
class Detections3D:
    """Detections of one frame: `boxes` (N), `scores [N]` in [0, 1], `labels [N]` int64 class ids."""

    boxes: Boxes3D
    scores: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        n = len(self.boxes)
        if self.scores.shape != (n,) or self.labels.shape != (n,):
            raise DataError(
                f"Detections3D: scores {tuple(self.scores.shape)} and labels {tuple(self.labels.shape)} "
                f"must both have shape ({n},)"
            )

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, idx) -> "Detections3D":
        return Detections3D(self.boxes[idx], self.scores[idx].reshape(-1), self.labels[idx].reshape(-1))
