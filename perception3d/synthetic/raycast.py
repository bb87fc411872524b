"""Ray casting against a ground plane and yaw-rotated boxes (the synthetic scene's primitives).

Two implementations with one signature: a fast one and a plain reference that tests compare it with.

* `raycast` - numba, one pass per ray over all boxes with a bounding-sphere pre-test;
* `raycast_reference` - plain vectorized numpy slab test over rays x boxes, chunked for memory.

Boxes are `(centre [B, 3], half-size [B, 3], yaw [B])` in the scene (LiDAR) frame, axis-aligned in
their own frame. The ground is the plane `n . p = d` (`plane = (nx, ny, nz, d)`, unit normal).
Rays start at `origins` (`[1, 3]` shared or `[R, 3]`) with unit directions `[R, 3]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["RayHits", "raycast", "raycast_reference", "GROUND", "NO_HIT"]

NO_HIT = -1
GROUND = -2
_EPS = 1e-9


@dataclass(frozen=True)
class RayHits:
    """Result of a ray cast over R rays.

    Attributes:
        t: `float64 [R]` hit distance along the (unit) ray, metres; `inf` when nothing is hit.
        hit: `int64 [R]` box index, `GROUND` (-2) or `NO_HIT` (-1).
        normal: `float64 [R, 3]` unit surface normal facing the ray (zeros for no hit).
        obj_total: `int64 [n_obj]` per object, number of rays crossing any of its boxes at any depth
            (what an unoccluded render would see); only when `box_obj` was given.
    """

    t: np.ndarray
    hit: np.ndarray
    normal: np.ndarray
    obj_total: np.ndarray


@numba.njit(cache=True, inline="always")
def slab_intersect(o0, o1, o2, d0, d1, d2, h0, h1, h2):  # pragma: no cover - numba
    """Ray ``o + t d`` against the box ``|x_k| <= h_k`` (its own frame), by the slab method.

    Returns ``(tmin, tmax, axis, sign)``: the entry and exit parameters, the axis of the entry face
    and its outward normal's sign along that axis; ``tmin > tmax`` when the ray misses (or runs
    parallel to a slab outside it).
    """
    tmin, tmax, axis, sign = -np.inf, np.inf, -1, 0.0
    for k in range(3):
        if k == 0:
            o_, d_, h = o0, d0, h0
        elif k == 1:
            o_, d_, h = o1, d1, h1
        else:
            o_, d_, h = o2, d2, h2
        if -_EPS < d_ < _EPS:
            if o_ < -h or o_ > h:
                return np.inf, -np.inf, -1, 0.0
            continue
        t1 = (-h - o_) / d_
        t2 = (h - o_) / d_
        sg = -1.0
        if t1 > t2:
            t1, t2 = t2, t1
            sg = 1.0
        if t1 > tmin:
            tmin, axis, sign = t1, k, sg
        if t2 < tmax:
            tmax = t2
        if tmin > tmax:
            break
    return tmin, tmax, axis, sign


@numba.njit(cache=True)
def _raycast_nb(origins, dirs, centre, half, cos_y, sin_y, radius, box_obj, n_obj, plane, max_t):  # pragma: no cover
    n_rays = dirs.shape[0]
    n_box = centre.shape[0]
    shared = origins.shape[0] == 1
    t_out = np.full(n_rays, np.inf)
    hit_out = np.full(n_rays, -1, np.int64)
    nrm_out = np.zeros((n_rays, 3))
    obj_total = np.zeros(max(n_obj, 1), np.int64)
    for r in range(n_rays):
        oi = 0 if shared else r
        ox, oy, oz = origins[oi, 0], origins[oi, 1], origins[oi, 2]
        dx, dy, dz = dirs[r, 0], dirs[r, 1], dirs[r, 2]
        best = max_t
        best_id = -1
        bnx = 0.0
        bny = 0.0
        bnz = 0.0
        # ground plane
        den = plane[0] * dx + plane[1] * dy + plane[2] * dz
        if den < -_EPS or den > _EPS:
            tg = (plane[3] - (plane[0] * ox + plane[1] * oy + plane[2] * oz)) / den
            if 0.0 < tg < best:
                best = tg
                best_id = -2
                s = -1.0 if den > 0 else 1.0
                bnx, bny, bnz = s * plane[0], s * plane[1], s * plane[2]
        last_obj = -1
        for b in range(n_box):
            cx = centre[b, 0] - ox
            cy = centre[b, 1] - oy
            cz = centre[b, 2] - oz
            tc = cx * dx + cy * dy + cz * dz
            if tc + radius[b] < 0.0:
                continue
            d2 = cx * cx + cy * cy + cz * cz - tc * tc
            if d2 > radius[b] * radius[b]:
                continue
            # into the box frame (rotation by -yaw about z)
            c, s = cos_y[b], sin_y[b]
            lox = -(c * cx + s * cy)
            loy = -(-s * cx + c * cy)
            loz = -cz
            ldx = c * dx + s * dy
            ldy = -s * dx + c * dy
            ldz = dz
            tmin, tmax, axis, sign = slab_intersect(lox, loy, loz, ldx, ldy, ldz, half[b, 0], half[b, 1], half[b, 2])
            if tmin > tmax or tmax < 0.0 or tmin <= 0.0:
                continue
            ob = box_obj[b]
            if ob >= 0 and ob != last_obj and tmin < max_t:
                obj_total[ob] += 1
                last_obj = ob
            if tmin < best:
                best = tmin
                best_id = b
                if axis == 2:
                    bnx, bny, bnz = 0.0, 0.0, sign
                elif axis == 0:
                    bnx, bny, bnz = sign * c, sign * s, 0.0
                else:
                    bnx, bny, bnz = -sign * s, sign * c, 0.0
        if best_id != -1:
            t_out[r] = best
            hit_out[r] = best_id
            nrm_out[r, 0] = bnx
            nrm_out[r, 1] = bny
            nrm_out[r, 2] = bnz
    return t_out, hit_out, nrm_out, obj_total


def _prepare(origins, dirs, centre, half, yaw, box_obj, n_obj, plane):
    origins = np.ascontiguousarray(np.asarray(origins, np.float64).reshape(-1, 3))
    dirs = np.ascontiguousarray(np.asarray(dirs, np.float64).reshape(-1, 3))
    centre = np.ascontiguousarray(np.asarray(centre, np.float64).reshape(-1, 3))
    half = np.ascontiguousarray(np.asarray(half, np.float64).reshape(-1, 3))
    yaw = np.asarray(yaw, np.float64).reshape(-1)
    if box_obj is None:
        box_obj = np.full(centre.shape[0], -1, np.int64)
        n_obj = 0
    box_obj = np.ascontiguousarray(np.asarray(box_obj, np.int64))
    if n_obj is None:
        n_obj = int(box_obj.max()) + 1 if box_obj.size else 0
    plane = np.asarray(plane if plane is not None else (0.0, 0.0, 1.0, -1e12), np.float64)
    return origins, dirs, centre, half, yaw, box_obj, int(n_obj), plane


def raycast(origins: np.ndarray, dirs: np.ndarray, centre: np.ndarray, half: np.ndarray, yaw: np.ndarray,
            plane: np.ndarray | None = None, max_t: float = np.inf, box_obj: np.ndarray | None = None,
            n_obj: int | None = None) -> RayHits:
    """Nearest hit of each ray against the ground plane and the boxes (numba).

    Args:
        origins: `[1, 3]` or `[R, 3]` ray origins, metres.
        dirs: `[R, 3]` unit ray directions.
        centre: `[B, 3]` box centres; half: `[B, 3]` half sizes; yaw: `[B]` radians about +z.
        plane: `(nx, ny, nz, d)` ground plane `n . p = d`, or None.
        max_t: hits at or beyond this distance are ignored.
        box_obj: `[B]` object index of each box (-1 for static boxes). The boxes of one object must be
            contiguous; enables `RayHits.obj_total`.
        n_obj: number of objects (default `max(box_obj) + 1`).

    Returns:
        `RayHits`.
    """
    o, d, c, h, y, bo, n, p = _prepare(origins, dirs, centre, half, yaw, box_obj, n_obj, plane)
    radius = np.linalg.norm(h, axis=1) * (1 + 1e-9) + 1e-9
    t, hit, nrm, tot = _raycast_nb(o, d, c, h, np.cos(y), np.sin(y), radius, bo, n, p, float(max_t))
    return RayHits(t, hit, nrm, tot[:n])


def raycast_reference(origins: np.ndarray, dirs: np.ndarray, centre: np.ndarray, half: np.ndarray,
                      yaw: np.ndarray, plane: np.ndarray | None = None, max_t: float = np.inf,
                      box_obj: np.ndarray | None = None, n_obj: int | None = None,
                      chunk: int = 4096) -> RayHits:
    """Plain numpy reference of `raycast` (same arguments): slab test over all rays x all boxes."""
    o, d, c, h, y, bo, n, p = _prepare(origins, dirs, centre, half, yaw, box_obj, n_obj, plane)
    R = d.shape[0]
    t_all = np.full(R, np.inf)
    hit_all = np.full(R, NO_HIT, np.int64)
    nrm_all = np.zeros((R, 3))
    tot = np.zeros(n, np.int64)
    cy, sy = np.cos(y), np.sin(y)
    for s in range(0, R, chunk):
        dd = d[s:s + chunk]
        oo = o if o.shape[0] == 1 else o[s:s + chunk]
        # ground
        den = dd @ p[:3]
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = (p[3] - oo @ p[:3]) / den
        tg = np.where((np.abs(den) > _EPS) & (tg > 0) & (tg < max_t), tg, np.inf)
        # boxes: [r, b]
        rel = c[None, :, :] - oo[:, None, :]  # centre - origin
        lo = -np.stack([cy * rel[..., 0] + sy * rel[..., 1], -sy * rel[..., 0] + cy * rel[..., 1], rel[..., 2]], -1)
        ld = np.stack([cy[None] * dd[:, :1] + sy[None] * dd[:, 1:2], -sy[None] * dd[:, :1] + cy[None] * dd[:, 1:2],
                       np.broadcast_to(dd[:, 2:3], (dd.shape[0], c.shape[0]))], -1)
        safe = np.where(np.abs(ld) > _EPS, ld, 1.0)
        t1 = (-h[None] - lo) / safe
        t2 = (h[None] - lo) / safe
        par = np.abs(ld) <= _EPS
        inside_par = np.abs(lo) <= h[None]
        tnear = np.where(par, np.where(inside_par, -np.inf, np.inf), np.minimum(t1, t2))
        tfar = np.where(par, np.where(inside_par, np.inf, -np.inf), np.maximum(t1, t2))
        tmin = tnear.max(-1)
        axis = tnear.argmax(-1)
        tmax = tfar.min(-1)
        valid = (tmin <= tmax) & (tmax >= 0) & (tmin > 0) & (tmin < max_t)
        tb = np.where(valid, tmin, np.inf)
        if n:
            for ob in range(n):  # objects, not points: a handful of iterations
                tot[ob] += int(valid[:, bo == ob].any(1).sum())
        bi = tb.argmin(1) if tb.shape[1] else np.zeros(dd.shape[0], np.int64)
        tbest = tb[np.arange(dd.shape[0]), bi] if tb.shape[1] else np.full(dd.shape[0], np.inf)
        use_box = tbest < tg
        t_all[s:s + chunk] = np.minimum(tbest, tg)
        hit_all[s:s + chunk] = np.where(use_box, bi, np.where(np.isfinite(tg), GROUND, NO_HIT))
        # normals
        nrm = np.zeros((dd.shape[0], 3))
        gsign = -np.sign(den)[:, None]
        nrm = np.where((~use_box & np.isfinite(tg))[:, None], gsign * p[None, :3], nrm)
        if tb.shape[1]:
            rows = np.arange(dd.shape[0])
            ax = axis[rows, bi]
            sgn = -np.sign(ld[rows, bi, ax])
            cb, sb = cy[bi], sy[bi]
            local = np.zeros((dd.shape[0], 3))
            local[rows, ax] = sgn
            world = np.stack([cb * local[:, 0] - sb * local[:, 1], sb * local[:, 0] + cb * local[:, 1], local[:, 2]], 1)
            nrm = np.where(use_box[:, None], world, nrm)
        nrm_all[s:s + chunk] = nrm
    return RayHits(t_all, hit_all, nrm_all, tot)
