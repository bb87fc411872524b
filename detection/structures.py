"""The packed training/evaluation batch of the voxel detectors.

A batch of ``B`` LiDAR frames is stored packed with offsets (pytorch3d / fVDB style), not as a
list of dicts: all points of all frames in one ``[N, C]`` tensor, frame ``b`` owning rows
``points[point_offsets[b]:point_offsets[b + 1]]``; likewise for the ground-truth boxes.
Boxes follow the toolkit convention (``perception3d/design.md``): ``(x, y, z, dx, dy, dz, yaw)``,
box centre, LiDAR frame, metres and radians. Labels index ``CLASSES``, the KITTI benchmark's classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.io.kitti import BENCHMARK_CLASSES as CLASSES  # the classes detected and evaluated

__all__ = ["DetectionBatch", "collate"]


def _check_offsets(name: str, offsets: torch.Tensor, total: int) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64:
        raise DataError(f"DetectionBatch.{name}: expected an int64 tensor [B+1], got "
                        f"{getattr(offsets, 'dtype', type(offsets))} {tuple(getattr(offsets, 'shape', ()))}")
    if offsets.numel() < 1:
        raise DataError(f"DetectionBatch.{name}: needs at least one entry (B+1 >= 1)")
    off = offsets.detach().cpu()
    if off[0].item() != 0 or off[-1].item() != total:
        raise DataError(f"DetectionBatch.{name}: must start at 0 and end at {total} "
                        f"(the number of rows), got {off[0].item()} .. {off[-1].item()}")
    if (off[1:] < off[:-1]).any():
        raise DataError(f"DetectionBatch.{name}: offsets must be non-decreasing, got {off.tolist()}")


@dataclass(frozen=True)
class DetectionBatch:
    """``B`` LiDAR frames with their ground truth, packed with offsets.

    Attributes:
        points: ``[N, C]`` float32 points of all frames, columns ``(x, y, z, intensity, ...)``,
            LiDAR frame, metres; ``C >= 3``.
        point_offsets: ``[B+1]`` int64; frame ``b`` owns ``points[point_offsets[b]:point_offsets[b+1]]``.
        gt_boxes: ``[M, 7]`` float32 boxes ``(x, y, z, dx, dy, dz, yaw)`` of all frames.
        gt_labels: ``[M]`` int64 class ids in ``0 .. len(CLASSES) - 1``.
        gt_offsets: ``[B+1]`` int64; frame ``b`` owns ``gt_boxes[gt_offsets[b]:gt_offsets[b+1]]``.
        frame_ids: ``B`` frame names, for error messages and result files.

    Raises:
        DataError: on wrong shapes or dtypes, NaN/inf values, non-positive box sizes, labels
            outside the class range, inconsistent offsets or a ``frame_ids`` length mismatch.
    """

    points: torch.Tensor
    point_offsets: torch.Tensor
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_offsets: torch.Tensor
    frame_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        p = self.points
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[1] < 3 or p.dtype != torch.float32:
            raise DataError(f"DetectionBatch.points: expected a float32 tensor [N, C>=3], got "
                            f"{getattr(p, 'dtype', type(p))} {tuple(getattr(p, 'shape', ()))}")
        b = self.gt_boxes
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 7 or b.dtype != torch.float32:
            raise DataError(f"DetectionBatch.gt_boxes: expected a float32 tensor [M, 7], got "
                            f"{getattr(b, 'dtype', type(b))} {tuple(getattr(b, 'shape', ()))}")
        lab = self.gt_labels
        if not isinstance(lab, torch.Tensor) or lab.shape != (b.shape[0],) or lab.dtype != torch.int64:
            raise DataError(f"DetectionBatch.gt_labels: expected an int64 tensor [{b.shape[0]}], got "
                            f"{getattr(lab, 'dtype', type(lab))} {tuple(getattr(lab, 'shape', ()))}")
        _check_offsets("point_offsets", self.point_offsets, p.shape[0])
        _check_offsets("gt_offsets", self.gt_offsets, b.shape[0])
        if self.gt_offsets.shape != self.point_offsets.shape:
            raise DataError(f"DetectionBatch: gt_offsets has {self.gt_offsets.numel()} entries but "
                            f"point_offsets has {self.point_offsets.numel()} (both must be B+1)")
        if not isinstance(self.frame_ids, tuple) or len(self.frame_ids) != self.batch_size:
            raise DataError(f"DetectionBatch.frame_ids: expected a tuple of {self.batch_size} names, "
                            f"got {self.frame_ids!r}")
        if not torch.isfinite(p).all():
            raise DataError("DetectionBatch.points: contains NaN or inf")
        if not torch.isfinite(b).all():
            raise DataError("DetectionBatch.gt_boxes: contains NaN or inf")
        if b.numel() and (b[:, 3:6] <= 0).any():
            raise DataError("DetectionBatch.gt_boxes: box sizes (dx, dy, dz) must be positive")
        if lab.numel() and ((lab < 0).any() or (lab >= len(CLASSES)).any()):
            raise DataError(f"DetectionBatch.gt_labels: must lie in 0..{len(CLASSES) - 1} {CLASSES}, "
                            f"got min {lab.min().item()} max {lab.max().item()}")

    @property
    def batch_size(self) -> int:
        """Number of frames ``B``."""
        return self.point_offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.points.device

    def point_batch_index(self) -> torch.Tensor:
        """``[N]`` int64 frame index of every point."""
        counts = self.point_offsets[1:] - self.point_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.batch_size, device=counts.device), counts)

    def gt_batch_index(self) -> torch.Tensor:
        """``[M]`` int64 frame index of every ground-truth box."""
        counts = self.gt_offsets[1:] - self.gt_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.batch_size, device=counts.device), counts)

    def frame_points(self, b: int) -> torch.Tensor:
        """``[n_b, C]`` points of frame ``b``."""
        return self.points[self.point_offsets[b]:self.point_offsets[b + 1]]

    def frame_gt(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([m_b, 7] boxes, [m_b] labels)`` of frame ``b``."""
        s, e = self.gt_offsets[b], self.gt_offsets[b + 1]
        return self.gt_boxes[s:e], self.gt_labels[s:e]

    def to(self, device: torch.device | str) -> "DetectionBatch":
        """A copy with every tensor on ``device``."""
        return DetectionBatch(
            points=self.points.to(device),
            point_offsets=self.point_offsets.to(device),
            gt_boxes=self.gt_boxes.to(device),
            gt_labels=self.gt_labels.to(device),
            gt_offsets=self.gt_offsets.to(device),
            frame_ids=self.frame_ids,
        )


def _as_tensor(x: Any, dtype: torch.dtype, field: str, frame_id: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype, device="cpu")
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype)
    except (TypeError, ValueError) as e:
        raise DataError(f"collate: frame {frame_id!r} field {field!r} is not array-like: {e}") from e


def collate(samples: Sequence[Mapping[str, Any]]) -> DetectionBatch:
    """Packs per-frame samples into one :class:`DetectionBatch` (on the CPU).

    Args:
        samples: per frame a mapping (or an object with these attributes) with ``points``
            ``[n, C]`` (numpy or torch; cast to float32), ``gt_boxes`` ``[m, 7]``, ``gt_labels``
            ``[m]`` (cast to int64) and ``frame_id`` (str). All frames must have the same number
            of point columns ``C``.

    Returns:
        The packed batch.

    Raises:
        DataError: on an empty list, a missing key, mismatched shapes or any check of
            :class:`DetectionBatch` failing (the message names the frame).
    """
    if len(samples) == 0:
        raise DataError("collate: got no samples")
    points, boxes, labels, ids = [], [], [], []
    keys = ("points", "gt_boxes", "gt_labels", "frame_id")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping):  # a dataclass / namedtuple sample with these attributes
            s = {k: getattr(s, k) for k in keys if hasattr(s, k)}
        missing = [k for k in keys if k not in s]
        fid = str(s.get("frame_id", f"#{i}"))
        if missing:
            raise DataError(f"collate: sample {fid!r} lacks {missing}")
        p = _as_tensor(s["points"], torch.float32, "points", fid)
        bx = _as_tensor(s["gt_boxes"], torch.float32, "gt_boxes", fid)
        if bx.numel() == 0:
            bx = bx.reshape(0, 7)
        if bx.dim() != 2 or bx.shape[1] != 7:
            raise DataError(f"collate: frame {fid!r} gt_boxes must have shape [m, 7], got {tuple(bx.shape)}")
        lb = _as_tensor(s["gt_labels"], torch.int64, "gt_labels", fid).reshape(-1)
        if p.dim() != 2 or p.shape[1] < 3:
            raise DataError(f"collate: frame {fid!r} points must have shape [n, C>=3], got {tuple(p.shape)}")
        if points and p.shape[1] != points[0].shape[1]:
            raise DataError(f"collate: frame {fid!r} has {p.shape[1]} point columns, "
                            f"frame {ids[0]!r} has {points[0].shape[1]}")
        if lb.shape[0] != bx.shape[0]:
            raise DataError(f"collate: frame {fid!r} has {bx.shape[0]} boxes but {lb.shape[0]} labels")
        points.append(p), boxes.append(bx), labels.append(lb), ids.append(fid)

    def offsets(parts: list[torch.Tensor]) -> torch.Tensor:
        counts = torch.tensor([0] + [t.shape[0] for t in parts], dtype=torch.int64)
        return torch.cumsum(counts, 0)

    try:
        return DetectionBatch(
            points=torch.cat(points, 0),
            point_offsets=offsets(points),
            gt_boxes=torch.cat(boxes, 0),
            gt_labels=torch.cat(labels, 0),
            gt_offsets=offsets(boxes),
            frame_ids=tuple(ids),
        )
    except DataError as e:
        raise DataError(f"collate (frames {ids}): {e}") from e
