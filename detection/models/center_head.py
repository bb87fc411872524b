"""CenterPoint-style centre-heatmap detection head on a BEV feature map.

Data flow:

- **forward**: BEV features ``[B, C, H, W]`` -> shared Conv-BN-ReLU -> one branch per output
  (Conv-BN-ReLU ... then a plain conv): class heatmap logits ``[B, K, H, W]``, centre offset within
  the cell ``[B, 2, H, W]`` (x, y; cells), centre height ``z`` ``[B, 1, H, W]`` (m), log box size
  ``[B, 3, H, W]`` (log m), box axis ``(sin 2 yaw, cos 2 yaw)`` ``[B, 2, H, W]`` and a heading
  direction logit ``[B, 1, H, W]`` -> :class:`CenterHeadOutput`.
- **targets** (:func:`encode_targets`): for every ground-truth box whose centre lies inside the BEV
  range, a Gaussian peak (value 1 at the centre cell) on its class heatmap, radius from
  :func:`gaussian_radius` on the box footprint in cells (at least ``min_radius``), and the 8
  regression targets at the centre cell, in code order
  ``(off_x, off_y, z, log dx, log dy, log dz, sin 2 yaw, cos 2 yaw)``, plus the direction target
  ``cos yaw < 0``.
- **Why the double angle**: a box and the same box turned by pi are the same box, and many objects
  look alike from front and back (pedestrians; cars seen side-on or far away). Regressing
  ``(sin yaw, cos yaw)`` of such objects averages two opposite targets into a short, noisy vector, which ruins
  the IoU. ``2 yaw`` is the same for both, so the box axis is learnt cleanly; which end is the front
  is a separate binary classification (SECOND's direction classifier), which costs no IoU when it
  is wrong.
- **loss** (:meth:`CenterHead.loss`): CenterNet focal loss on the heatmap normalised by the number
  of positive cells, plus ``reg_weight`` times the L1 loss of the regression at the positive cells
  (each code weighted by ``code_weights``), normalised by the number of positives, plus
  ``direction_weight`` times the binary cross-entropy of the direction logit at the positives. The
  defaults follow CenterPoint (code weights all 1, ``reg_weight = 0.25``) and SECOND (direction
  weight 0.2).
- **IoU branch** (``iou_weight > 0``; off by default): one more output ``[B, 1, H, W]`` predicts, at
  each positive cell, the 3D IoU between the box the cell regresses (detached) and its ground-truth
  box, as ``2 IoU - 1`` under an L1 loss weighted ``iou_weight`` (the IoU-aware branch of
  CenterPoint's Waymo models and DSVT). At decode it rectifies the score of class ``c``:
  ``score^(1 - a_c) * IoU^(a_c)`` with ``a = iou_alpha``, so that of two peaks of equal heatmap
  score the one whose box is placed better ranks first.
- **DIoU loss** (``diou_weight > 0``; off by default): the differentiable box-IoU regression loss
  those models train besides: at each positive cell the box decoded from the regression (with its
  gradient) and the ground-truth box give ``1 - DIoU``
  (:func:`perception3d.geometry.iou.diou_3d_in_frame`: measured in the ground truth's frame, the
  predicted box turned to its yaw), summed over positives, divided by their number and weighted
  ``diou_weight``. The L1 loss weighs a centimetre of centre, length or height the same on every
  box; this one weighs what costs IoU, the quantity the 0.7 threshold judges.
- **decode** (:meth:`CenterHead.decode`): sigmoid heatmap -> 3x3 max-pool peaks -> top-K over
  classes and cells -> boxes (``yaw = atan2(sin 2 yaw, cos 2 yaw) / 2``, plus pi where the direction
  logit is positive) -> IoU rectification of the scores (IoU branch only) -> score threshold ->
  rotated BEV NMS per class -> at most ``max_detections`` per frame, as
  :class:`perception3d.structures.Detections3D`.

Grid: BEV cell ``(i, j)`` (row ``i`` along y, column ``j`` along x) covers
``x in x0 + [j, j+1) * cell_x``, ``y in y0 + [i, i+1) * cell_y`` with
``cell = voxel_size_m[:2] * out_stride`` and ``(x0, y0) = pc_range_m[:2]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perception3d.geometry.iou import diou_3d_in_frame, iou_3d_aligned, nms_bev
from perception3d.structures import Boxes3D, Detections3D

__all__ = [
    "CenterHeadOptions",
    "CenterHeadOutput",
    "CenterTargets",
    "CenterHead",
    "gaussian_radius",
    "encode_targets",
    "focal_loss",
    "CODE_SIZE",
]

CODE_SIZE = 8  # (off_x, off_y, z, log dx, log dy, log dz, sin 2 yaw, cos 2 yaw)
_LOG_DIM_MAX = math.log(100.0)  # decoded sizes are capped at 100 m (untrained nets can emit huge logs)


@dataclass(frozen=True)
class CenterHeadOptions:
    """Options of :class:`CenterHead`.

    Attributes:
        num_classes: number of heatmap channels ``K`` (``len(CLASSES)``).
        shared_channels: channels of the shared 3x3 Conv-BN-ReLU.
        head_channels: channels of the hidden layers of each branch.
        head_conv_layers: 3x3 convs per branch, the last one the plain output conv (>= 1).
        init_bias: initial bias of the heatmap logits (-2.19: sigmoid = 0.1, as in CenterNet).
        gaussian_overlap: ``min_overlap`` of :func:`gaussian_radius` (CenterPoint: 0.1).
        min_radius: smallest Gaussian radius in cells.
        heatmap_weight: weight of the focal loss.
        reg_weight: weight of the regression L1 loss (CenterPoint: 0.25).
        direction_weight: weight of the heading-direction cross-entropy (SECOND: 0.2).
        code_weights: per-code L1 weights, ``CODE_SIZE`` values in code order.
        iou_weight: weight of the IoU branch's L1 loss; 0 (default): no IoU branch.
        iou_alpha: per-class exponent ``a`` of the IoU rectification ``score^(1-a) * IoU^a``
            (``num_classes`` values in ``[0, 1]``; DSVT's Waymo values for vehicle, pedestrian,
            cyclist). Used only with the IoU branch.
        diou_weight: weight of the DIoU regression loss ``1 - DIoU`` of the decoded boxes at the
            positives; 0 (default): off.
        top_k: peaks kept per frame before thresholding.
        score_threshold: minimum sigmoid score of a detection.
        nms_iou: BEV IoU threshold of the per-class rotated NMS.
        nms_pre_max: highest-scoring boxes per class entering NMS.
        max_detections: detections kept per frame after NMS.
    """

    num_classes: int = 3
    shared_channels: int = 64
    head_channels: int = 64
    head_conv_layers: int = 2
    init_bias: float = -2.19
    gaussian_overlap: float = 0.1
    min_radius: int = 2
    heatmap_weight: float = 1.0
    reg_weight: float = 0.25
    direction_weight: float = 0.2
    code_weights: tuple[float, ...] = (1.0,) * CODE_SIZE
    iou_weight: float = 0.0
    iou_alpha: tuple[float, ...] = (0.68, 0.71, 0.65)
    diou_weight: float = 0.0
    top_k: int = 500
    score_threshold: float = 0.1
    nms_iou: float = 0.2
    nms_pre_max: int = 1000
    max_detections: int = 100

    def __post_init__(self) -> None:
        if len(self.code_weights) != CODE_SIZE:
            raise ValueError(f"CenterHeadOptions.code_weights: expected {CODE_SIZE} values, "
                             f"got {len(self.code_weights)}")
        if self.head_conv_layers < 1:
            raise ValueError(f"CenterHeadOptions.head_conv_layers must be >= 1, got {self.head_conv_layers}")
        if self.iou_weight < 0:
            raise ValueError(f"CenterHeadOptions.iou_weight must be >= 0, got {self.iou_weight}")
        if self.diou_weight < 0:
            raise ValueError(f"CenterHeadOptions.diou_weight must be >= 0, got {self.diou_weight}")
        if len(self.iou_alpha) != self.num_classes or not all(0.0 <= a <= 1.0 for a in self.iou_alpha):
            raise ValueError(f"CenterHeadOptions.iou_alpha: expected {self.num_classes} values in [0, 1] "
                             f"(one per class), got {tuple(self.iou_alpha)}")
        if not 0.0 < self.gaussian_overlap < 1.0:
            raise ValueError(f"CenterHeadOptions.gaussian_overlap must lie in (0, 1), got {self.gaussian_overlap}")
        for name in ("num_classes", "shared_channels", "head_channels", "top_k", "nms_pre_max", "max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"CenterHeadOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_radius < 0:
            raise ValueError(f"CenterHeadOptions.min_radius must be >= 0 cells, got {self.min_radius}")
        for name in ("heatmap_weight", "reg_weight", "direction_weight", "init_bias"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"CenterHeadOptions.{name} must be a finite number, got {getattr(self, name)}")
        for name in ("heatmap_weight", "reg_weight", "direction_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CenterHeadOptions.{name} must be >= 0, got {getattr(self, name)}")
        if not all(math.isfinite(w) and w >= 0 for w in self.code_weights):
            raise ValueError(f"CenterHeadOptions.code_weights: expected finite weights >= 0, got "
                             f"{tuple(self.code_weights)}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"CenterHeadOptions.score_threshold must lie in [0, 1) (a sigmoid score), got "
                             f"{self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"CenterHeadOptions.nms_iou must lie in (0, 1] (a BEV IoU), got {self.nms_iou}")


@dataclass(frozen=True)
class CenterHeadOutput:
    """Raw head outputs on a BEV grid ``[H, W]``.

    Attributes:
        heatmap: ``[B, K, H, W]`` class logits.
        offset: ``[B, 2, H, W]`` centre offset within the cell (x, y), in cells.
        z: ``[B, 1, H, W]`` centre height, metres.
        dims: ``[B, 3, H, W]`` ``log(dx, dy, dz)``, log metres.
        rot: ``[B, 2, H, W]`` box axis ``(sin 2 yaw, cos 2 yaw)`` (not normalised).
        direction: ``[B, 1, H, W]`` logit of ``cos yaw < 0`` (the heading points backwards, -x).
        iou: ``[B, 1, H, W]`` predicted ``2 IoU - 1`` of the cell's box (IoU branch), else None.
    """

    heatmap: torch.Tensor
    offset: torch.Tensor
    z: torch.Tensor
    dims: torch.Tensor
    rot: torch.Tensor
    direction: torch.Tensor
    iou: torch.Tensor | None = None

    def regression(self) -> torch.Tensor:
        """``[B, CODE_SIZE, H, W]`` regression maps in code order."""
        return torch.cat([self.offset, self.z, self.dims, self.rot], dim=1)


@dataclass(frozen=True)
class CenterTargets:
    """Training targets, positives packed (one row per ground-truth box inside the grid).

    Attributes:
        heatmap: ``[B, K, H, W]`` Gaussian target heatmap in [0, 1], exactly 1 at centre cells.
        pos_batch: ``[P]`` int64 frame index of each positive.
        pos_index: ``[P]`` int64 flat cell index ``i * W + j`` of each positive.
        pos_label: ``[P]`` int64 class of each positive.
        reg: ``[P, CODE_SIZE]`` regression targets in code order.
        direction: ``[P]`` float, 1 where ``cos yaw < 0``, else 0.
    """

    heatmap: torch.Tensor
    pos_batch: torch.Tensor
    pos_index: torch.Tensor
    pos_label: torch.Tensor
    reg: torch.Tensor
    direction: torch.Tensor

    @property
    def num_pos(self) -> int:
        return int(self.pos_batch.numel())


def gaussian_radius(dx_cells: torch.Tensor, dy_cells: torch.Tensor, min_overlap: float = 0.1) -> torch.Tensor:
    """Gaussian radius of a box footprint, CornerNet formula as used by CenterNet/CenterPoint.

    The smallest of the three radii from CornerNet's quadratics (both corners shifted inwards,
    outwards, one in and one out) by which the box may be displaced and keep IoU >= ``min_overlap``.
    Like CenterNet and CenterPoint (whose tuned ``min_overlap = 0.1`` we keep), each root is taken as
    ``(b + sqrt(b^2 - 4 a c)) / 2`` (not divided by ``a``), which makes the radii of the last two
    cases larger than the exact roots.

    Args:
        dx_cells: ``[N]`` box lengths in grid cells.
        dy_cells: ``[N]`` box widths in grid cells.
        min_overlap: IoU to keep, in (0, 1).

    Returns:
        ``[N]`` radii (float, cells; callers floor them and apply a minimum).
    """
    h, w, o = dx_cells, dy_cells, min_overlap
    b1 = h + w
    c1 = w * h * (1 - o) / (1 + o)
    r1 = (b1 + torch.sqrt(b1 * b1 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - o) * w * h
    r2 = (b2 + torch.sqrt(b2 * b2 - 16 * c2)) / 2
    a3 = 4 * o
    b3 = -2 * o * (h + w)
    c3 = (o - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 * b3 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def encode_targets(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_batch_index: torch.Tensor,
    batch_size: int,
    grid_size: tuple[int, int],
    grid_origin_m: tuple[float, float],
    cell_size_m: tuple[float, float],
    num_classes: int = 3,
    gaussian_overlap: float = 0.1,
    min_radius: int = 2,
) -> CenterTargets:
    """Builds heatmap and regression targets (vectorised over all boxes of the batch).

    Boxes whose centre ``(x, y)`` falls outside the grid are skipped (no heatmap, no positive).

    Args:
        gt_boxes: ``[M, 7]`` boxes ``(x, y, z, dx, dy, dz, yaw)``, metres / radians.
        gt_labels: ``[M]`` int64 classes in ``0 .. num_classes - 1``.
        gt_batch_index: ``[M]`` int64 frame of each box.
        batch_size: ``B``.
        grid_size: ``(H, W)`` cells along (y, x).
        grid_origin_m: ``(x0, y0)`` of the grid corner, metres.
        cell_size_m: ``(cell_x, cell_y)``, metres.
        num_classes: ``K``.
        gaussian_overlap: ``min_overlap`` of :func:`gaussian_radius`.
        min_radius: smallest radius in cells.

    Returns:
        :class:`CenterTargets` on the boxes' device.
    """
    H, W = grid_size
    dev = gt_boxes.device
    heatmap = torch.zeros(batch_size * num_classes * H * W, dtype=torch.float32, device=dev)
    boxes = gt_boxes.float()
    cx = (boxes[:, 0] - grid_origin_m[0]) / cell_size_m[0]
    cy = (boxes[:, 1] - grid_origin_m[1]) / cell_size_m[1]
    ix, iy = torch.floor(cx), torch.floor(cy)
    keep = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    boxes, cx, cy, ix, iy = boxes[keep], cx[keep], cy[keep], ix[keep].long(), iy[keep].long()
    labels, bidx = gt_labels[keep].long(), gt_batch_index[keep].long()

    if boxes.shape[0]:
        radius = gaussian_radius(boxes[:, 3] / cell_size_m[0], boxes[:, 4] / cell_size_m[1], gaussian_overlap)
        radius = torch.clamp(torch.floor(radius), min=min_radius).long()  # [P]
        rmax = int(radius.max().item())
        d = torch.arange(-rmax, rmax + 1, device=dev)
        ddy, ddx = torch.meshgrid(d, d, indexing="ij")
        ddx, ddy = ddx.reshape(1, -1), ddy.reshape(1, -1)  # [1, S]
        sigma = (2 * radius + 1).float() / 6.0  # [P]
        val = torch.exp(-(ddx * ddx + ddy * ddy).float() / (2 * sigma[:, None] ** 2))  # [P, S]
        gx, gy = ix[:, None] + ddx, iy[:, None] + ddy
        inside = ((ddx.abs() <= radius[:, None]) & (ddy.abs() <= radius[:, None])
                  & (gx >= 0) & (gx < W) & (gy >= 0) & (gy < H))
        flat = ((bidx[:, None] * num_classes + labels[:, None]) * H + gy) * W + gx
        heatmap.scatter_reduce_(0, flat[inside], val[inside], reduce="amax")

    reg = torch.stack([
        cx - ix.float(), cy - iy.float(), boxes[:, 2],
        torch.log(boxes[:, 3]), torch.log(boxes[:, 4]), torch.log(boxes[:, 5]),
        torch.sin(2 * boxes[:, 6]), torch.cos(2 * boxes[:, 6]),
    ], dim=1) if boxes.shape[0] else boxes.new_zeros((0, CODE_SIZE))
    return CenterTargets(
        heatmap=heatmap.view(batch_size, num_classes, H, W),
        pos_batch=bidx,
        pos_index=iy * W + ix,
        pos_label=labels,
        reg=reg,
        direction=(torch.cos(boxes[:, 6]) < 0).float(),
    )


def focal_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha = 2, beta = 4), normalised by positives.

    ``p = clamp(sigmoid(logits), eps, 1 - eps)``; positives are cells with ``target == 1``:
    ``loss = -(sum_pos (1-p)^2 log p + sum_neg (1-target)^4 p^2 log(1-p)) / max(num_pos, 1)``.

    Args:
        logits: ``[...]`` heatmap logits.
        target: ``[...]`` target heatmap in [0, 1], same shape.

    Returns:
        Scalar loss.
    """
    p = torch.clamp(torch.sigmoid(logits.float()), eps, 1 - eps)
    pos = target.eq(1).float()
    neg = 1.0 - pos
    pos_loss = (torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * neg).sum()
    num_pos = pos.sum().clamp(min=1.0)
    return -(pos_loss + neg_loss) / num_pos


def _decode_codes(code: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, cell_size_m: Sequence[float],
                 grid_origin_m: Sequence[float]) -> torch.Tensor:
    """Boxes ``[..., 7]`` from regression codes ``[..., CODE_SIZE]`` at cells ``(xs, ys)`` (column,
    row; float). The yaw is the box axis, ``atan2(sin 2 yaw, cos 2 yaw) / 2`` in ``(-pi/2, pi/2]``;
    the caller adds pi where the direction says so (IoU does not depend on it)."""
    x = (xs + code[..., 0]) * cell_size_m[0] + grid_origin_m[0]
    y = (ys + code[..., 1]) * cell_size_m[1] + grid_origin_m[1]
    dims = torch.exp(code[..., 3:6].clamp(max=_LOG_DIM_MAX))
    yaw = 0.5 * torch.atan2(code[..., 6], code[..., 7])
    return torch.cat([x[..., None], y[..., None], code[..., 2:3], dims, yaw[..., None]], dim=-1)


def _branch(cin: int, mid: int, cout: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
        cin = mid
    mods.append(nn.Conv2d(cin, cout, 3, padding=1, bias=True))
    return nn.Sequential(*mods)


class CenterHead(nn.Module):
    """Centre-heatmap head with target assignment, losses and decoding.

    Args:
        in_channels: channels of the BEV feature map.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` point-cloud range, metres.
        voxel_size_m: ``(sx, sy, sz)`` voxel size, metres.
        out_stride: BEV feature-map stride in voxels (cell = ``voxel_size_m[:2] * out_stride``).
        options: :class:`CenterHeadOptions`.

    Attributes:
        grid_size: ``(H, W)`` cells of the BEV map this head expects.
        cell_size_m: ``(cell_x, cell_y)`` metres.
        grid_origin_m: ``(x0, y0)`` metres.
    """

    def __init__(
        self,
        in_channels: int,
        pc_range_m: Sequence[float],
        voxel_size_m: Sequence[float],
        out_stride: int,
        options: CenterHeadOptions = CenterHeadOptions(),
    ) -> None:
        super().__init__()
        self.options = options
        self.cell_size_m = (float(voxel_size_m[0]) * out_stride, float(voxel_size_m[1]) * out_stride)
        self.grid_origin_m = (float(pc_range_m[0]), float(pc_range_m[1]))
        self.grid_size = (
            int(round((pc_range_m[4] - pc_range_m[1]) / self.cell_size_m[1])),
            int(round((pc_range_m[3] - pc_range_m[0]) / self.cell_size_m[0])),
        )
        o = options
        self.shared = nn.Sequential(
            nn.Conv2d(in_channels, o.shared_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(o.shared_channels),
            nn.ReLU(inplace=True),
        )
        mk = lambda c: _branch(o.shared_channels, o.head_channels, c, o.head_conv_layers)  # noqa: E731
        self.heatmap = mk(o.num_classes)
        self.offset = mk(2)
        self.z = mk(1)
        self.dims = mk(3)
        self.rot = mk(2)
        self.direction = mk(1)
        self.iou = mk(1) if o.iou_weight > 0 else None
        nn.init.constant_(self.heatmap[-1].bias, o.init_bias)
        self.register_buffer("code_weights", torch.tensor(o.code_weights, dtype=torch.float32), persistent=False)

    def forward(self, bev: torch.Tensor) -> CenterHeadOutput:
        """Args: bev ``[B, C, H, W]``. Returns: :class:`CenterHeadOutput` on ``[H, W]``."""
        x = self.shared(bev)
        return CenterHeadOutput(self.heatmap(x), self.offset(x), self.z(x), self.dims(x), self.rot(x),
                                self.direction(x), self.iou(x) if self.iou is not None else None)

    def encode(self, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_batch_index: torch.Tensor,
               batch_size: int) -> CenterTargets:
        """Targets for this head's grid; see :func:`encode_targets`."""
        return encode_targets(
            gt_boxes, gt_labels, gt_batch_index, batch_size, self.grid_size, self.grid_origin_m,
            self.cell_size_m, self.options.num_classes, self.options.gaussian_overlap, self.options.min_radius)

    def loss(self, out: CenterHeadOutput, targets: CenterTargets) -> dict[str, torch.Tensor]:
        """Focal heatmap loss plus weighted L1 regression and direction cross-entropy at positives
        (and the IoU branch's L1 loss, see the module docstring).

        Returns:
            ``{'loss', 'loss_heatmap', 'loss_reg', 'loss_direction', 'num_pos'}`` (scalars; ``loss``
            is weighted, the parts are unweighted; ``num_pos`` is a float tensor without gradient),
            plus ``'loss_iou'`` with the IoU branch and ``'loss_diou'`` with the DIoU loss.
        """
        if out.heatmap.shape != targets.heatmap.shape:
            raise ValueError(f"CenterHead.loss: heatmap {tuple(out.heatmap.shape)} does not match the target grid "
                             f"{tuple(targets.heatmap.shape)}; check pc_range_m / voxel_size_m / out_stride")
        o = self.options
        loss_hm = focal_loss(out.heatmap, targets.heatmap)
        reg = out.regression()
        B, C, H, W = reg.shape
        pred = reg.reshape(B, C, H * W).permute(0, 2, 1)[targets.pos_batch, targets.pos_index]  # [P, C]
        num_pos = max(targets.num_pos, 1)
        loss_reg = ((pred - targets.reg).abs() * self.code_weights).sum() / num_pos
        dir_logit = out.direction.reshape(B, H * W)[targets.pos_batch, targets.pos_index]
        loss_dir = F.binary_cross_entropy_with_logits(dir_logit.float(), targets.direction, reduction="sum") / num_pos
        losses = {
            "loss": o.heatmap_weight * loss_hm + o.reg_weight * loss_reg + o.direction_weight * loss_dir,
            "loss_heatmap": loss_hm.detach(),
            "loss_reg": loss_reg.detach(),
            "loss_direction": loss_dir.detach(),
            "num_pos": torch.tensor(float(targets.num_pos), device=reg.device),
        }
        if out.iou is not None:
            target_iou = self.iou_targets(pred.detach(), targets)
            pred_iou = out.iou.reshape(B, H * W)[targets.pos_batch, targets.pos_index].float()
            loss_iou = (pred_iou - (2 * target_iou - 1)).abs().sum() / num_pos
            losses["loss"] = losses["loss"] + o.iou_weight * loss_iou
            losses["loss_iou"] = loss_iou.detach()
        if o.diou_weight > 0:
            pred_box, gt_box = self.positive_boxes(pred.float(), targets)
            loss_diou = (1 - diou_3d_in_frame(pred_box, gt_box)).sum() / num_pos
            losses["loss"] = losses["loss"] + o.diou_weight * loss_diou
            losses["loss_diou"] = loss_diou.detach()
        return losses

    def positive_boxes(self, pred_codes: torch.Tensor, targets: CenterTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, 7], [P, 7])``: the boxes decoded from the codes ``[P, CODE_SIZE]`` regressed at the
        positive cells (in their dtype, with their gradient) and the positives' ground-truth boxes
        (yaw modulo pi, which IoU does not see)."""
        W = self.grid_size[1]
        xs, ys = (targets.pos_index % W).to(pred_codes.dtype), (targets.pos_index // W).to(pred_codes.dtype)
        pred = _decode_codes(pred_codes, xs, ys, self.cell_size_m, self.grid_origin_m)
        gt = _decode_codes(targets.reg.to(pred_codes.dtype), xs, ys, self.cell_size_m, self.grid_origin_m)
        return pred, gt

    def iou_targets(self, pred_codes: torch.Tensor, targets: CenterTargets) -> torch.Tensor:
        """``[P]`` 3D IoU between the box regressed at each positive cell (codes ``[P, CODE_SIZE]``)
        and that positive's ground-truth box."""
        return iou_3d_aligned(*self.positive_boxes(pred_codes.double(), targets)).float()

    @torch.no_grad()
    def decode(self, out: CenterHeadOutput) -> list[Detections3D]:
        """Peaks -> boxes -> threshold -> per-class rotated NMS, per frame.

        Returns:
            ``B`` :class:`Detections3D`, sorted by decreasing score, at most ``max_detections`` each.
        """
        o = self.options
        hm = torch.sigmoid(out.heatmap.float())
        B, K, H, W = hm.shape
        peak = F.max_pool2d(hm, kernel_size=3, stride=1, padding=1)
        hm = hm * (peak == hm)
        k = min(o.top_k, K * H * W)
        scores, idx = hm.reshape(B, -1).topk(k, dim=1)  # [B, k]
        labels = idx // (H * W)
        cell = idx % (H * W)
        ys, xs = (cell // W).float(), (cell % W).float()
        maps = [out.regression(), out.direction] + ([out.iou] if out.iou is not None else [])
        reg = torch.cat(maps, dim=1).float()
        reg = torch.gather(reg.reshape(B, reg.shape[1], H * W), 2,
                           cell[:, None, :].expand(B, reg.shape[1], k)).permute(0, 2, 1)  # [B, k, 9 or 10]
        boxes = _decode_codes(reg[..., :CODE_SIZE], xs, ys, self.cell_size_m, self.grid_origin_m)  # [B, k, 7]
        yaw = boxes[..., 6] + math.pi * (reg[..., CODE_SIZE] > 0).float()
        boxes[..., 6] = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi  # [-pi, pi)
        if out.iou is not None:
            iou = ((reg[..., CODE_SIZE + 1] + 1) / 2).clamp(0.0, 1.0)
            alpha = torch.tensor(o.iou_alpha, dtype=scores.dtype, device=scores.device)[labels]
            scores = scores.pow(1 - alpha) * iou.pow(alpha)

        results = []
        for b in range(B):
            m = scores[b] > o.score_threshold
            bx, sc, lb = boxes[b][m], scores[b][m], labels[b][m]
            keep_all = []
            for c in range(K):
                ci = torch.nonzero(lb == c).squeeze(1)
                if ci.numel() == 0:
                    continue
                keep = nms_bev(bx[ci], sc[ci], o.nms_iou, max_out=o.max_detections, pre_max=o.nms_pre_max)
                keep_all.append(ci[keep])
            keep = torch.cat(keep_all) if keep_all else torch.zeros(0, dtype=torch.long, device=hm.device)
            keep = keep[torch.argsort(sc[keep], descending=True)][: o.max_detections]
            results.append(Detections3D(Boxes3D(bx[keep]), sc[keep], lb[keep]))
        return results
