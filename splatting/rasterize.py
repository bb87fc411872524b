"""``rasterize``: differentiable rendering of 3D Gaussians, gsplat's CUDA kernels on GPU, ours on CPU.

One function with gsplat's conventions (see :mod:`splatting.projection` for the camera model and
`csrc/raster_cpu.cpp` for the compositing rules). Backends:

* ``"gsplat"``: ``gsplat.rasterization`` (CUDA tensors; compiled by gsplat at first use);
* ``"cpu"``: projection and SH in torch (autograd), tile binning and alpha compositing in our
  C++ kernels (:mod:`splatting._ext`, torch's thread pool) with an analytic backward;
* ``"reference"``: the same projection with the pure-torch compositor of :mod:`splatting._reference`
  (autograd gradients; for tests and benchmarks, any device);
* ``"auto"`` (default): ``"gsplat"`` for CUDA tensors, ``"cpu"`` otherwise.

The returned ``meta["means2d"]`` is the ``[C, N, 2]`` tensor of projected means inside the graph,
so ``meta["means2d"].retain_grad()`` before ``backward()`` gives the image-plane gradients that
densification (gsplat's ``DefaultStrategy``) uses; ``meta`` also holds ``radii``, ``width``,
``height`` and ``n_cameras`` under gsplat's names.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from perception3d.errors import DataError
from splatting._ext import cpu_ext
from splatting._reference import bin_gaussians_torch, composite_reference
from splatting.projection import Projection, maybe_visible, project_gaussians
from splatting.sh import eval_sh, num_sh_bases

__all__ = ["rasterize", "has_gsplat_cuda", "RenderMode", "Backend"]

RenderMode = Literal["RGB", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "cpu", "reference", "gsplat"]


def has_gsplat_cuda() -> bool:
    """True when CUDA is available and gsplat imports (its kernels compile at first use)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


class _RasterizeCPU(torch.autograd.Function):
    """Alpha compositing with the C++ kernels (``csrc/raster_cpu.cpp``); analytic backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, offsets, ids, ext, width, height, tile):
        C, N, D = colors.shape
        m2 = means2d.detach().reshape(C * N, 2).contiguous()
        cn = conics.detach().reshape(C * N, 3).contiguous()
        cl = colors.detach().reshape(C * N, D).contiguous()
        op = opacities.detach().reshape(C * N).contiguous()
        bg = backgrounds.detach().to(m2.dtype).contiguous()
        out_color, out_T, out_last = cpu_ext().raster_forward(m2, cn, cl, op, bg, offsets, ids, ext, width, height,
                                                              tile)
        ctx.save_for_backward(m2, cn, cl, op, bg, offsets, ids, ext, out_T, out_last)
        ctx.shape = (C, N, D, width, height, tile)
        return out_color, (1 - out_T)[..., None]

    @staticmethod
    def backward(ctx, v_color, v_alpha):
        m2, cn, cl, op, bg, offsets, ids, ext, out_T, out_last = ctx.saved_tensors
        C, N, D, width, height, tile = ctx.shape
        v_color = v_color if v_color is not None else torch.zeros(C, height, width, D, dtype=m2.dtype)
        v_alpha = v_alpha[..., 0] if v_alpha is not None else torch.zeros(C, height, width, dtype=m2.dtype)
        g = cpu_ext().raster_backward(m2, cn, cl, op, bg, offsets, ids, ext, width, height, tile, out_T, out_last,
                                      v_color.contiguous(), v_alpha.contiguous())
        v_bg = (v_color * out_T[..., None]).sum(dim=(1, 2)) if ctx.needs_input_grad[4] else None
        return (g[:, 0:2].reshape(C, N, 2), g[:, 2:5].reshape(C, N, 3), g[:, 6:].reshape(C, N, D),
                g[:, 5].reshape(C, N), v_bg, None, None, None, None, None, None)


class _ProjectCPU(torch.autograd.Function):
    """:func:`~splatting.projection.project_gaussians` of the Gaussians ``ids`` with the C++ kernel
    (``csrc/projection_cpu.cpp``), scattered to ``[C, N]`` (zeros elsewhere, radius 0) as
    :func:`_project_candidates` builds it; analytic backward to means, quats and scales (not to the
    cameras). Returns ``(means2d, conics, depths, radii, compensations or None)``.
    """

    @staticmethod
    def forward(ctx, means, quats, scales, viewmats, Ks, ids, width, height, eps2d, near_plane, far_plane,
                radius_clip, antialiased):
        args = (means.detach().contiguous(), quats.detach().contiguous(), scales.detach().contiguous(),
                viewmats.detach(), Ks.detach(), ids)
        m2, conics, depths, radii, comps = cpu_ext().project_forward(*args, width, height, eps2d, near_plane,
                                                                     far_plane, radius_clip, antialiased)
        ctx.save_for_backward(*args)
        ctx.consts = (width, height, eps2d, antialiased)
        ctx.mark_non_differentiable(radii)
        return m2, conics, depths, radii, comps if antialiased else None

    @staticmethod
    def backward(ctx, v_m2, v_conics, v_depths, _v_radii, v_comps):
        width, height, eps2d, antialiased = ctx.consts
        v_comps = v_comps if antialiased and v_comps is not None else v_m2.new_zeros(0)
        v_means, v_quats, v_scales = cpu_ext().project_backward(*ctx.saved_tensors, width, height, eps2d, v_m2,
                                                                v_conics, v_depths, v_comps)
        return (v_means, v_quats, v_scales) + (None,) * 10


class _SHColorsCPU(torch.autograd.Function):
    """SH colours (before the 0.5 offset) with the C++ kernel (``csrc/sh_cpu.cpp``), fused with the
    gather ``coeffs[gid]``; the same values as :func:`splatting.sh.eval_sh`. For 78k of 100k
    Gaussians at degree 3 (a trained fox view), 2 threads: forward + backward 10 ms against 45 ms
    for the gather and :func:`~splatting.sh.eval_sh` in torch.

    ``dirs [M, 3]``, ``coeffs [N, K, 3]``, ``gid [M]``; ``counts [C]``: the entries are grouped by
    camera (as ``torch.nonzero`` orders them), ``counts[c]`` of camera ``c``, each group's ids distinct.
    """

    @staticmethod
    def forward(ctx, dirs, coeffs, gid, counts, degree):
        dirs, coeffs = dirs.detach().contiguous(), coeffs.detach().contiguous()
        ctx.save_for_backward(dirs, coeffs, gid)
        ctx.counts, ctx.degree = counts.tolist(), degree
        return cpu_ext().sh_forward(dirs, coeffs, gid, degree)

    @staticmethod
    def backward(ctx, v_out):
        dirs, coeffs, gid = ctx.saved_tensors
        v_coeffs = torch.zeros_like(coeffs)
        v_dirs, start = [], 0
        for n in ctx.counts:  # one camera at a time: its ids are distinct, so the kernel adds in place
            sl = slice(start, start + n)
            v_dirs.append(cpu_ext().sh_backward(dirs[sl], coeffs, gid[sl], ctx.degree, v_out[sl], v_coeffs))
            start += n
        return torch.cat(v_dirs), v_coeffs, None, None, None


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds):
    def fail(name, expected, t):
        raise DataError(f"rasterize: {name}: expected {expected}, got {tuple(t.shape)} {t.dtype}")

    if means.dim() != 2 or means.shape[1] != 3 or not means.is_floating_point():
        fail("means", "a float tensor [N, 3]", means)
    N = means.shape[0]
    if quats.shape != (N, 4):
        fail("quats", f"[{N}, 4] (w, x, y, z)", quats)
    if scales.shape != (N, 3):
        fail("scales", f"[{N}, 3] linear scales", scales)
    if opacities.shape != (N,):
        fail("opacities", f"[{N}] values in [0, 1]", opacities)
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        fail("viewmats", "[C, 4, 4] world-to-camera", viewmats)
    C = viewmats.shape[0]
    if Ks.shape != (C, 3, 3):
        fail("Ks", f"[{C}, 3, 3]", Ks)
    if sh_degree is None:
        if colors.dim() != 2 or colors.shape[0] != N:
            fail("colors", f"[{N}, D] (sh_degree=None)", colors)
    else:
        k = num_sh_bases(sh_degree)
        if colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3 or colors.shape[1] < k:
            fail("colors", f"[{N}, K >= {k}, 3] SH coefficients for sh_degree={sh_degree}", colors)
    if backgrounds is not None and backgrounds.shape != (C, 3 if sh_degree is not None else colors.shape[-1]):
        fail("backgrounds", "[C, D]", backgrounds)
    named = {"quats": quats, "scales": scales, "opacities": opacities, "colors": colors, "viewmats": viewmats,
             "Ks": Ks, "backgrounds": backgrounds}
    for name, t in named.items():
        if t is not None and t.device != means.device:
            raise DataError(f"rasterize: {name}: expected a tensor on {means.device} (where means is), got {t.device}")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise DataError(f"rasterize: width, height: expected positive ints, got {width!r}, {height!r}")
    if not bool(torch.isfinite(means).all()):
        raise DataError("rasterize: means: expected finite values, found NaN or inf")


def _project_candidates(means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
                        radius_clip, antialiased, kernel: bool) -> Projection:
    """:func:`project_gaussians` on the Gaussians :func:`maybe_visible` keeps, scattered back to ``[C, N]``.

    The culled ones get radius 0 and zeros elsewhere, as the full projection would give them (their
    values are never read); with a quarter of a scene in view this is 3x less projection work.
    ``kernel``: with the C++ kernel (:class:`_ProjectCPU`), which gathers and scatters itself;
    cameras that need gradients (``viewmats`` or ``Ks`` with ``requires_grad``) fall back to torch.
    """
    keep = torch.nonzero(maybe_visible(means.detach(), scales.detach(), viewmats, Ks, width, height, eps2d,
                                       near_plane, far_plane)).squeeze(1)
    if kernel and not (viewmats.requires_grad or Ks.requires_grad):
        return Projection(*_ProjectCPU.apply(means, quats, scales, viewmats, Ks, keep, width, height, eps2d,
                                             near_plane, far_plane, radius_clip, antialiased))
    N = means.shape[0]
    if len(keep) > 0.8 * N:
        return project_gaussians(means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
                                 radius_clip, antialiased)
    p = project_gaussians(means[keep], quats[keep], scales[keep], viewmats, Ks, width, height, eps2d, near_plane,
                          far_plane, radius_clip, antialiased)

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros((t.shape[0], N) + t.shape[2:]).index_copy(1, keep, t)

    return Projection(full(p.means2d), full(p.conics), full(p.depths), full(p.radii),
                      None if p.compensations is None else full(p.compensations))


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    *,
    sh_degree: Optional[int] = None,
    backgrounds: Optional[torch.Tensor] = None,
    render_mode: RenderMode = "RGB",
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    tile_size: int = 16,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], dict]:
    """Render N Gaussians into C pinhole cameras.

    Args:
        means: ``[N, 3]`` world positions.
        quats: ``[N, 4]`` rotations ``(w, x, y, z)`` (normalised internally).
        scales: ``[N, 3]`` linear scales (standard deviations).
        opacities: ``[N]`` opacities in [0, 1].
        colors: ``[N, D]`` colours (``sh_degree=None``), or ``[N, K, 3]`` SH coefficients, of
            which the first ``(sh_degree + 1) ** 2`` are used; SH colours are ``max(sh + 0.5, 0)``.
        viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV axes).
        Ks: ``[C, 3, 3]`` intrinsics.
        width, height: image size, pixels.
        sh_degree: SH degree 0-3, or None for plain colours.
        backgrounds: ``[C, D]`` colour behind the Gaussians (default black).
        render_mode: ``"RGB"``; ``"RGB+D"`` also returns the accumulated depth
            ``sum_i w_i z_i``; ``"RGB+ED"`` the expected depth ``sum_i w_i z_i / alpha``.
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (opacity compensation, Mip-Splatting).
        near_plane, far_plane, eps2d, radius_clip: see :func:`splatting.projection.project_gaussians`.
        tile_size: tile edge in pixels (16).
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"gsplat"`` (see the module docstring).

    Returns:
        ``(rgb [C, H, W, D], alpha [C, H, W, 1], depth [C, H, W, 1] or None, meta)``.

    Raises:
        DataError: a tensor of the wrong shape, NaN means, or a bad image size.
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds)
    if render_mode not in ("RGB", "RGB+D", "RGB+ED"):
        raise DataError(f"rasterize: render_mode: expected 'RGB', 'RGB+D' or 'RGB+ED', got {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise DataError(f"rasterize: rasterize_mode: expected 'classic' or 'antialiased', got {rasterize_mode!r}")
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "cpu"
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                                 backgrounds, render_mode, rasterize_mode, near_plane, far_plane, eps2d, radius_clip,
                                 tile_size)
    if backend not in ("cpu", "reference"):
        raise DataError(f"rasterize: backend: expected 'auto', 'cpu', 'reference' or 'gsplat', got {backend!r}")
    if backend == "cpu" and means.is_cuda:
        raise DataError("rasterize: backend 'cpu' needs CPU tensors (use backend='auto' or 'gsplat' on CUDA)")

    C = viewmats.shape[0]
    N = means.shape[0]
    proj = _project_candidates(means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
                               radius_clip, rasterize_mode == "antialiased", kernel=backend == "cpu")
    opac = opacities[None].expand(C, N)
    if proj.compensations is not None:
        opac = opac * proj.compensations
    if sh_degree is None:
        cols = colors[None].expand(C, N, colors.shape[-1])
    else:
        # SH only where a Gaussian is visible (radius > 0): the others are never composited
        cam, gid = torch.nonzero(proj.radii > 0, as_tuple=True)
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[gid] - campos[cam]
        if backend == "cpu":
            sh = _SHColorsCPU.apply(dirs, colors, gid, torch.bincount(cam, minlength=C), sh_degree)
        else:
            sh = eval_sh(sh_degree, dirs, colors[gid])
        vis = torch.clamp_min(sh + 0.5, 0.0)
        cols = torch.zeros(C, N, 3, dtype=vis.dtype, device=vis.device).index_put((cam, gid), vis)
    D = cols.shape[-1]
    bg = backgrounds if backgrounds is not None else torch.zeros(C, D, dtype=means.dtype, device=means.device)
    if render_mode != "RGB":
        cols = torch.cat([cols, proj.depths[..., None]], dim=-1)
        bg = torch.cat([bg, torch.zeros_like(bg[:, :1])], dim=-1)

    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    with torch.no_grad():
        if backend == "cpu":
            offsets, ids, ext = cpu_ext().bin_gaussians(proj.means2d.detach(), proj.conics.detach(), opac.detach(),
                                                        proj.radii, proj.depths.detach(), tile_size, tw, th)
        else:
            offsets, ids = bin_gaussians_torch(proj.means2d, proj.radii, proj.depths, tile_size, tw, th)
    if backend == "cpu":
        render, alpha = _RasterizeCPU.apply(proj.means2d, proj.conics, cols.contiguous(), opac.contiguous(), bg,
                                            offsets, ids, ext, width, height, tile_size)
    else:
        render, alpha = composite_reference(proj.means2d, proj.conics, cols, opac, bg, offsets, ids, width, height,
                                            tile_size)
    rgb, depth = render[..., :D], None
    if render_mode != "RGB":
        depth = render[..., D:]
        if render_mode == "RGB+ED":
            depth = depth / alpha.clamp(min=1e-10)
    meta = {
        "means2d": proj.means2d, "radii": proj.radii, "depths": proj.depths, "conics": proj.conics,
        "opacities": opac, "isect_offsets": offsets[:-1].reshape(C, th, tw), "flatten_ids": ids,
        "width": width, "height": height, "tile_size": tile_size, "tile_width": tw, "tile_height": th,
        "n_cameras": C, "camera_ids": None, "gaussian_ids": None,  # gsplat's unpacked layout
    }
    return rgb, alpha, depth, meta


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
                      render_mode, rasterize_mode, near_plane, far_plane, eps2d, radius_clip, tile_size):
    try:
        from gsplat import rasterization
    except ImportError as e:  # pragma: no cover - gsplat is a dependency
        raise DataError(f"rasterize: backend 'gsplat' needs the gsplat package ({e})") from None
    render, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=False,
        tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode, rasterize_mode=rasterize_mode)
    if render_mode == "RGB":
        return render, alpha, None, meta
    return render[..., :-1], alpha, render[..., -1:], meta
