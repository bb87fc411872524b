"""Pure-torch reference of the tile rasterizer: the algorithm of the C++ kernels (`csrc/raster_cpu.cpp`), vectorised.

Used by the tests (forward values and autograd gradients against the CPU kernel's analytic
backward) and by ``tools/bench.py raster``. It is slow and memory-hungry by design (every pixel of a
tile is evaluated against every Gaussian of the tile); each batch of tiles runs under activation
checkpointing so that the backward pass needs the memory of one batch only.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["bin_gaussians_torch", "composite_reference"]

ALPHA_MIN, ALPHA_MAX, T_MIN = 1.0 / 255.0, 0.999, 1e-4


@torch.no_grad()
def bin_gaussians_torch(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, tile: int,
                        tw: int, th: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile Gaussian lists sorted by depth: every tile of each Gaussian's 3-sigma square (gsplat's binning).

    The C++ ``bin_gaussians`` keeps only the tiles its alpha >= 1/255 box also touches; the
    dropped tiles are ones where it composites no pixel, so both give the same image.

    Args:
        means2d: ``[C, N, 2]``; radii: ``[C, N]`` int (0 = culled); depths: ``[C, N]``.

    Returns:
        ``offsets [C * th * tw + 1]`` int64 and ``ids [n_isect]`` int64 (flat ``c * N + n``).
    """
    C, N = radii.shape
    dev = means2d.device
    r = radii.to(means2d.dtype)
    x0 = torch.clamp(torch.floor((means2d[..., 0] - r) / tile), 0, tw).long()
    x1 = torch.clamp(torch.ceil((means2d[..., 0] + r) / tile), 0, tw).long()
    y0 = torch.clamp(torch.floor((means2d[..., 1] - r) / tile), 0, th).long()
    y1 = torch.clamp(torch.ceil((means2d[..., 1] + r) / tile), 0, th).long()
    nx, ny = (x1 - x0) * (radii > 0), (y1 - y0) * (radii > 0)
    n_per = (nx * ny).reshape(-1)  # [CN]
    flat = torch.repeat_interleave(torch.arange(C * N, device=dev), n_per)
    local = torch.arange(flat.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n_per, 0) - n_per, n_per)
    nxf = nx.reshape(-1)[flat]
    tile_x = x0.reshape(-1)[flat] + local % nxf.clamp(min=1)
    tile_y = y0.reshape(-1)[flat] + local // nxf.clamp(min=1)
    cam = flat // N
    tile_id = cam * (th * tw) + tile_y * tw + tile_x
    # sort by (tile, depth): depth rank within the camera, then a stable sort by tile
    rank = torch.empty(C, N, dtype=torch.long, device=dev)
    rank.scatter_(1, torch.argsort(depths, dim=1, stable=True), torch.arange(N, device=dev).expand(C, N).contiguous())
    key = tile_id * N + rank.reshape(-1)[flat]
    ids = flat[torch.argsort(key, stable=True)]
    counts = torch.bincount(tile_id, minlength=C * th * tw)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(counts, 0)])
    return offsets, ids


def _composite_tiles(pix, idx, valid, means2d, conics, colors, opacities, backgrounds_t, chunk):
    """Composite a batch of B tiles: pix [B, P, 2], idx/valid [B, G] -> colour [B, P, D], T [B, P]."""
    B, P = pix.shape[:2]
    D = colors.shape[1]
    T = torch.ones(B, P, dtype=means2d.dtype, device=means2d.device)
    done = torch.zeros(B, P, dtype=torch.bool, device=means2d.device)
    acc = torch.zeros(B, P, D, dtype=means2d.dtype, device=means2d.device)
    for g0 in range(0, idx.shape[1], chunk):
        gi, ok_g = idx[:, g0:g0 + chunk], valid[:, g0:g0 + chunk]  # [B, K]
        d = means2d[gi][:, None, :, :] - pix[:, :, None, :]  # [B, P, K, 2]
        con = conics[gi][:, None]  # [B, 1, K, 3]
        dx, dy = d[..., 0], d[..., 1]
        sigma = 0.5 * (con[..., 0] * dx**2 + con[..., 2] * dy**2) + con[..., 1] * dx * dy
        alpha = torch.clamp_max(opacities[gi][:, None, :] * torch.exp(-sigma), ALPHA_MAX)
        hit = ok_g[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_MIN)
        alpha = torch.where(hit, alpha, torch.zeros_like(alpha))
        cp = torch.cumprod(1 - alpha, dim=-1)  # [B, P, K]
        keep = (T[..., None] * cp > T_MIN) & ~done[..., None]
        cp_excl = torch.cat([torch.ones_like(cp[..., :1]), cp[..., :-1]], dim=-1)
        w = alpha * T[..., None] * cp_excl * keep
        acc = acc + torch.einsum("bpk,bkd->bpd", w, colors[gi])
        done = done | (T * cp[..., -1] <= T_MIN)
        T = T * torch.where(keep, 1 - alpha, torch.ones_like(alpha)).prod(dim=-1)
    return acc + T[..., None] * backgrounds_t[:, None, :], T


def composite_reference(means2d: torch.Tensor, conics: torch.Tensor, colors: torch.Tensor, opacities: torch.Tensor,
                        backgrounds: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, width: int, height: int,
                        tile: int = 16, tiles_per_batch: int = 16,
                        chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of every tile, vectorised over pixels and Gaussians.

    Args:
        means2d ``[C, N, 2]``, conics ``[C, N, 3]``, colors ``[C, N, D]``, opacities ``[C, N]``,
        backgrounds ``[C, D]``; offsets / ids from :func:`bin_gaussians_torch`.
        tiles_per_batch, chunk: batching of tiles and of each tile's Gaussians (memory only).

    Returns:
        ``colors [C, H, W, D]`` and ``alphas [C, H, W, 1]`` (autograd-differentiable).
    """
    C, N = opacities.shape
    D = colors.shape[-1]
    dev = means2d.device
    tw, th = (width + tile - 1) // tile, (height + tile - 1) // tile
    m2, cn = means2d.reshape(C * N, 2), conics.reshape(C * N, 3)
    cl, op = colors.reshape(C * N, D), opacities.reshape(C * N)
    yy, xx = torch.meshgrid(torch.arange(tile, device=dev), torch.arange(tile, device=dev), indexing="ij")
    local = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1).to(means2d.dtype) + 0.5  # [P, 2]
    counts = offsets[1:] - offsets[:-1]
    out_c, out_t = [], []
    n_tiles = C * th * tw
    for b0 in range(0, n_tiles, tiles_per_batch):
        t = torch.arange(b0, min(b0 + tiles_per_batch, n_tiles), device=dev)
        origin = torch.stack([(t % tw) * tile, ((t % (th * tw)) // tw) * tile], dim=-1).to(means2d.dtype)
        pix = origin[:, None, :] + local[None]  # [B, P, 2]
        G = int(counts[t].max().item())
        if G == 0:
            out_c.append(backgrounds[t // (th * tw)][:, None, :].expand(len(t), tile * tile, D))
            out_t.append(torch.ones(len(t), tile * tile, dtype=means2d.dtype, device=dev))
            continue
        j = torch.arange(G, device=dev)
        valid = j[None] < counts[t][:, None]
        idx = ids[torch.where(valid, offsets[t][:, None] + j[None], torch.zeros_like(valid, dtype=torch.long))]
        bg = backgrounds[t // (th * tw)]
        args = (pix, idx, valid, m2, cn, cl, op, bg, chunk)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (m2, cn, cl, op, bg)):
            c_b, t_b = checkpoint(_composite_tiles, *args, use_reentrant=False)
        else:
            c_b, t_b = _composite_tiles(*args)
        out_c.append(c_b)
        out_t.append(t_b)
    col = torch.cat(out_c).reshape(C, th, tw, tile, tile, D).permute(0, 1, 3, 2, 4, 5)
    col = col.reshape(C, th * tile, tw * tile, D)[:, :height, :width]
    T = torch.cat(out_t).reshape(C, th, tw, tile, tile).permute(0, 1, 3, 2, 4).reshape(C, th * tile, tw * tile)
    return col, (1 - T[:, :height, :width])[..., None]
