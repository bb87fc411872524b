"""Tests for perception3d.geometry.iou against shapely and naive references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from perception3d.errors import DataError
from perception3d.geometry.boxes import box_corners
from perception3d.geometry.iou import (bev_intersection_area, diou_3d_in_frame, iou_3d, iou_3d_aligned, iou_bev,
                                       nms_bev)


def _poly(box: torch.Tensor) -> Polygon:
    return Polygon(box_corners(box[None].double())[0, :4, :2].numpy())


def _random_pairs(n: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs: generic overlaps plus identical, rotated-by-pi, contained, touching, far."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n, 7, dtype=torch.float64)
    a[:, :2] = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100 - 50
    a[:, 2] = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    a[:, 3:6] = torch.rand(n, 3, generator=g, dtype=torch.float64) * 4 + 0.2
    a[:, 6] = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    b = a.clone()
    b[:, :3] += torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.5
    b[:, 3:6] = torch.rand(n, 3, generator=g, dtype=torch.float64) * 4 + 0.2
    b[:, 6] = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    b[0:40] = a[0:40]  # identical
    b[40:80] = a[40:80]
    b[40:80, 6] += math.pi  # rotated by pi: same footprint
    b[80:120] = a[80:120]  # contained: same centre and yaw, smaller
    b[80:120, 3:6] *= 0.5
    b[120:160] = a[120:160]  # touching edge to edge along the heading
    c, s = torch.cos(a[120:160, 6]), torch.sin(a[120:160, 6])
    b[120:160, 0] += c * a[120:160, 3]
    b[120:160, 1] += s * a[120:160, 3]
    b[160:200] = a[160:200]  # far apart
    b[160:200, 0] += 20
    b[200:240] = a[200:240]  # same centre, axis-aligned vs rotated by 45 degrees
    b[200:240, 6] += math.pi / 4
    return a, b


def _shapely_iou(a, b):
    inter = np.empty(len(a))
    iou = np.empty(len(a))
    for k in range(len(a)):
        p, q = _poly(a[k]), _poly(b[k])
        inter[k] = p.intersection(q).area
        iou[k] = inter[k] / (p.area + q.area - inter[k])
    return inter, iou


def test_iou_bev_vs_shapely():
    a, b = _random_pairs()
    inter_ref, iou_ref = _shapely_iou(a, b)
    iou = iou_bev(a, b)
    assert iou.shape == (500, 500) and iou.dtype == torch.float64
    diag = torch.diagonal(iou).numpy()
    assert np.abs(diag - iou_ref).max() <= 1e-6
    assert (diag[:40] == 1.0).all()  # identical: exactly one
    assert np.abs(diag[40:80] - 1.0).max() <= 1e-12  # rotated by pi
    assert (diag[160:200] == 0.0).all()  # disjoint
    assert np.abs(diag[120:160]).max() <= 1e-6  # touching: zero area
    assert 0.05 < iou_ref[240:].mean() < 0.95  # the generic pairs are non-trivial overlaps
    inter = torch.diagonal(bev_intersection_area(a, b)).numpy()
    assert np.abs(inter - inter_ref).max() <= 1e-6


def test_iou_bev_all_pairs_vs_shapely():
    a, b = _random_pairs(60, seed=1)
    a[:, :2] = a[:, :2] * 0.05  # crowd them so that many off-diagonal pairs overlap
    b[:, :2] = b[:, :2] * 0.05
    iou = iou_bev(a, b).numpy()
    pa, pb = [_poly(x) for x in a], [_poly(x) for x in b]
    ref = np.array([[pa[i].intersection(pb[j]).area for j in range(60)] for i in range(60)])
    area_a = (a[:, 3] * a[:, 4]).numpy()
    area_b = (b[:, 3] * b[:, 4]).numpy()
    ref = ref / (area_a[:, None] + area_b[None] - ref)
    assert (ref > 0).sum() > 600
    assert np.abs(iou - ref).max() <= 1e-6


def test_iou_3d_vs_shapely_times_z_overlap():
    a, b = _random_pairs(300, seed=2)
    inter_ref, _ = _shapely_iou(a, b)
    top = torch.minimum(a[:, 2] + a[:, 5] / 2, b[:, 2] + b[:, 5] / 2)
    bot = torch.maximum(a[:, 2] - a[:, 5] / 2, b[:, 2] - b[:, 5] / 2)
    inter3 = inter_ref * (top - bot).clamp(min=0).numpy()
    vol_a = a[:, 3:6].prod(1).numpy()
    vol_b = b[:, 3:6].prod(1).numpy()
    ref = inter3 / (vol_a + vol_b - inter3)
    iou = torch.diagonal(iou_3d(a, b)).numpy()
    assert np.abs(iou - ref).max() <= 1e-6
    assert (iou[:40] == 1.0).all()
    # Contained boxes (half size, same centre): IoU = 1/8.
    assert np.abs(iou[80:120] - 0.125).max() <= 1e-12


def test_iou_hand_computed():
    # Two unit-height 2x2 squares offset by 1 m in x: BEV intersection 2, union 6.
    a = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.5, 2.0, 2.0, 1.0, 0.0]])
    assert iou_bev(a, b).item() == pytest.approx(1 / 3, abs=1e-7)
    # 3D: z-overlap 0.5 -> intersection 1, union 4 + 4 - 1 = 7.
    assert iou_3d(a, b).item() == pytest.approx(1 / 7, abs=1e-7)
    assert iou_bev(a, b).dtype == torch.float32
    # Square vs the same square rotated 45 degrees: octagon of area 8 (sqrt 2 - 1).
    c = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 1.0, math.pi / 4]], dtype=torch.float64)
    inter = 8 * (math.sqrt(2) - 1)
    assert iou_bev(a.double(), c).item() == pytest.approx(inter / (8 - inter), abs=1e-12)


def test_iou_empty_and_bad_input():
    assert iou_bev(torch.zeros(0, 7), torch.zeros(3, 7)).shape == (0, 3)
    with pytest.raises(DataError, match="b"):
        iou_bev(torch.zeros(2, 7), torch.zeros(2, 5))
    with pytest.raises(DataError, match="floating"):
        iou_3d(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7))


def _naive_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    polys = [_poly(b) for b in boxes]
    keep = []
    for i in order:
        ok = True
        for k in keep:
            p, q = polys[i], polys[k]
            inter = p.intersection(q).area
            if inter / (p.area + q.area - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_vs_naive():
    g = torch.Generator().manual_seed(4)
    n = 120
    boxes = torch.empty(n, 7, dtype=torch.float64)
    boxes[:, :2] = torch.rand(n, 2, generator=g, dtype=torch.float64) * 12
    boxes[:, 2] = 0
    boxes[:, 3:6] = torch.rand(n, 3, generator=g, dtype=torch.float64) * 3 + 1
    boxes[:, 6] = torch.rand(n, generator=g, dtype=torch.float64) * 6.28 - 3.14
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    for thr in (0.1, 0.3):
        keep = nms_bev(boxes, scores, thr)
        ref = _naive_nms(boxes, scores, thr)
        assert keep.dtype == torch.int64
        assert keep.tolist() == ref
        assert 5 < len(ref) < n  # suppression actually happened
    keep = nms_bev(boxes, scores, 0.3, max_out=4)
    assert keep.tolist() == _naive_nms(boxes, scores, 0.3)[:4]
    top = torch.argsort(scores, descending=True)[:30]
    keep = nms_bev(boxes, scores, 0.3, pre_max=30)
    sub = _naive_nms(boxes[top], scores[top], 0.3)
    assert keep.tolist() == top[sub].tolist()


def test_nms_bad_input():
    with pytest.raises(DataError, match="scores"):
        nms_bev(torch.zeros(3, 7), torch.zeros(2), 0.5)
    with pytest.raises(DataError, match="iou_threshold"):
        nms_bev(torch.zeros(3, 7), torch.zeros(3), 1.5)
    assert nms_bev(torch.zeros(0, 7), torch.zeros(0), 0.5).shape == (0,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_iou_and_nms_follow_the_device():
    a, b = _random_pairs(200, seed=5)
    for fn in (iou_bev, iou_3d):
        out = fn(a.cuda(), b.cuda())
        assert out.device.type == "cuda"
        assert (out.cpu() - fn(a, b)).abs().max() <= 1e-12
    scores = torch.linspace(1, 0, 200, dtype=torch.float64)
    keep = nms_bev(a.cuda(), scores.cuda(), 0.2)
    assert keep.device.type == "cuda" and keep.cpu().tolist() == nms_bev(a, scores, 0.2).tolist()


def test_iou_3d_aligned_is_the_diagonal():
    gen = torch.Generator().manual_seed(3)
    n = 40
    a = torch.cat([torch.rand(n, 2, generator=gen) * 10, torch.rand(n, 1, generator=gen),
                   torch.rand(n, 3, generator=gen) * 3 + 0.5, torch.rand(n, 1, generator=gen) * 6 - 3], 1)
    b = a + torch.randn(n, 7, generator=gen) * torch.tensor([0.5, 0.5, 0.2, 0.3, 0.3, 0.2, 0.4])
    b[:, 3:6] = b[:, 3:6].abs() + 0.1
    b[:5, :2] += 50.0  # far apart: IoU 0
    got = iou_3d_aligned(a, b)
    assert torch.allclose(got, torch.diagonal(iou_3d(a, b)), atol=1e-12)
    assert (got[:5] == 0).all() and (got[5:] > 0).sum() > 20
    with pytest.raises(DataError, match="as many boxes"):
        iou_3d_aligned(a, b[:3])


def test_diou_3d_in_frame_known_answer_in_a_turned_frame():
    # gt 4 x 2 x 1 at the origin; pred the same box 1 m ahead along gt's heading: overlap 3 x 2 x 1,
    # union 10, IoU 0.6; enclosing box 5 x 2 x 1, diagonal^2 30, centre distance^2 1.
    want = 0.6 - 1.0 / 30.0
    for yaw in (0.0, math.pi / 2, -2.0):
        gt = torch.tensor([[10.0, -3.0, 0.5, 4.0, 2.0, 1.0, yaw]], dtype=torch.float64)
        pred = gt.clone()
        pred[0, 0] += math.cos(yaw)
        pred[0, 1] += math.sin(yaw)
        pred[0, 6] = yaw + 0.3  # pred's own yaw is not used
        assert diou_3d_in_frame(pred, gt).item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(DataError, match="as many boxes"):
        diou_3d_in_frame(pred, torch.cat([gt, gt]))


def test_diou_3d_in_frame_is_the_exact_iou_for_concentric_boxes_of_one_axis():
    # Same centre, yaw equal modulo pi: no distance penalty, and the IoU is the rotated 3D IoU.
    gen = torch.Generator().manual_seed(5)
    n = 60
    gt = torch.cat([torch.rand(n, 3, generator=gen, dtype=torch.float64) * 20,
                    torch.rand(n, 3, generator=gen, dtype=torch.float64) * 3 + 0.3,
                    torch.rand(n, 1, generator=gen, dtype=torch.float64) * 6 - 3], 1)
    pred = gt.clone()
    pred[:, 3:6] = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 3 + 0.3
    pred[::2, 6] += math.pi
    assert torch.allclose(diou_3d_in_frame(pred, gt), iou_3d_aligned(pred, gt), atol=1e-12)


def test_diou_3d_in_frame_gradients_and_disjoint_boxes():
    gen = torch.Generator().manual_seed(6)
    gt = torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.7]] * 3, dtype=torch.float64)
    pred = gt + torch.randn(3, 7, generator=gen, dtype=torch.float64) * 0.3
    pred[2, 0] += 30.0  # no overlap: IoU 0, DIoU < 0, the centre still has a gradient
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: diou_3d_in_frame(p, gt), (pred,))
    out = diou_3d_in_frame(pred, gt)
    assert -1.0 < out[2].item() < -0.5
    out[2].backward()
    assert pred.grad[2, 0].item() < 0  # moving it back towards gt raises the DIoU
