"""`Gaussians`: the 3DGS scene representation (typed container), its initialisation and export.

Parameters are stored unconstrained, as optimised and as written in the standard .ply:
``means [N, 3]`` (world), ``quats [N, 4]`` (w, x, y, z; any norm), ``scales_log [N, 3]`` (natural
log of the standard deviations), ``opacities_logit [N]``, ``sh0 [N, 1, 3]`` (degree-0 SH) and
``shN [N, K - 1, 3]`` (higher degrees, ``K = (sh_degree + 1) ** 2``). :meth:`Gaussians.render`
activates them (normalise, exp, sigmoid) and calls :func:`splatting.rasterize.rasterize`.

During training the same tensors live in a ``torch.nn.ParameterDict`` under gsplat's names
(``means, scales, quats, opacities, sh0, shN``), the layout gsplat's densification strategies
operate on (:meth:`Gaussians.to_params` / :meth:`Gaussians.from_params`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from perception3d.errors import DataError
from splatting.rasterize import rasterize
from splatting.sh import num_sh_bases, rgb_to_sh0

__all__ = ["Gaussians", "knn_scales", "render_raw"]

# ParameterDict name (gsplat's) <-> Gaussians field
_PARAM_NAMES = {"means": "means", "quats": "quats", "scales": "scales_log", "opacities": "opacities_logit",
                "sh0": "sh0", "shN": "shN"}


def knn_scales(points: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Mean distance of each point to its ``k`` nearest neighbours (3DGS's initial scale), ``[N]``."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    if len(pts) <= k:
        return torch.full((len(pts),), 0.01, dtype=points.dtype)
    dist, _ = cKDTree(pts).query(pts, k=k + 1)
    d = dist[:, 1:].mean(axis=1)
    d = np.where(d > 0, d, d[d > 0].min() if (d > 0).any() else 0.01)
    return torch.from_numpy(d).to(points.dtype)


@dataclass(frozen=True)
class Gaussians:
    """N anisotropic 3D Gaussians with SH colour (see the module docstring for each field)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales_log: torch.Tensor
    opacities_logit: torch.Tensor
    sh0: torch.Tensor
    shN: torch.Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.dim() == 2 else -1
        expected = {"means": (n, 3), "quats": (n, 4), "scales_log": (n, 3), "opacities_logit": (n,),
                    "sh0": (n, 1, 3)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                raise DataError(f"Gaussians.{name}: expected a float tensor of shape {shape}, "
                                f"got {tuple(getattr(t, 'shape', ()))}")
        if self.shN.dim() != 3 or self.shN.shape[0] != n or self.shN.shape[2] != 3 \
                or self.shN.shape[1] + 1 not in (1, 4, 9, 16):
            raise DataError(f"Gaussians.shN: expected [{n}, K - 1, 3] with K in (1, 4, 9, 16), "
                            f"got {tuple(self.shN.shape)}")

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        """Highest SH degree stored (0-3)."""
        return int(math.isqrt(self.shN.shape[1] + 1)) - 1

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_points(cls, points: torch.Tensor, rgb: Optional[torch.Tensor] = None, sh_degree: int = 3,
                    init_opacity: float = 0.1, init_scale: float = 1.0) -> "Gaussians":
        """3DGS initialisation: one isotropic Gaussian per point.

        Args:
            points: ``[N, 3]`` positions (e.g. SfM points).
            rgb: ``[N, 3]`` colours in [0, 1] (default grey).
            sh_degree: highest SH degree the model will learn (coefficients start at 0).
            init_opacity: initial opacity of every Gaussian.
            init_scale: multiplier on the scale (mean distance to the 3 nearest neighbours).
        """
        points = torch.as_tensor(points, dtype=torch.float32)
        if points.dim() != 2 or points.shape[1] != 3 or len(points) == 0:
            raise DataError(f"Gaussians.from_points: points: expected [N > 0, 3], got {tuple(points.shape)}")
        if not bool(torch.isfinite(points).all()):
            raise DataError("Gaussians.from_points: points contain NaN or inf")
        n = len(points)
        rgb = torch.full((n, 3), 0.5) if rgb is None else torch.as_tensor(rgb, dtype=torch.float32).reshape(n, 3)
        scales = torch.log(knn_scales(points) * init_scale)[:, None].repeat(1, 3)
        return cls(
            means=points.clone(),
            quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            scales_log=scales,
            opacities_logit=torch.full((n,), math.log(init_opacity / (1 - init_opacity))),
            sh0=rgb_to_sh0(rgb)[:, None, :],
            shN=torch.zeros(n, num_sh_bases(sh_degree) - 1, 3),
        )

    @classmethod
    def random(cls, n: int, center: torch.Tensor, extent: float, sh_degree: int = 3, seed: int = 0,
               init_opacity: float = 0.1, init_scale: float = 1.0) -> "Gaussians":
        """``n`` Gaussians uniformly in the cube ``center +- extent`` with random colours."""
        g = torch.Generator().manual_seed(seed)
        pts = torch.as_tensor(center, dtype=torch.float32) + (torch.rand(n, 3, generator=g) * 2 - 1) * extent
        return cls.from_points(pts, torch.rand(n, 3, generator=g), sh_degree, init_opacity, init_scale)

    # -- parameters -------------------------------------------------------------------------------
    def to_params(self, device: torch.device | str = "cpu") -> torch.nn.ParameterDict:
        """A ParameterDict under gsplat's names (the layout its densification strategies expect)."""
        return torch.nn.ParameterDict({k: torch.nn.Parameter(getattr(self, f).detach().to(device).clone())
                                       for k, f in _PARAM_NAMES.items()})

    @classmethod
    def from_params(cls, params) -> "Gaussians":
        """Detached copy of a ParameterDict made by :meth:`to_params` (possibly densified since)."""
        return cls(**{f: params[k].detach() for k, f in _PARAM_NAMES.items()})

    def to(self, device: torch.device | str) -> "Gaussians":
        return Gaussians(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    # -- rendering --------------------------------------------------------------------------------
    def render(self, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
               sh_degree: Optional[int] = None, **kwargs):
        """Render into C cameras; ``kwargs`` go to :func:`splatting.rasterize.rasterize`.

        Returns:
            ``(rgb [C, H, W, 3], alpha [C, H, W, 1], depth or None, meta)``.
        """
        return render_raw(self.means, self.quats, self.scales_log, self.opacities_logit, self.sh0, self.shN, viewmats,
                          Ks, width, height, self.sh_degree if sh_degree is None else sh_degree, **kwargs)

    # -- files ------------------------------------------------------------------------------------
    def save_ply(self, path: str | Path) -> None:
        """Write the standard 3DGS .ply (atomically)."""
        from splatting.io import save_gaussian_ply

        save_gaussian_ply(path, self.means, self.quats, self.scales_log, self.opacities_logit, self.sh0, self.shN)

    @classmethod
    def load_ply(cls, path: str | Path) -> "Gaussians":
        """Read a standard 3DGS .ply (any SH degree 0-3)."""
        from splatting.io import load_gaussian_ply

        d = load_gaussian_ply(path)
        return cls(d["means"], d["quats"], d["scales_log"], d["opacities_logit"], d["sh0"], d["shN"])

    def save_splat(self, path: str | Path) -> None:
        """Write the compact .splat format of web viewers (degree-0 colour only)."""
        from splatting.io import save_splat

        save_splat(path, self.means, self.quats, self.scales_log, self.opacities_logit, self.sh0)


def render_raw(means, quats, scales_log, opacities_logit, sh0, shN, viewmats, Ks, width, height, sh_degree: int,
               **kwargs):
    """Activate unconstrained parameters (exp scales, sigmoid opacities) and render with SH colour."""
    return rasterize(means, quats, torch.exp(scales_log), torch.sigmoid(opacities_logit), torch.cat([sh0, shN], dim=1),
                     viewmats, Ks, width, height, sh_degree=sh_degree, **kwargs)
