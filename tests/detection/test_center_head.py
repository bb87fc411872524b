"""Tests of the CenterPoint-style head: radius, focal loss, targets, encode -> decode round trip."""
import math

import pytest
import torch

from detection.models.bev_backbone import BEVBackbone
from detection.models.center_head import (
    CODE_SIZE,
    CenterHead,
    CenterHeadOptions,
    CenterHeadOutput,
    encode_targets,
    focal_loss,
    gaussian_radius,
)
from detection.structures import DetectionBatch, collate
from perception3d.errors import DataError

PC_RANGE = (0.0, -20.0, -3.0, 40.0, 20.0, 1.0)
VOXEL = (0.1, 0.1, 0.2)
STRIDE = 4  # cell 0.4 m, grid 100 x 100


def _head(**kw) -> CenterHead:
    return CenterHead(16, PC_RANGE, VOXEL, STRIDE, CenterHeadOptions(**kw))


def _random_boxes(gen: torch.Generator, spacing: float = 8.0):
    """Non-overlapping boxes: one per lattice site (spacing m), jittered by +-1 m, random yaw."""
    xs = torch.arange(4.0, 40.0 - 3.0, spacing)
    ys = torch.arange(-16.0, 20.0 - 3.0, spacing)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    n = gx.numel()
    x = gx.reshape(-1) + (torch.rand(n, generator=gen) * 2 - 1)
    y = gy.reshape(-1) + (torch.rand(n, generator=gen) * 2 - 1)
    z = torch.rand(n, generator=gen) * 2 - 2
    dims = torch.stack([torch.rand(n, generator=gen) * 3.5 + 0.5,
                        torch.rand(n, generator=gen) * 1.5 + 0.4,
                        torch.rand(n, generator=gen) * 1.5 + 0.8], 1)
    yaw = (torch.rand(n, generator=gen) * 2 - 1) * math.pi * 1.5  # also outside (-pi, pi]
    boxes = torch.cat([x[:, None], y[:, None], z[:, None], dims, yaw[:, None]], 1)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return boxes, labels


def _perfect_outputs(head: CenterHead, t, batch_size: int) -> CenterHeadOutput:
    H, W = head.grid_size
    hm = t.heatmap.clamp(1e-6, 1 - 1e-6)
    logits = torch.log(hm) - torch.log1p(-hm)
    reg = torch.zeros(batch_size, H * W, CODE_SIZE)
    reg[t.pos_batch, t.pos_index] = t.reg
    reg = reg.permute(0, 2, 1).reshape(batch_size, CODE_SIZE, H, W)
    direction = torch.zeros(batch_size, H * W)
    direction[t.pos_batch, t.pos_index] = t.direction * 20 - 10  # confident logits
    direction = direction.reshape(batch_size, 1, H, W)
    return CenterHeadOutput(logits, reg[:, 0:2], reg[:, 2:3], reg[:, 3:6], reg[:, 6:8], direction)


def test_gaussian_radius_hand_values():
    # h = w = 10, overlap 0.5: r1 = (20 + sqrt(400 - 4*100/3)) / 2 = 18.16, r2 = (40 + sqrt(800)) / 2,
    # r3: a = 2, b = -20, c = -50 -> (-20 + sqrt(400 + 400)) / 2 = 4.1421356 (the minimum).
    r = gaussian_radius(torch.tensor([10.0, 4.0]), torch.tensor([10.0, 2.0]), 0.5)
    assert r[0].item() == pytest.approx(4.1421356, abs=1e-5)
    # h = 4, w = 2, overlap 0.5: r3: a=2, b=-6, c=-4 -> (-6 + sqrt(36 + 32)) / 2 = 1.1231056
    assert r[1].item() == pytest.approx(1.1231056, abs=1e-5)
    # overlap 0.1, 5 x 2.25 cells (a car on 0.8 m cells): r3: a=.4 b=-1.45 c=-10.125
    r = gaussian_radius(torch.tensor([5.0]), torch.tensor([2.25]), 0.1)
    assert r.item() == pytest.approx((-1.45 + math.sqrt(1.45 ** 2 + 4 * 0.4 * 10.125)) / 2, abs=1e-5)


def test_focal_loss_hand_computation():
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0])
    target = torch.tensor([1.0, 0.5, 0.0, 1.0])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))]
    pos = math.log(p[0]) * (1 - p[0]) ** 2 + math.log(p[3]) * (1 - p[3]) ** 2
    neg = math.log(1 - p[1]) * p[1] ** 2 * 0.5 ** 4 + math.log(1 - p[2]) * p[2] ** 2 * 1.0
    expected = -(pos + neg) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # no positives: normalised by 1
    assert focal_loss(logits[1:3], target[1:3]).item() == pytest.approx(-neg, rel=1e-5)


def test_targets_gaussian_and_regression():
    boxes = torch.tensor([[10.1, 0.3, -1.0, 4.0, 1.8, 1.5, 0.3],   # cell (x 25, y 50)
                          [50.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.0],   # outside x range: skipped
                          [1.0, -19.9, 0.5, 0.8, 0.6, 1.7, -2.0]])  # near the corner: cell (2, 0)
    labels = torch.tensor([0, 0, 1])
    t = encode_targets(boxes, labels, torch.tensor([0, 0, 1]), 2, (100, 100), (0.0, -20.0), (0.4, 0.4))
    assert t.num_pos == 2
    assert t.pos_batch.tolist() == [0, 1] and t.pos_label.tolist() == [0, 1]
    assert t.pos_index.tolist() == [50 * 100 + 25, 0 * 100 + 2]
    assert t.heatmap[0, 0, 50, 25].item() == 1.0 and t.heatmap[1, 1, 0, 2].item() == 1.0
    assert int((t.heatmap == 1).sum()) == 2
    # radius = max(2, floor(r)), sigma = 5/6: neighbour (1 cell) = exp(-1 / (2 sigma^2))
    sigma = 5 / 6
    assert t.heatmap[0, 0, 50, 26].item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-5)
    assert t.heatmap[0, 0, 52, 27].item() == pytest.approx(math.exp(-8 / (2 * sigma ** 2)), rel=1e-5)
    assert t.heatmap[0, 0, 50, 28].item() == 0.0  # beyond the radius
    assert t.heatmap[0, 1:].abs().sum().item() == 0.0 and t.heatmap[1, 0].abs().sum().item() == 0.0
    assert torch.allclose(t.reg[0], torch.tensor([0.25, 0.75, -1.0, math.log(4.0), math.log(1.8),
                                                  math.log(1.5), math.sin(0.6), math.cos(0.6)]), atol=1e-5)
    assert t.direction.tolist() == [0.0, 1.0]  # cos(0.3) > 0 (forward), cos(-2.0) < 0 (backward)


def test_box_and_box_turned_by_pi_share_the_axis_target():
    # The regression target of a box does not change when it is turned by pi (same box); only the
    # direction target does. (Regressing (sin yaw, cos yaw) would average these into nothing.)
    boxes = torch.tensor([[10.1, 0.3, -1.0, 4.0, 1.8, 1.5, 0.3], [20.1, 0.3, -1.0, 4.0, 1.8, 1.5, 0.3 - math.pi]])
    t = encode_targets(boxes, torch.tensor([0, 0]), torch.tensor([0, 0]), 1, (100, 100), (0.0, -20.0), (0.4, 0.4))
    assert (t.reg[0, 2:] - t.reg[1, 2:]).abs().max().item() < 1e-5
    assert t.direction.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_encode_decode_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    head = _head()
    b0, l0 = _random_boxes(gen)
    b1, l1 = _random_boxes(gen)
    boxes, labels = torch.cat([b0, b1]), torch.cat([l0, l1])
    bidx = torch.cat([torch.zeros(len(b0), dtype=torch.long), torch.ones(len(b1), dtype=torch.long)])
    t = head.encode(boxes, labels, bidx, 2)
    assert t.num_pos == len(boxes)
    dets = head.decode(_perfect_outputs(head, t, 2))
    assert len(dets) == 2
    for det, gt, gl in ((dets[0], b0, l0), (dets[1], b1, l1)):
        assert len(det) == len(gt)
        pb = det.boxes.tensor
        order = torch.cdist(gt[:, :2], pb[:, :2]).argmin(1)
        pb, pl = pb[order], det.labels[order]
        assert torch.equal(pl, gl)
        assert (pb[:, :6] - gt[:, :6]).abs().max().item() < 1e-4
        dyaw = torch.remainder(pb[:, 6] - gt[:, 6] + math.pi, 2 * math.pi) - math.pi
        assert dyaw.abs().max().item() < 1e-4
        assert (det.scores > 0.99).all()


def test_decode_threshold_nms_and_max():
    head = _head(max_detections=3, score_threshold=0.3)
    H, W = head.grid_size
    logits = torch.full((1, 3, H, W), -10.0)
    logits[0, 0, 10, 10] = 3.0   # two peaks of the same class 2 cells apart on one big box -> NMS
    logits[0, 0, 10, 12] = 2.0
    logits[0, 1, 10, 12] = 1.0   # other class, same place: survives the per-class NMS
    logits[0, 2, 50, 50] = -0.5  # sigmoid 0.38 > 0.3
    logits[0, 2, 80, 80] = -1.0  # sigmoid 0.27 < 0.3: dropped
    reg = torch.zeros(1, CODE_SIZE, H, W)
    reg[:, 3:6] = math.log(4.0)
    reg[:, 7] = 1.0
    out = CenterHeadOutput(logits, reg[:, 0:2], reg[:, 2:3], reg[:, 3:6], reg[:, 6:8], torch.zeros(1, 1, H, W))
    det = head.decode(out)[0]
    assert det.labels.tolist() == [0, 1, 2]
    assert torch.allclose(det.scores, torch.sigmoid(torch.tensor([3.0, 1.0, -0.5])))
    assert det.boxes.tensor[0, :2].tolist() == pytest.approx([10 * 0.4, -20 + 10 * 0.4])


def test_head_forward_loss_and_grad():
    torch.manual_seed(0)
    head = _head(shared_channels=8, head_channels=8)
    bev = torch.randn(2, 16, 100, 100)
    out = head(bev)
    assert out.heatmap.shape == (2, 3, 100, 100) and out.regression().shape == (2, CODE_SIZE, 100, 100)
    assert torch.sigmoid(out.heatmap).mean().item() == pytest.approx(0.1, abs=0.05)  # bias -2.19
    boxes = torch.tensor([[10.0, 0.0, -1.0, 4.0, 1.8, 1.5, 0.3]])
    t = head.encode(boxes, torch.tensor([0]), torch.tensor([1]), 2)
    losses = head.loss(out, t)
    assert set(losses) >= {"loss", "loss_heatmap", "loss_reg", "loss_direction", "num_pos"}
    assert losses["num_pos"].item() == 1.0
    expected = losses["loss_heatmap"] + 0.25 * losses["loss_reg"] + 0.2 * losses["loss_direction"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the direction loss is the cross-entropy of the logit at the box's cell (row 50, column 25) for "forward"
    logit = out.direction[1, 0, 50, 25]
    assert losses["loss_direction"].item() == pytest.approx(-math.log(1 - torch.sigmoid(logit).item()), rel=1e-5)
    losses["loss"].backward()
    assert head.offset[-1].weight.grad.abs().sum().item() > 0
    assert head.direction[-1].weight.grad.abs().sum().item() > 0
    with pytest.raises(ValueError, match="target grid"):
        head.loss(head(torch.randn(2, 16, 50, 50)), t)


def test_options_validation():
    with pytest.raises(ValueError, match="code_weights"):
        CenterHeadOptions(code_weights=(1.0,) * 7)
    with pytest.raises(ValueError, match="iou_alpha"):
        CenterHeadOptions(iou_alpha=(0.5, 0.5))
    with pytest.raises(ValueError, match="iou_alpha"):
        CenterHeadOptions(iou_alpha=(0.5, 0.5, 1.5))
    with pytest.raises(ValueError, match="iou_weight"):
        CenterHeadOptions(iou_weight=-1.0)
    with pytest.raises(ValueError, match="diou_weight"):
        CenterHeadOptions(diou_weight=-0.5)


def _two_frame_car_targets(head: CenterHead):
    """The same car (yaw 0, 4 x 2 x 1.5 m) in frames 0 and 1, at the same place."""
    box = torch.tensor([[10.2, 0.2, -1.0, 4.0, 2.0, 1.5, 0.0]])
    return head.encode(box.repeat(2, 1), torch.tensor([0, 0]), torch.tensor([0, 1]), 2)


def test_iou_targets_hand_computed_and_per_frame():
    head = _head(iou_weight=1.0)
    t = _two_frame_car_targets(head)
    codes = t.reg.clone()
    codes[1, 0] += 2.0  # frame 1's box 2 cells = 0.8 m further along x (its length)
    iou = head.iou_targets(codes, t)
    # frame 0: exact box; frame 1: overlap 3.2 x 2 x 1.5 = 9.6 m^3 over 2 * 12 - 9.6 = 14.4 m^3. Had the
    # frames been compared with each other, frame 0's box would also meet frame 1's ground truth.
    assert iou.tolist() == pytest.approx([1.0, 2.0 / 3.0], abs=1e-6)


def test_iou_branch_loss_and_rectified_decode():
    torch.manual_seed(0)
    head = _head(iou_weight=0.5, shared_channels=8, head_channels=8)
    assert _head().iou is None and not any("iou" in k for k in _head().state_dict())  # off by default
    out = head(torch.randn(2, 16, 100, 100))
    t = _two_frame_car_targets(head)
    losses = head.loss(out, t)
    # L1 between the predicted 2 IoU - 1 at the two positive cells and the IoU of the boxes regressed there
    pred = out.regression().reshape(2, CODE_SIZE, -1).permute(0, 2, 1)[t.pos_batch, t.pos_index]
    target = 2 * head.iou_targets(pred.detach(), t) - 1
    got = out.iou.reshape(2, -1)[t.pos_batch, t.pos_index]
    assert losses["loss_iou"].item() == pytest.approx((got - target).abs().sum().item() / 2, rel=1e-5)
    rest = losses["loss_heatmap"] + 0.25 * losses["loss_reg"] + 0.2 * losses["loss_direction"]
    assert losses["loss"].item() == pytest.approx((rest + 0.5 * losses["loss_iou"]).item(), rel=1e-6)
    losses["loss"].backward()
    assert head.iou[-1].weight.grad.abs().sum().item() > 0

    # decode: two Cars of heatmap scores 0.8 and 0.6 with predicted IoUs 0.2 and 0.9 swap places
    H, W = head.grid_size
    logits = torch.full((1, 3, H, W), -10.0)
    logits[0, 0, 10, 10], logits[0, 0, 60, 60] = math.log(0.8 / 0.2), math.log(0.6 / 0.4)
    reg = torch.zeros(1, CODE_SIZE, H, W)
    reg[:, 3:6], reg[:, 7] = math.log(2.0), 1.0
    iou = torch.zeros(1, 1, H, W)
    iou[0, 0, 10, 10], iou[0, 0, 60, 60] = 2 * 0.2 - 1, 2 * 0.9 - 1
    out = CenterHeadOutput(logits, reg[:, 0:2], reg[:, 2:3], reg[:, 3:6], reg[:, 6:8], torch.zeros(1, 1, H, W), iou)
    det = head.decode(out)[0]
    a = 0.68
    assert det.scores.tolist() == pytest.approx([0.6 ** (1 - a) * 0.9 ** a, 0.8 ** (1 - a) * 0.2 ** a], rel=1e-5)
    assert det.boxes.tensor[0, :2].tolist() == pytest.approx([60 * 0.4, -20 + 60 * 0.4])


def test_diou_loss_hand_computed_with_gradient():
    head = _head(diou_weight=2.0)
    t = _two_frame_car_targets(head)
    out = _perfect_outputs(head, t, 2)
    offset = out.offset.clone()
    offset[1, 0].view(-1)[t.pos_index[1]] += 2.0  # frame 1's box 0.8 m further along x, as above
    offset.requires_grad_(True)
    out = CenterHeadOutput(out.heatmap, offset, out.z, out.dims, out.rot, out.direction)
    losses = head.loss(out, t)
    # frame 0 exact: 1 - DIoU = 0; frame 1: IoU 2/3, centres 0.8 m apart, enclosing box 4.8 x 2 x 1.5 m
    diou = 2.0 / 3.0 - 0.8 ** 2 / (4.8 ** 2 + 2.0 ** 2 + 1.5 ** 2)
    assert losses["loss_diou"].item() == pytest.approx((1 - diou) / 2, rel=1e-5)
    rest = losses["loss_heatmap"] + 0.25 * losses["loss_reg"] + 0.2 * losses["loss_direction"]
    assert losses["loss"].item() == pytest.approx((rest + 2.0 * losses["loss_diou"]).item(), rel=1e-6)
    losses["loss"].backward()
    g = offset.grad[1, 0].view(-1)[t.pos_index[1]].item()
    assert g > 0  # the loss falls as frame 1's box moves back (the L1 term pulls the same way)
    assert "loss_diou" not in _head().loss(_perfect_outputs(_head(), t, 2), t)  # off by default


def test_bev_backbone_shapes():
    net = BEVBackbone(16, layer_nums=(1, 1), layer_strides=(1, 2), num_filters=(8, 16),
                      upsample_strides=(1, 2), num_upsample_filters=(8, 8))
    assert net.out_channels == 16 and net.out_stride == 1.0
    assert net(torch.randn(2, 16, 20, 24)).shape == (2, 16, 20, 24)
    net = BEVBackbone(16, layer_nums=(1, 1), layer_strides=(2, 2), num_filters=(8, 16),
                      upsample_strides=(0.5, 1), num_upsample_filters=(8, 4))
    assert net.out_stride == 4.0 and net(torch.randn(1, 16, 20, 24)).shape == (1, 12, 5, 6)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 16, 18, 24))
    with pytest.raises(ValueError, match="different strides"):
        BEVBackbone(16, layer_nums=(1, 1), layer_strides=(1, 2), upsample_strides=(1, 1))


def test_detection_batch_collate_and_validation():
    samples = [
        {"points": torch.randn(5, 4), "gt_boxes": torch.tensor([[1.0, 0, 0, 2, 1, 1, 0]]),
         "gt_labels": [2], "frame_id": "a"},
        {"points": torch.randn(3, 4).numpy(), "gt_boxes": torch.zeros(0, 7), "gt_labels": [], "frame_id": "b"},
    ]
    batch = collate(samples)
    assert batch.batch_size == 2 and batch.frame_ids == ("a", "b")
    assert batch.point_offsets.tolist() == [0, 5, 8] and batch.gt_offsets.tolist() == [0, 1, 1]
    assert batch.point_batch_index().tolist() == [0] * 5 + [1] * 3
    assert batch.gt_labels.dtype == torch.int64 and batch.frame_gt(1)[0].shape == (0, 7)
    assert batch.to("cpu").points.shape == (8, 4)
    bad = dict(samples[0], gt_labels=[3])
    with pytest.raises(DataError, match="gt_labels"):
        collate([bad])
    with pytest.raises(DataError, match="NaN"):
        collate([dict(samples[0], points=torch.full((2, 4), float("nan")))])
    with pytest.raises(DataError, match="point_offsets"):
        DetectionBatch(batch.points, torch.tensor([0, 9]), batch.gt_boxes, batch.gt_labels,
                       torch.tensor([0, 1]), ("a",))
    with pytest.raises(DataError, match="frame_ids"):
        DetectionBatch(batch.points, batch.point_offsets, batch.gt_boxes, batch.gt_labels,
                       batch.gt_offsets, ("a",))
