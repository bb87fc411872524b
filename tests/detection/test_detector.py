"""Tests of the baseline CenterPoint-style voxel detector: config, shapes, a short overfit."""
import math

import pytest
import torch

from detection.models.center_head import CenterHeadOptions
from detection.models.detector import CenterPointDetector, ModelConfig
from detection.models.dsvt import DSVTOptions
from detection.structures import collate
from perception3d.structures import Detections3D

SMALL_RANGE = (0.0, -12.8, -3.0, 25.6, 12.8, 1.0)  # 0.2 x 0.2 x 0.1 m: 40 x 128 x 128 voxels


def _tiny_cfg(**kw) -> ModelConfig:
    args = dict(
        pc_range_m=SMALL_RANGE,
        voxel_size_m=(0.2, 0.2, 0.1),
        backbone3d_stride=4,  # 32 x 32 BEV cells of 0.8 m
        max_voxels_train=20000,
        max_voxels_test=20000,
        backbone3d_channels=(8, 16, 32, 32),
        backbone3d_out_channels=32,
        bev_layer_nums=(1, 1),
        bev_num_filters=(32, 64),
        bev_num_upsample_filters=(32, 32),
        head=CenterHeadOptions(shared_channels=32, head_channels=32),
    )
    args.update(kw)
    return ModelConfig(**args)


def _box_surface_points(box: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` points uniformly on the 5 faces (not the bottom) of one box."""
    u = torch.rand(n, 3, generator=gen) - 0.5
    face = torch.randint(0, 5, (n,), generator=gen)  # 0..3 sides, 4 top
    axis = torch.where(face < 2, 0, torch.where(face < 4, 1, 2))
    sign = torch.where((face % 2 == 0) | (face == 4), 0.5, -0.5)
    u[torch.arange(n), axis] = sign
    local = u * box[3:6]
    c, s = math.cos(box[6]), math.sin(box[6])
    x = local[:, 0] * c - local[:, 1] * s
    y = local[:, 0] * s + local[:, 1] * c
    return torch.stack([x, y, local[:, 2]], 1) + box[:3]


def _synthetic_frame(seed: int, boxes: torch.Tensor, labels: torch.Tensor, n_ground: int = 4000,
                     n_per_box: int = 500, frame_id: str = "f") -> dict:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.tensor([0.0, -12.8, -1.75])
    ground = torch.rand(n_ground, 3, generator=gen) * torch.tensor([25.6, 25.6, 0.05]) + lo
    clutter = torch.rand(n_ground // 8, 3, generator=gen) * torch.tensor([25.6, 25.6, 3.0]) + lo
    pts = [ground, clutter] + [_box_surface_points(b, n_per_box, gen) for b in boxes]
    xyz = torch.cat(pts)
    intensity = torch.rand(xyz.shape[0], 1, generator=gen)
    return {"points": torch.cat([xyz, intensity], 1), "gt_boxes": boxes, "gt_labels": labels, "frame_id": frame_id}


def _scene(seed: int):
    gen = torch.Generator().manual_seed(seed)
    yaw = (torch.rand(3, generator=gen) * 2 - 1) * math.pi
    boxes = torch.tensor([
        [8.0 + seed, 3.0, -0.95, 4.2, 1.8, 1.6, 0.0],   # car
        [15.0, -6.0 + seed, -0.85, 0.8, 0.7, 1.8, 0.0],  # pedestrian
        [20.0, 5.0, -0.9, 1.8, 0.6, 1.7, 0.0],           # cyclist
    ])
    boxes[:, 6] = yaw
    return boxes, torch.tensor([0, 1, 2])


def test_config_derived_properties_and_validation():
    cfg = ModelConfig()
    assert cfg.grid_size == (40, 800, 704)
    assert cfg.bev_stride == 8 and cfg.bev_cell_m == pytest.approx((0.8, 0.8))
    assert ModelConfig(bev_layer_strides=(2, 2), bev_upsample_strides=(1, 2)).bev_stride == 16
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(pc_range_m=(0.0, -40.0, -3.0, 70.0, 40.0, 1.0))  # 700 voxels along x
    with pytest.raises(ValueError, match="vfe"):
        ModelConfig(vfe="pillar")


def test_config_from_dict_round_trip():
    from perception3d.config import config_to_dict, from_dict

    cfg = from_dict(ModelConfig, {"voxel_size_m": [0.2, 0.2, 0.1], "backbone3d_stride": 4,
                                  "head": {"nms_iou": 0.1}})
    assert cfg.bev_stride == 4 and cfg.bev_cell_m == pytest.approx((0.8, 0.8)) and cfg.head.nms_iou == 0.1
    assert from_dict(ModelConfig, config_to_dict(cfg)) == cfg


def test_forward_shapes_train_and_eval():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = CenterPointDetector(cfg)
    b0, l0 = _scene(0)
    b1, l1 = _scene(1)
    outside = torch.tensor([[40.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.0]])  # beyond x1 = 25.6: no target
    batch = collate([
        _synthetic_frame(0, b0, l0, n_ground=1000, n_per_box=100, frame_id="a"),
        _synthetic_frame(1, torch.cat([b1, outside]), torch.cat([l1, torch.tensor([0])]),
                         n_ground=1000, n_per_box=100, frame_id="b"),
    ])
    model.train()
    losses = model(batch)
    assert {"loss", "loss_heatmap", "loss_reg", "num_pos", "num_voxels"} <= set(losses)
    assert losses["num_pos"].item() == 6.0
    assert 0 < losses["num_voxels"].item() <= batch.points.shape[0]
    assert torch.isfinite(losses["loss"]) and losses["loss"].item() > 0
    losses["loss"].backward()
    grads = [p.grad for p in model.backbone3d.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    model.eval()
    with torch.no_grad():
        dets = model(batch)
    assert isinstance(dets, list) and len(dets) == 2
    assert all(isinstance(d, Detections3D) and len(d) <= cfg.head.max_detections for d in dets)


def _tiny_dsvt_cfg() -> ModelConfig:
    """DSVT on 0.4 m pillars (64 x 64 x 1), head at BEV stride 2 (0.8 m cells); a two-layer pillar
    VFE whose 48 channels the backbone's input layer maps to d_model 32."""
    return _tiny_cfg(backbone="dsvt", voxel_size_m=(0.4, 0.4, 4.0), bev_layer_strides=(2, 2),
                     bev_upsample_strides=(1, 2), pillar_vfe_filters=(32, 48), pillar_vfe_normalize=True,
                     dsvt=DSVTOptions(d_model=32, num_heads=4, ffn_dim=64, set_size=16, window_shape=(8, 8, 1),
                                      shifted_window_shape=(12, 12, 1), stage_blocks=(2,)))


def _overfit(steps: int, n_frames: int, cfg: ModelConfig | None = None, bf16: bool = False):
    torch.manual_seed(0)
    cfg = cfg or _tiny_cfg()
    model = CenterPointDetector(cfg)
    frames = [_synthetic_frame(s, *_scene(s), n_ground=2000, n_per_box=400, frame_id=str(s))
              for s in range(n_frames)]
    batch = collate(frames)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as train.precision=bf16
            losses = model(batch)
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss"].item())
    model.eval()
    with torch.no_grad():
        dets = model(batch)
    return history, dets, batch


def _check_recovered(dets, batch, max_centre_err_m: float):
    for b, det in enumerate(dets):
        gt, gl = batch.frame_gt(b)
        for box, label in zip(gt, gl):
            same = det.labels == label
            assert same.any(), f"frame {b}: no detection of class {label.item()}"
            d = (det.boxes.tensor[same, :2] - box[:2]).norm(dim=1)
            i = d.argmin()
            assert d[i].item() < max_centre_err_m
            assert det.scores[same][i].item() > 0.3


def test_overfit_one_frame_quick():
    history, dets, batch = _overfit(steps=80, n_frames=1)
    first, last = history[0], min(history[-5:])
    assert last < first / 10, f"loss {first:.3f} -> {last:.3f}"
    _check_recovered(dets, batch, 0.5)


@pytest.mark.parametrize("bf16", [False, True])
def test_dsvt_detector_overfits_one_frame(bf16):
    cfg = _tiny_dsvt_cfg()
    assert cfg.grid_size == (1, 64, 64) and cfg.bev_stride == 2 and cfg.bev_cell_m == pytest.approx((0.8, 0.8))
    history, dets, batch = _overfit(steps=80, n_frames=1, cfg=cfg, bf16=bf16)
    first, last = history[0], min(history[-5:])
    assert last < first / 10, f"loss {first:.3f} -> {last:.3f}"
    _check_recovered(dets, batch, 0.5)


def _tiny_pillars_cfg() -> ModelConfig:
    """PointPillars on the small range: 0.4 m pillars (a 1 x 64 x 64 grid), head at BEV stride 2."""
    return _tiny_cfg(backbone="pillars", voxel_size_m=(0.4, 0.4, 4.0), pillar_vfe_filters=(32,),
                     pillar_vfe_normalize=True, bev_layer_strides=(2, 2), bev_upsample_strides=(1, 2))


def test_pillar_scatter_puts_each_pillar_in_its_cell():
    from detection.models.pillars import PillarScatter
    from perception3d.sparse import SparseVoxels

    feats = torch.arange(1.0, 7.0).reshape(3, 2)
    coords = torch.tensor([[0, 0, 1, 2], [1, 0, 0, 0], [1, 0, 3, 4]], dtype=torch.int32)
    bev, _ = PillarScatter(2, (1, 4, 5))(SparseVoxels(feats, coords, (1, 4, 5), 2))
    dense = torch.zeros(2, 2, 4, 5)
    for f, (b, _, y, x) in zip(feats, coords.tolist()):
        dense[b, :, y, x] = f
    assert torch.equal(bev, dense)
    with pytest.raises(Exception, match="one voxel along z"):
        PillarScatter(2, (2, 4, 5))


def test_pointpillars_detector_overfits_one_frame():
    cfg = _tiny_pillars_cfg()
    assert cfg.grid_size == (1, 64, 64) and cfg.bev_stride == 2 and cfg.bev_cell_m == pytest.approx((0.8, 0.8))
    history, dets, batch = _overfit(steps=80, n_frames=1, cfg=cfg)
    first, last = history[0], min(history[-5:])
    assert last < first / 10, f"loss {first:.3f} -> {last:.3f}"
    _check_recovered(dets, batch, 0.5)


@pytest.mark.parametrize("backbone", ["second", "dsvt"])
def test_bf16_autocast_step_follows_fp32(backbone):
    """`train.precision=bf16` runs the forward pass under bf16 autocast (spconv stays fp32; the
    dense BEV part and DSVT's linear layers run in bf16, DSVT's attention in fp32): the losses and
    the gradient stay within bf16 rounding of the fp32 step, and differ from it (autocast was on)."""
    torch.manual_seed(0)
    model = CenterPointDetector(_tiny_dsvt_cfg() if backbone == "dsvt" else _tiny_cfg()).train()
    batch = collate([_synthetic_frame(s, *_scene(s), n_ground=2000, n_per_box=400) for s in range(2)])
    runs = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(batch)
        losses["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs.append((losses, grad))
    (l32, g32), (l16, g16) = runs
    for k in ("loss", "loss_heatmap", "loss_reg"):
        assert l16[k].item() != l32[k].item() and l16[k].item() == pytest.approx(l32[k].item(), rel=0.02), k
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    assert cos > 0.97, cos  # measured 0.985 (SECOND); a wrong gradient is far off


@pytest.mark.slow
def test_overfit_two_frames():
    history, dets, batch = _overfit(steps=150, n_frames=2)
    assert min(history[-5:]) < history[0] / 10
    _check_recovered(dets, batch, 0.3)
