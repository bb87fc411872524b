"""The grid-based colour field of Compact 3DGS: hash-encoded Gaussian centres + view direction -> RGB.

Written from the papers' descriptions (Lee et al., CVPR 2024, for the colour field; Müller et al.,
"Instant Neural Graphics Primitives", 2022, for the encoding; Barron et al., "Mip-NeRF 360", 2022,
for the contraction). Pure torch and vectorized over points and levels (no tiny-cuda-nn).

* :func:`contract`: scene-normalised positions ``x`` (``|x| <= 1`` inside the scene's bounding
  sphere) map to themselves inside the unit ball and to ``(2 - 1 / |x|) x / |x|`` outside, so the
  whole space fits in the ball of radius 2; :class:`HashGrid` then sees ``(c + 2) / 4`` in [0, 1]^3.
* :class:`HashGrid`: ``L`` levels of resolution ``N_l = floor(N_min * b^l)``, ``b`` geometric from
  ``N_min`` to ``N_max``; each level a table of ``T`` feature vectors of size ``F``. A point's
  feature at a level is the trilinear interpolation of the 8 surrounding lattice vertices'
  entries; a vertex ``(i, j, k)`` indexes the table densely (``i + j (N+1) + k (N+1)^2``) when the
  level's ``(N_l + 1)^3`` vertices fit in ``T``, and by the spatial hash
  ``(i * 1 xor j * 2654435761 xor k * 805459861) mod T`` otherwise. Levels are concatenated:
  ``[N, L * F]``. On CPU (float32) the work runs in C++ kernels with an analytic backward
  (``splatting/csrc/compact_cpu.cpp``); elsewhere in the vectorized torch code of
  :meth:`HashGrid.forward_torch`, which the tests also use as the kernel's reference.
* :class:`ColorField`: hash features of the contracted centre, concatenated with the real SH basis
  (degree 3, 16 values) of the viewing direction, into an MLP with one hidden ReLU layer and a
  sigmoid: RGB in [0, 1] per Gaussian and view.
"""
from __future__ import annotations

import math
import torch
from torch import nn

from perception3d.errors import ConfigError, DataError
from splatting._ext import cpu_ext
from splatting.sh import sh_basis

__all__ = ["contract", "HashGrid", "ColorField"]

_PRIMES = (1, 2654435761, 805459861)


def contract(x: torch.Tensor) -> torch.Tensor:
    """Mip-NeRF 360 contraction of scene-normalised points ``[N, 3]`` into the ball of radius 2."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return torch.where(norm <= 1, x, (2 - 1 / norm) * (x / norm))


class HashGrid(nn.Module):
    """Multi-resolution hash encoding of points in [0, 1]^3 (see the module docstring).

    Args:
        num_levels: L.
        features_per_level: F.
        log2_table_size: log2 T, entries per level.
        min_resolution, max_resolution: N_min and N_max.
        init_scale: table entries start uniform in ``[-init_scale, init_scale]``.

    ``forward(x [N, 3]) -> [N, L * F]``; ``table`` is an ``[L, T, F]`` parameter.
    """

    def __init__(self, num_levels: int = 8, features_per_level: int = 2, log2_table_size: int = 12,
                 min_resolution: int = 16, max_resolution: int = 512, init_scale: float = 1e-4) -> None:
        super().__init__()
        if num_levels < 1 or features_per_level < 1 or not 4 <= log2_table_size <= 24:
            raise ConfigError(f"HashGrid: num_levels >= 1, features_per_level >= 1 and 4 <= log2_table_size <= 24 "
                              f"expected, got {num_levels}, {features_per_level}, {log2_table_size}")
        if not 1 <= min_resolution <= max_resolution:
            raise ConfigError(f"HashGrid: 1 <= min_resolution <= max_resolution expected, got "
                              f"{min_resolution}, {max_resolution}")
        self.num_levels, self.features_per_level = num_levels, features_per_level
        self.table_size = 1 << log2_table_size
        growth = math.exp((math.log(max_resolution) - math.log(min_resolution)) / max(num_levels - 1, 1))
        # floor(N_min b^l), with a tolerance so that exact powers (16 * 2^3) do not round down to 127
        res = [int(math.floor(min_resolution * growth ** level + 1e-6)) for level in range(num_levels)]
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.long), persistent=False)
        dense = [(r + 1) ** 3 <= self.table_size for r in res]
        self.register_buffer("dense", torch.tensor(dense), persistent=False)
        self.register_buffer("primes", torch.tensor(_PRIMES, dtype=torch.long), persistent=False)
        self.table = nn.Parameter(torch.empty(num_levels, self.table_size, features_per_level).uniform_(
            -init_scale, init_scale))

    @property
    def out_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != 3:
            raise DataError(f"HashGrid: expected points [N, 3], got {tuple(x.shape)}")
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.table.dtype == torch.float32:
            return _HashEncodeCPU.apply(x.contiguous(), self.table, self.resolution, self.dense)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The same encoding in plain torch (GPU tensors, float64; the reference of the C++ kernel)."""
        N, L, T, F = x.shape[0], self.num_levels, self.table_size, self.features_per_level
        pos = x.clamp(0, 1)[:, None, :] * self.resolution[:, None].to(x.dtype)  # [N, L, 3]
        base = pos.detach().floor()
        frac = pos - base  # carries the gradient to the positions
        # Per axis a, the two vertex coordinates (offset 0 and 1) are combined over the 8 corners
        # by broadcasting over dims (z, y, x) of a [N, L, 2, 2, 2] grid: corner c = 4 z + 2 y + x.
        with torch.no_grad():
            v = base.long()[..., None] + torch.arange(2, device=x.device)  # [N, L, 3, 2]
            res = (self.resolution + 1)[:, None, None]
            # only the low log2(T) bits matter (xor and the final mask commute with truncation),
            # so the per-axis terms are truncated first and the 8-corner work runs in int32
            d = (v * torch.cat([torch.ones_like(res), res, res * res], 1) & (T - 1)).int()  # strides 1, R, R^2
            h = (v * self.primes[:, None] & (T - 1)).int()
            dense = d[:, :, 0, None, None, :] + d[:, :, 1, None, :, None] + d[:, :, 2, :, None, None]
            hashed = h[:, :, 0, None, None, :] ^ h[:, :, 1, None, :, None] ^ h[:, :, 2, :, None, None]
            rows = torch.where(self.dense[:, None, None, None], dense, hashed) & (T - 1)
            rows = rows.view(N, L, 8) + torch.arange(L, device=x.device, dtype=torch.int32)[:, None] * T
        wx, wy, wz = torch.stack([1 - frac, frac], -1).unbind(2)  # [N, L, 2] each
        w = (wz[:, :, :, None, None] * wy[:, :, None, :, None] * wx[:, :, None, None, :]).reshape(N, L, 8)
        feats = self.table.view(L * T, F).index_select(0, rows.flatten()).view(N, L, 8, F)
        return (w[..., None] * feats).sum(2).reshape(N, L * F)


class _HashEncodeCPU(torch.autograd.Function):
    """The C++ kernels of ``csrc/compact_cpu.cpp``: forward, and d x / d table in one backward."""

    @staticmethod
    def forward(ctx, x, table, resolution, dense):
        ctx.save_for_backward(x, table, resolution, dense)
        return cpu_ext().hash_encode_forward(x, table.detach(), resolution, dense)

    @staticmethod
    def backward(ctx, grad_out):
        x, table, resolution, dense = ctx.saved_tensors
        grad_x, grad_table = cpu_ext().hash_encode_backward(x, table.detach(), resolution, dense, grad_out)
        return grad_x, grad_table, None, None


class ColorField(nn.Module):
    """View-dependent colour of each Gaussian from its centre (hash grid) and the viewing direction.

    Args:
        grid: the :class:`HashGrid`.
        hidden: width of the MLP's hidden layer.
        sh_degree: degree of the direction encoding (3: 16 values).

    ``forward(features [N, L*F], dirs [N, 3]) -> rgb [N, 3]``; :meth:`encode` gives the features
    of contracted, scene-normalised centres (they depend on the centres only, so a renderer can
    compute them once per scene and run only the MLP per view).
    """

    def __init__(self, grid: HashGrid, hidden: int = 64, sh_degree: int = 3) -> None:
        super().__init__()
        self.grid = grid
        self.sh_degree = sh_degree
        self.mlp = nn.Sequential(nn.Linear(grid.out_dim + (sh_degree + 1) ** 2, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 3))

    def encode(self, normalized_means: torch.Tensor) -> torch.Tensor:
        return self.grid((contract(normalized_means) + 2) / 4)

    def forward(self, features: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        return torch.sigmoid(self.mlp(torch.cat([features, sh_basis(self.sh_degree, dirs)], -1)))

