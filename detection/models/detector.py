"""The baseline SECOND / CenterPoint-style voxel detector for Car, Pedestrian and Cyclist.

Data flow (all on the points' device):

``DetectionBatch.points [N, 4]`` -> per frame ``voxelize_hard`` -> ``MeanVFE`` (mean point per
voxel) -> ``SparseVoxels(feats [V, 4], coords [V, 4] (b, z, y, x))`` -> ``SparseBackbone3D``
(SECOND sparse 3D convs, 8x down, height folded into channels) -> dense BEV ``[B, C, Y/8, X/8]``
-> ``BEVBackbone`` (2D convs) -> ``CenterHead`` -> training: losses; eval: one
``Detections3D`` per frame. With ``backbone: dsvt`` the first three steps are dynamic voxelization,
``PillarVFE`` and the DSVT transformer (``detection.models.dsvt``); with ``backbone: pillars``
(CenterPoint's PointPillars) dynamic pillars, ``PillarVFE`` and ``PillarScatter`` (a dense BEV map
of the pillar features, no 3D backbone); the rest is the same.

The defaults are chosen to train on a 2-core CPU: voxels of 0.1 m on the KITTI front range
(70.4 x 80 x 4 m: a 40 x 800 x 704 grid; 40 z voxels collapse to one BEV slice), a 100 x 88 BEV
map of 0.8 m cells and a slimmer BEV backbone than SECOND's (64/128 filters, 3 + 3 layers):
1.83 M parameters; one training step (forward + backward) on a 30k-point synthetic frame
(19k voxels) takes about 0.85 s with 2 threads on an idle 2-core CPU, eval about 0.27 s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import nn

from detection.models.backbone3d import SparseBackbone3D
from detection.models.bev_backbone import BEVBackbone
from detection.models.center_head import CenterHead, CenterHeadOptions
from detection.models.dsvt import DSVTBackbone, DSVTOptions
from detection.models.pillars import PillarScatter
from detection.structures import DetectionBatch
from detection.models.vfe import PillarVFE
from perception3d.ops.voxelize import MeanVFE, grid_shape, voxelize_dynamic, voxelize_hard
from perception3d.sparse import SparseVoxels
from detection.structures import CLASSES
from perception3d.structures import Detections3D

__all__ = ["ModelConfig", "CenterPointDetector"]


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`CenterPointDetector`.

    Attributes:
        voxel_size_m: ``(sx, sy, sz)`` voxel size, metres.
        pc_range_m: ``(x0, y0, z0, x1, y1, z1)`` point-cloud range, metres; each extent must be a
            multiple of the voxel size, and the x / y voxel counts multiples of ``bev_stride``.
        num_point_features: point columns used, ``(x, y, z, intensity)``.
        max_points_per_voxel: points kept per voxel (its first, in input order) by the hard
            voxelization of the ``second`` backbone; the ``dsvt`` backbone voxelizes dynamically
            and keeps every point, so this and the two below do not apply to it.
        max_voxels_train: voxels kept per frame in training mode (``second``).
        max_voxels_test: voxels kept per frame in eval mode (``second``).
        vfe: voxel feature encoder of the ``second`` backbone; ``"mean"``: the mean of the voxel's
            points. The ``dsvt`` backbone always encodes dynamic voxels with a
            :class:`~detection.models.vfe.PillarVFE` (see ``pillar_vfe_filters``).
        pillar_vfe_filters: PFN layer widths of the pillar VFE of the ``dsvt`` and ``pillars``
            backbones (DSVT's: ``[128, 128]``, PointPillars': ``[64]``); empty: one layer of width
            ``dsvt.d_model`` (``dsvt``) or 64 (``pillars``). For ``dsvt``, a last width other than
            ``dsvt.d_model`` is mapped to it by the backbone's input linear layer.
        pillar_vfe_normalize: rescale the pillar VFE's input coordinates (``PillarVFE``'s
            ``normalize_inputs``: absolute to ``[-1, 1]`` over the range, offsets in voxel sizes).
        pillar_vfe_height_bins: bins of the vertical profile the pillar VFE appends to each voxel
            feature (``PillarVFE``'s ``height_bins``; 0: none).
        backbone: ``"second"``: the SECOND sparse-conv backbone on hard voxels (fields
            ``backbone3d_*``); ``"dsvt"``: the DSVT transformer (:mod:`detection.models.dsvt`) on
            dynamic voxels, the voxel grid being its pillar (``Z = 1``) or voxel grid, at BEV
            stride ``dsvt.bev_patch``; ``"pillars"``: PointPillars, the pillar features scattered
            to a dense BEV map (:class:`~detection.models.pillars.PillarScatter`; ``Z = 1``, BEV
            stride 1 before the BEV backbone).
        dsvt: :class:`~detection.models.dsvt.DSVTOptions` of the ``dsvt`` backbone.
        backbone3d_channels: channels of the four stages of the sparse 3D backbone.
        backbone3d_out_channels: channels of the backbone's last (z-collapsing) conv; the BEV map
            has ``backbone3d_out_channels * Z'`` channels (``Z' = 1`` for 40 z voxels, 2 for 41).
        backbone3d_stride: x / y downsampling of the sparse backbone, 8 (SECOND) or 4.
        bev_layer_nums, bev_layer_strides, bev_num_filters, bev_upsample_strides,
        bev_num_upsample_filters: :class:`BEVBackbone` options.
        bn_momentum: momentum set on every BatchNorm of the model (PyTorch's 0.1; SECOND's 0.01
            leaves the running statistics unsettled after the few hundred steps of a CPU run).
        head: :class:`CenterHeadOptions` (score threshold, NMS, loss weights, ...).
    """

    voxel_size_m: tuple[float, float, float] = (0.1, 0.1, 0.1)
    pc_range_m: tuple[float, float, float, float, float, float] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
    num_point_features: int = 4
    max_points_per_voxel: int = 5
    max_voxels_train: int = 40000
    max_voxels_test: int = 40000
    vfe: Literal["mean"] = "mean"
    pillar_vfe_filters: tuple[int, ...] = ()
    pillar_vfe_normalize: bool = False
    pillar_vfe_height_bins: int = 0
    backbone: Literal["second", "dsvt", "pillars"] = "second"
    dsvt: DSVTOptions = field(default_factory=DSVTOptions)
    backbone3d_channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    backbone3d_out_channels: int = 128
    backbone3d_stride: Literal[4, 8] = 8
    bev_layer_nums: tuple[int, ...] = (3, 3)
    bev_layer_strides: tuple[int, ...] = (1, 2)
    bev_num_filters: tuple[int, ...] = (64, 128)
    bev_upsample_strides: tuple[float, ...] = (1, 2)
    bev_num_upsample_filters: tuple[int, ...] = (128, 128)
    bn_momentum: float = 0.1
    head: CenterHeadOptions = field(default_factory=CenterHeadOptions)

    def __post_init__(self) -> None:
        if self.vfe != "mean":
            raise ValueError(f"ModelConfig.vfe: only 'mean' is supported, got {self.vfe!r}")
        if self.head.num_classes != len(CLASSES):
            raise ValueError(f"ModelConfig.head.num_classes must be {len(CLASSES)} ({CLASSES}), "
                             f"got {self.head.num_classes}")
        if self.num_point_features < 3:
            raise ValueError(f"ModelConfig.num_point_features must be >= 3, got {self.num_point_features}")
        for name in ("max_points_per_voxel", "max_voxels_train", "max_voxels_test", "backbone3d_out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pillar_vfe_height_bins < 0:
            raise ValueError(f"ModelConfig.pillar_vfe_height_bins must be >= 0, got {self.pillar_vfe_height_bins}")
        for name in ("pillar_vfe_filters", "backbone3d_channels", "bev_num_filters", "bev_num_upsample_filters"):
            if any(c < 1 for c in getattr(self, name)):
                raise ValueError(f"ModelConfig.{name}: expected channel counts >= 1, got {list(getattr(self, name))}")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"ModelConfig.bn_momentum must lie in [0, 1], got {self.bn_momentum}")
        self._check_bev()
        self._check_range()
        Z, Y, X = self.grid_size
        s = self.bev_stride
        if X % s or Y % s:
            raise ValueError(f"ModelConfig: the voxel grid {X} x {Y} (x, y) is not divisible by the BEV stride {s}; "
                             "adjust pc_range_m or voxel_size_m")

    def _check_bev(self) -> None:
        names = ("bev_layer_nums", "bev_layer_strides", "bev_num_filters", "bev_upsample_strides",
                 "bev_num_upsample_filters")
        lengths = [len(getattr(self, n)) for n in names]
        if len(set(lengths)) != 1 or lengths[0] == 0:
            raise ValueError("ModelConfig: " + ", ".join(names) + " need one entry per BEV stage (at least one), "
                             f"got lengths {lengths}")
        if any(n < 0 for n in self.bev_layer_nums) or any(s < 1 for s in self.bev_layer_strides):
            raise ValueError(f"ModelConfig: bev_layer_nums must be >= 0 and bev_layer_strides >= 1, got "
                             f"{list(self.bev_layer_nums)} and {list(self.bev_layer_strides)}")
        factors, cum = [], 1.0
        for ls, us in zip(self.bev_layer_strides, self.bev_upsample_strides):
            cum *= ls
            whole = us >= 1 and abs(us - round(us)) < 1e-6
            inverse = 0 < us < 1 and abs(1 / us - round(1 / us)) < 1e-6
            if not (whole or inverse):
                raise ValueError(f"ModelConfig.bev_upsample_strides: expected integers >= 1 (upsampling) or "
                                 f"1/k (downsampling, e.g. 0.5), got {list(self.bev_upsample_strides)}")
            factors.append(cum / round(us) if whole else cum * round(1 / us))
        if len(set(factors)) != 1:
            raise ValueError(f"ModelConfig.bev_upsample_strides: the BEV stages reach different strides {factors} "
                             f"(layer strides {list(self.bev_layer_strides)}); choose upsample strides so that "
                             "all stages meet at one resolution")

    def _check_range(self) -> None:
        grid_shape(self.voxel_size_m, self.pc_range_m)  # positive sizes, x1 > x0, ...
        for i, axis in enumerate("xyz"):
            extent = self.pc_range_m[i + 3] - self.pc_range_m[i]
            n = extent / self.voxel_size_m[i]
            if abs(n - round(n)) > 1e-3:
                raise ValueError(f"ModelConfig: the {axis} extent of pc_range_m ({extent:g} m) is not a multiple of "
                                 f"voxel_size_m[{i}] = {self.voxel_size_m[i]:g} m ({n:.3f} voxels); adjust "
                                 "pc_range_m or voxel_size_m")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxel grid ``(Z, Y, X)``."""
        return grid_shape(self.voxel_size_m, self.pc_range_m)

    @property
    def bev_stride(self) -> int:
        """Stride of the head's BEV map in voxels: 3D backbone stride times the BEV backbone's."""
        cum, factors = 1.0, []
        for ls, us in zip(self.bev_layer_strides, self.bev_upsample_strides):
            cum *= ls
            factors.append(cum / us if us >= 1 else cum * round(1 / us))
        stride3d = {"second": self.backbone3d_stride, "dsvt": self.dsvt.bev_patch, "pillars": 1}[self.backbone]
        return int(round(stride3d * factors[0]))

    @property
    def bev_cell_m(self) -> tuple[float, float]:
        """Size ``(x, y)`` of one BEV cell of the head, metres."""
        return (self.voxel_size_m[0] * self.bev_stride, self.voxel_size_m[1] * self.bev_stride)


class CenterPointDetector(nn.Module):
    """SECOND (or DSVT) backbone + CenterPoint head (see the module docstring for the data flow).

    Args:
        cfg: :class:`ModelConfig`.

    ``forward(batch)``: in training mode returns ``{'loss', 'loss_heatmap', 'loss_reg',
    'num_pos', 'num_voxels'}`` (scalar tensors; ``loss`` carries the gradient); in eval mode
    returns ``list[Detections3D]``, one per frame, boxes in the LiDAR frame.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "second":
            self.vfe = MeanVFE()
            self.backbone3d = SparseBackbone3D(
                cfg.num_point_features, cfg.grid_size, channels=cfg.backbone3d_channels,
                out_channels=cfg.backbone3d_out_channels, bev_stride=cfg.backbone3d_stride)
        else:
            filters = cfg.pillar_vfe_filters or ((cfg.dsvt.d_model,) if cfg.backbone == "dsvt" else (64,))
            self.vfe = PillarVFE(cfg.num_point_features, filters, cfg.voxel_size_m, cfg.pc_range_m,
                                 normalize_inputs=cfg.pillar_vfe_normalize,
                                 height_bins=cfg.pillar_vfe_height_bins)
            if cfg.backbone == "dsvt":
                self.backbone3d = DSVTBackbone(self.vfe.out_channels, cfg.grid_size, cfg.dsvt)
            else:
                self.backbone3d = PillarScatter(self.vfe.out_channels, cfg.grid_size)
        self.bev_backbone = BEVBackbone(
            self.backbone3d.bev_shape[0], cfg.bev_layer_nums, cfg.bev_layer_strides, cfg.bev_num_filters,
            cfg.bev_upsample_strides, cfg.bev_num_upsample_filters)
        self.head = CenterHead(self.bev_backbone.out_channels, cfg.pc_range_m, cfg.voxel_size_m,
                               cfg.bev_stride, cfg.head)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
        # a callable `bev -> CenterHeadOutput` replacing bev_backbone + head at inference (None: them)
        self.dense = None

    def voxelize(self, batch: DetectionBatch) -> SparseVoxels:
        """Voxelizes every frame and encodes each voxel with the VFE: hard voxels and the mean
        VFE for the ``second`` backbone, dynamic voxels and the pillar VFE for ``dsvt``.

        Returns:
            :class:`SparseVoxels` with ``feats [V, C]``, ``coords [V, 4] (b, z, y, x)``.
        """
        cfg = self.cfg
        pts = batch.points[:, : cfg.num_point_features]
        if pts.shape[1] < cfg.num_point_features:
            raise ValueError(f"CenterPointDetector: points have {pts.shape[1]} columns, the model expects "
                             f"{cfg.num_point_features} (x, y, z, intensity)")
        if cfg.backbone in ("dsvt", "pillars"):
            return self._voxelize_dynamic(batch, pts)
        max_voxels = cfg.max_voxels_train if self.training else cfg.max_voxels_test
        voxels, coords, counts = [], [], []
        for b in range(batch.batch_size):
            v, c, n = voxelize_hard(pts[batch.point_offsets[b]:batch.point_offsets[b + 1]], cfg.voxel_size_m,
                                    cfg.pc_range_m, cfg.max_points_per_voxel, max_voxels)
            voxels.append(v)
            coords.append(torch.cat([torch.full_like(c[:, :1], b), c], dim=1))
            counts.append(n)
        feats = self.vfe(torch.cat(voxels), torch.cat(counts))
        return SparseVoxels(feats, torch.cat(coords).to(torch.int32), cfg.grid_size, batch.batch_size)

    def _voxelize_dynamic(self, batch: DetectionBatch, pts: torch.Tensor) -> SparseVoxels:
        cfg = self.cfg
        p2v, coords, offset = [], [], 0
        for b in range(batch.batch_size):
            v, c = voxelize_dynamic(pts[batch.point_offsets[b]:batch.point_offsets[b + 1]], cfg.voxel_size_m,
                                    cfg.pc_range_m)
            p2v.append(torch.where(v >= 0, v + offset, v))
            coords.append(torch.cat([torch.full_like(c[:, :1], b), c], dim=1))
            offset += c.shape[0]
        coords = torch.cat(coords)
        feats = self.vfe(pts, torch.cat(p2v), coords[:, 1:])
        return SparseVoxels(feats, coords.to(torch.int32), cfg.grid_size, batch.batch_size)

    def forward(self, batch: DetectionBatch) -> Union[dict[str, torch.Tensor], list[Detections3D]]:
        """Training: loss dict; eval: one :class:`Detections3D` per frame (see the class docstring)."""
        sv = self.voxelize(batch)
        bev, _ = self.backbone3d(sv)
        # channels-last (DSVT's fold already returns it): the same convolutions, faster in oneDNN,
        # most of all in bf16 (train.precision); "Training speed" in docs/experiments/dsvt_vs_second.md
        if self.dense is not None:  # another runtime for the dense part (detection/quant.py: INT8)
            out = self.dense(bev)
        else:
            out = self.head(self.bev_backbone(bev.contiguous(memory_format=torch.channels_last)))
        if not self.training:
            return self.head.decode(out)
        targets = self.head.encode(batch.gt_boxes, batch.gt_labels, batch.gt_batch_index(), batch.batch_size)
        losses = self.head.loss(out, targets)
        losses["num_voxels"] = torch.tensor(float(sv.num_voxels), device=batch.points.device)
        return losses
