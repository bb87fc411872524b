"""Rotated bird's-eye-view IoU, 3D IoU and rotated NMS for LiDAR boxes (pure torch).

Boxes are `[N, 7] = (x, y, z, dx, dy, dz, yaw)` (see `perception3d/design.md`). The BEV footprint
of a box is the rectangle `dx x dy` rotated by `yaw` about `(x, y)`.

Method: for every candidate pair, box a's footprint (a 4-gon, counter-clockwise) is clipped by the
four half-planes of box b (Sutherland-Hodgman), batched over pairs with padded vertex
buffers sized to the batch's largest polygon (a convex 4-gon clipped by 4 half-planes has at
most 8 vertices); the area of the result
is the shoelace formula. Everything is computed in float64, in coordinates centred on box a, with
a `1e-9 m` inside-tolerance so that vertices lying on an edge (touching, identical, contained
boxes) are kept rather than duplicated. Identical boxes give exactly 1.0: the clipped polygon is
then a's own corner list, so its shoelace area equals a's area bit for bit. Pairs whose
circumscribed circles do not meet are skipped (IoU 0) before clipping, found by a sweep over x. Results follow the input
device and dtype and are clamped to `[0, 1]`.
"""
from __future__ import annotations

import numpy as np
import torch

from perception3d.errors import DataError

__all__ = ["bev_intersection_area", "diou_3d_in_frame", "iou_bev", "iou_3d", "iou_3d_aligned", "nms_bev"]

_EPS_M = 1e-9  # inside tolerance for clipping, metres
_CHUNK_PAIRS = 1 << 16

# Footprint corner signs (x along heading, y left), counter-clockwise seen from above.
_SIGNS = ((1.0, -1.0), (1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0))


def _check(boxes, name: str) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        raise DataError(f"{name}: expected a torch.Tensor of shape [N, 7], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 7:
        raise DataError(f"{name}: expected shape [N, 7] (x, y, z, dx, dy, dz, yaw), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise DataError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    return boxes


def _footprints(xy: torch.Tensor, dxdy: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`[P, 4, 2]` counter-clockwise corners of rectangles centred at `xy [P, 2]`."""
    signs = torch.tensor(_SIGNS, dtype=xy.dtype, device=xy.device)
    local = signs[None] * (0.5 * dxdy[:, None, :])  # [P, 4, 2]
    x = local[..., 0] * c[:, None] - local[..., 1] * s[:, None]
    y = local[..., 0] * s[:, None] + local[..., 1] * c[:, None]
    return torch.stack([x, y], dim=-1) + xy[:, None, :]


def _shoelace(verts: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Area of packed polygons `verts [P, K, 2]` with `count [P]` valid leading vertices."""
    k = verts.shape[1]
    idx = torch.arange(k, device=verts.device)
    nxt = torch.where(idx[None] + 1 < count[:, None], idx[None] + 1, torch.zeros_like(idx[None]))
    v_next = torch.gather(verts, 1, nxt[..., None].expand(-1, -1, 2))
    cross = verts[..., 0] * v_next[..., 1] - verts[..., 1] * v_next[..., 0]
    cross = torch.where(idx[None] < count[:, None], cross, torch.zeros_like(cross))
    return 0.5 * cross.sum(dim=1)


def _clip_halfplane(verts, count, normal, offset):
    """Keep the part of each polygon with `normal . p <= offset` (+ tolerance).

    Args:
        verts: `[P, K, 2]` packed vertices; count: `[P]`; normal: `[P, 2]`; offset: `[P]`.

    Returns:
        `(verts [P, K_out, 2], count [P])`, K_out = the largest output count in the batch.
    """
    p, k = verts.shape[:2]
    idx = torch.arange(k, device=verts.device)
    valid = idx[None] < count[:, None]  # [P, K]
    prev = torch.where(idx[None] == 0, (count[:, None] - 1).clamp(min=0), idx[None] - 1)
    v_prev = torch.gather(verts, 1, prev[..., None].expand(-1, -1, 2))
    # Signed distance to the clipping line, metres: >= 0 inside; inside within the tolerance.
    d = offset[:, None] - (verts[..., 0] * normal[:, None, 0] + verts[..., 1] * normal[:, None, 1])
    d_prev = torch.gather(d, 1, prev)
    inside = d >= -_EPS_M
    inside_prev = d_prev >= -_EPS_M
    crossing = valid & (inside != inside_prev)
    denom = torch.where(crossing, d_prev - d, torch.ones_like(d))
    t = (d_prev / denom).clamp(0.0, 1.0)
    hit = v_prev + t[..., None] * (verts - v_prev)
    # Each input vertex emits up to two outputs, in order: the crossing point, then itself.
    cand = torch.stack([hit, verts], dim=2).reshape(p, 2 * k, 2)
    keep = torch.stack([crossing, valid & inside], dim=2).reshape(p, 2 * k)
    new_count = keep.sum(dim=1)
    # Compact the kept entries to the front (order preserved); the buffer grows only as far as
    # the batch needs (8 in exact arithmetic, more only for near-degenerate duplicates).
    k_out = max(int(new_count.max()), 1)
    pos = torch.cumsum(keep, dim=1) - 1
    target = torch.where(keep, pos, torch.full_like(pos, k_out))  # k_out: a discarded slot
    out = torch.zeros((p, k_out + 1, 2), dtype=verts.dtype, device=verts.device)
    out.scatter_(1, target[..., None].expand(-1, -1, 2), cand)
    return out[:, :k_out], new_count


def _pair_intersection(a: torch.Tensor, b: torch.Tensor):
    """BEV intersection area and both footprint areas for aligned pairs `a [P, 7]`, `b [P, 7]`
    (float64). Returns three `[P]` tensors."""
    origin = a[:, :2]
    ca, sa = torch.cos(a[:, 6]), torch.sin(a[:, 6])
    cb, sb = torch.cos(b[:, 6]), torch.sin(b[:, 6])
    center_b = b[:, :2] - origin
    poly_a = _footprints(torch.zeros_like(origin), a[:, 3:5], ca, sa)
    poly_b = _footprints(center_b, b[:, 3:5], cb, sb)
    four = torch.full((a.shape[0],), 4, dtype=torch.long, device=a.device)
    area_a = _shoelace(poly_a, four)
    area_b = _shoelace(poly_b, four)
    verts, count = poly_a, four
    # b's half-planes: |local x| <= dx/2 and |local y| <= dy/2 around b's centre.
    ux = torch.stack([cb, sb], dim=1)
    uy = torch.stack([-sb, cb], dim=1)
    px = center_b[:, 0] * ux[:, 0] + center_b[:, 1] * ux[:, 1]
    py = center_b[:, 0] * uy[:, 0] + center_b[:, 1] * uy[:, 1]
    hx, hy = 0.5 * b[:, 3], 0.5 * b[:, 4]
    for normal, off in ((ux, px + hx), (uy, py + hy), (-ux, hx - px), (-uy, hy - py)):
        verts, count = _clip_halfplane(verts, count, normal, off)
    inter = _shoelace(verts, count).clamp(min=0.0)
    return inter, area_a, area_b


def _candidate_pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs `(i [P], j [P])` whose circumscribed BEV circles meet (a superset of the
    overlapping pairs), sorted by i. A sweep over x (b sorted by x, a window per box of a)
    keeps the work near the number of nearby pairs rather than N x M."""
    n, m = a.shape[0], b.shape[0]
    dev = a.device
    ra = 0.5 * torch.hypot(a[:, 3], a[:, 4])
    rb = 0.5 * torch.hypot(b[:, 3], b[:, 4])
    xb, order = torch.sort(b[:, 0])
    reach = (ra + rb.max()) * (1 + 1e-9) + 1e-9
    lo = torch.searchsorted(xb, a[:, 0] - reach, side="left")
    hi = torch.searchsorted(xb, a[:, 0] + reach, side="right")
    cnt = (hi - lo).clamp(min=0)
    i = torch.repeat_interleave(torch.arange(n, device=dev), cnt)
    first = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    j = order[lo[i] + torch.arange(i.numel(), device=dev) - first]
    d2 = (a[i, 0] - b[j, 0]) ** 2 + (a[i, 1] - b[j, 1]) ** 2
    r = (ra[i] + rb[j]) * (1 + 1e-9) + 1e-9
    ok = d2 <= r * r
    return i[ok], j[ok]


def _pair_values(a64: torch.Tensor, b64: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """`[P]` float64 intersection area ("inter"), BEV IoU ("bev") or 3D IoU ("3d") of the pairs
    `(a64[ii], b64[jj])`, computed in chunks."""
    out = torch.zeros(ii.numel(), dtype=torch.float64, device=a64.device)
    for start in range(0, ii.numel(), _CHUNK_PAIRS):
        sl = slice(start, start + _CHUNK_PAIRS)
        pa, pb = a64[ii[sl]], b64[jj[sl]]
        inter, area_a, area_b = _pair_intersection(pa, pb)
        if mode == "inter":
            val = inter
        elif mode == "bev":
            val = inter / (area_a + area_b - inter).clamp(min=1e-300)
        else:  # "3d"
            top_a, bot_a = pa[:, 2] + 0.5 * pa[:, 5], pa[:, 2] - 0.5 * pa[:, 5]
            top_b, bot_b = pb[:, 2] + 0.5 * pb[:, 5], pb[:, 2] - 0.5 * pb[:, 5]
            inter3 = inter * (torch.minimum(top_a, top_b) - torch.maximum(bot_a, bot_b)).clamp(min=0.0)
            # Heights as top - bottom (not dz) so that identical boxes give exactly 1.
            vol_a, vol_b = area_a * (top_a - bot_a), area_b * (top_b - bot_b)
            val = inter3 / (vol_a + vol_b - inter3).clamp(min=1e-300)
        out[sl] = val if mode == "inter" else val.clamp(0.0, 1.0)
    return out


def _pairwise(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    a = _check(a, "a")
    b = _check(b, "b")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    n, m = a.shape[0], b.shape[0]
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    result = torch.zeros((n, m), dtype=torch.float64, device=a.device)
    if n == 0 or m == 0:
        return result.to(out_dtype)
    ii, jj = _candidate_pairs(a64, b64)
    result[ii, jj] = _pair_values(a64, b64, ii, jj, mode)
    return result.to(out_dtype)


def bev_intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Area of the intersection of the BEV footprints of all pairs.

    Args:
        a: `[N, 7]` boxes; b: `[M, 7]` boxes.

    Returns:
        `[N, M]` square metres.
    """
    return _pairwise(a, b, "inter")


def iou_bev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rotated bird's-eye-view IoU of all pairs.

    Args:
        a: `[N, 7]` LiDAR boxes; b: `[M, 7]` LiDAR boxes (z, dz ignored).

    Returns:
        `[N, M]` IoU in `[0, 1]`, dtype promoted from the inputs, on their device.
    """
    return _pairwise(a, b, "bev")


def iou_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """3D IoU of all pairs of yaw-only rotated boxes:
    `BEV intersection area x z-overlap / (vol_a + vol_b - intersection volume)`.

    Args:
        a: `[N, 7]` LiDAR boxes; b: `[M, 7]` LiDAR boxes.

    Returns:
        `[N, M]` IoU in `[0, 1]`.
    """
    return _pairwise(a, b, "3d")


def iou_3d_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """3D IoU of aligned pairs: box `a[i]` with box `b[i]` only (the diagonal of :func:`iou_3d`).

    Args:
        a: `[N, 7]` LiDAR boxes; b: `[N, 7]` LiDAR boxes.

    Returns:
        `[N]` IoU in `[0, 1]`.
    """
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape[0] != b.shape[0]:
        raise DataError(f"iou_3d_aligned: a and b must hold as many boxes, got {a.shape[0]} and {b.shape[0]}")
    idx = torch.arange(a.shape[0], device=a.device)
    out = _pair_values(a.to(torch.float64), b.to(torch.float64), idx, idx, "3d")
    return out.to(torch.promote_types(a.dtype, b.dtype))


def diou_3d_in_frame(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Differentiable 3D distance-IoU (DIoU, Zheng et al., AAAI 2020) of box pairs, ``pred[i]`` with ``gt[i]``.

    Both boxes are measured in the frame of ``gt[i]`` (its centre, its heading axis), and ``pred[i]``
    is taken as turned to ``gt[i]``'s yaw: its length ``dx`` lies along ``gt``'s heading, its width
    ``dy`` across it. In that frame both boxes are axis-aligned, so the overlap and the smallest
    enclosing box are products of interval lengths and every quantity has a gradient:
    ``DIoU = IoU - |c_pred - c_gt|^2 / diag^2``, ``diag`` the diagonal of the enclosing box. The
    IoU term equals :func:`iou_3d_aligned` when the yaws agree (modulo pi); the yaw error itself
    is not measured (a detection head learns it separately). As a loss, ``1 - DIoU`` in ``[0, 2]``
    keeps pulling the centres together when the boxes do not overlap at all, which plain
    ``1 - IoU`` does not.

    Args:
        pred: ``[N, 7]`` boxes ``(x, y, z, dx, dy, dz, yaw)`` (yaw unused), sizes > 0.
        gt: ``[N, 7]`` boxes; only ``gt``'s yaw orients the frame.

    Returns:
        ``[N]`` DIoU in ``[-1, 1]``, in the dtype of ``pred``.
    """
    pred, gt = _check(pred, "pred"), _check(gt, "gt")
    if pred.shape[0] != gt.shape[0]:
        raise DataError(f"diou_3d_in_frame: pred and gt must hold as many boxes, got {pred.shape[0]} and {gt.shape[0]}")
    gt = gt.to(pred.dtype)
    c, s = torch.cos(gt[:, 6]), torch.sin(gt[:, 6])
    dx, dy = pred[:, 0] - gt[:, 0], pred[:, 1] - gt[:, 1]
    centre = torch.stack([c * dx + s * dy, -s * dx + c * dy, pred[:, 2] - gt[:, 2]], dim=1)  # [N, 3]
    half_p, half_g = 0.5 * pred[:, 3:6], 0.5 * gt[:, 3:6]
    lo_p, hi_p = centre - half_p, centre + half_p
    overlap = (torch.minimum(hi_p, half_g) - torch.maximum(lo_p, -half_g)).clamp(min=0)
    enclose = torch.maximum(hi_p, half_g) - torch.minimum(lo_p, -half_g)
    inter = overlap.prod(dim=1)
    union = pred[:, 3:6].prod(dim=1) + gt[:, 3:6].prod(dim=1) - inter
    return inter / union - centre.square().sum(dim=1) / enclose.square().sum(dim=1)


def nms_bev(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_out: int | None = None,
    pre_max: int | None = None,
) -> torch.Tensor:
    """Greedy rotated non-maximum suppression on BEV IoU.

    Boxes are visited by descending score (ties: lower index first); a box is kept unless its
    BEV IoU with an already kept box is strictly greater than `iou_threshold`. The IoUs of the
    nearby pairs of the (at most `pre_max`) candidates are computed once, in one batch; the greedy
    pass then walks the list of overlapping pairs.

    Args:
        boxes: `[N, 7]` LiDAR boxes.
        scores: `[N]` scores.
        iou_threshold: suppress when IoU > this, in `[0, 1]`.
        max_out: keep at most this many boxes (None: no limit).
        pre_max: consider only the `pre_max` highest-scoring boxes (None: all).

    Returns:
        `[K]` int64 indices into `boxes`, sorted by descending score.
    """
    boxes = _check(boxes, "boxes")
    if not isinstance(scores, torch.Tensor) or scores.shape != (boxes.shape[0],):
        raise DataError(f"scores: expected a tensor of shape ({boxes.shape[0]},), got "
                        f"{tuple(getattr(scores, 'shape', ()))}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise DataError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold}")
    for name, v in (("max_out", max_out), ("pre_max", pre_max)):
        if v is not None and int(v) < 0:
            raise DataError(f"{name}: expected None or a non-negative int, got {v}")
    order = torch.sort(scores, descending=True, stable=True).indices
    if pre_max is not None:
        order = order[: int(pre_max)]
    if order.numel() == 0:
        return order.to(torch.int64)
    cand = boxes[order].to(torch.float64)
    ii, jj = _candidate_pairs(cand, cand)
    upper = ii < jj  # j ranks below i
    ii, jj = ii[upper], jj[upper]
    over = _pair_values(cand, cand, ii, jj, "bev") > iou_threshold
    ii, jj = ii[over].cpu().numpy(), jj[over].cpu().numpy()  # still sorted by ii
    k = order.numel()
    starts = np.searchsorted(ii, np.arange(k), side="left")
    ends = np.searchsorted(ii, np.arange(k), side="right")
    suppressed = np.zeros(k, dtype=bool)
    keep = []
    limit = k if max_out is None else int(max_out)
    for i in range(k):
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[jj[starts[i]:ends[i]]] = True
    keep_t = torch.as_tensor(keep, dtype=torch.int64, device=order.device)
    return order[keep_t].to(torch.int64)
