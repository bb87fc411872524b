"""The quantizers of Compact 3DGS: the learnable volume mask, residual vector quantization, 8-bit.

Written from the paper's description (Lee et al., CVPR 2024).

* :func:`binary_mask`: per-Gaussian mask logits ``m``; the forward value is the hard mask
  ``1[sigmoid(m) > threshold]``, the gradient that of ``sigmoid(m)`` (straight-through estimator).
  The renderer multiplies it into scales and opacities; the training loss adds
  ``lambda * mean(sigmoid(m))`` so that Gaussians that do not help get switched off and removed.
* :class:`ResidualVQ`: ``S`` stages of ``K``-entry codebooks; stage ``s`` quantizes the residual the
  earlier stages left: ``r_0 = x``, ``i_s = argmin_k |r_{s-1} - C_s[k]|``, ``r_s = r_{s-1} - C_s[i_s]``,
  ``x_hat = sum_s C_s[i_s]``. Codebooks start from k-means of each stage's residuals
  (:meth:`ResidualVQ.init_kmeans`) and are then learned by gradient descent: the forward output is
  ``x + sg(x_hat - x)`` (straight-through to ``x``) and the loss
  ``|sg(x) - x_hat|^2 + beta |x - sg(x_hat)|^2`` moves codewords to the data and the data towards
  its codewords.
* :func:`quantize_uint8` / :func:`dequantize_uint8`: min-max 8-bit quantization (opacities, the
  hash table).
"""
from __future__ import annotations

import torch
from torch import nn

from perception3d.errors import ConfigError

__all__ = ["binary_mask", "kmeans", "ResidualVQ", "quantize_uint8", "dequantize_uint8"]


def binary_mask(logits: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Hard 0/1 mask with the gradient of ``sigmoid(logits)`` (straight-through)."""
    soft = torch.sigmoid(logits)
    return soft + ((soft > threshold).to(soft.dtype) - soft).detach()


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of each row: ``[N]`` (C++ on CPU; chunked torch elsewhere)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and codebook.dtype == torch.float32:
        from splatting._ext import cpu_ext

        return cpu_ext().nearest_codeword(x.contiguous(), codebook.contiguous())
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    c2 = (codebook * codebook).sum(1)
    for s in range(0, x.shape[0], 65536):
        xs = x[s:s + 65536]
        out[s:s + 65536] = (c2[None] - 2 * xs @ codebook.T).argmin(1)
    return out


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: ``[k, D]`` centroids of ``x [N, D]``.

    Empty clusters are re-seeded with the point farthest from its centroid.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans: no points")
    centres = x[torch.randint(n, (1,), generator=g)].clone()
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = x[torch.multinomial(p.cpu(), 1, generator=g).to(x.device)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, ((x - nxt) ** 2).sum(1))
    for _ in range(iters):
        assign = _nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            far = ((x - centres[assign]) ** 2).sum(1).topk(int(empty.sum())).indices
            centres[empty] = x[far]
    return centres


class ResidualVQ(nn.Module):
    """Residual vector quantizer (see the module docstring).

    Args:
        dim: D, the vector size (3 for log-scales, 4 for quaternions).
        num_stages: S.
        codebook_size: K (64 in the paper: 6-bit indices).
        beta: weight of the commitment term.
    """

    def __init__(self, dim: int, num_stages: int = 6, codebook_size: int = 64, beta: float = 0.25) -> None:
        super().__init__()
        if num_stages < 1 or not 2 <= codebook_size <= 65536:
            raise ConfigError(f"ResidualVQ: num_stages >= 1 and 2 <= codebook_size <= 65536 expected, "
                              f"got {num_stages}, {codebook_size}")
        self.beta = beta
        self.codebooks = nn.Parameter(torch.zeros(num_stages, codebook_size, dim))

    @torch.no_grad()
    def init_kmeans(self, x: torch.Tensor, iters: int = 20, seed: int = 0) -> None:
        """Codebooks from k-means of each stage's residuals of ``x [N, D]``."""
        r = x.detach()
        for s in range(self.codebooks.shape[0]):
            self.codebooks[s] = kmeans(r, self.codebooks.shape[1], iters, seed + s)
            r = r - self.codebooks[s][_nearest(r, self.codebooks[s])]

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """Codeword index of every stage: ``[N, S]`` int64."""
        r = x.detach()
        out = []
        for cb in self.codebooks.detach():
            i = _nearest(r, cb)
            out.append(i)
            r = r - cb[i]
        return torch.stack(out, 1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``x_hat [N, D]`` from ``indices [N, S]``."""
        S, K, D = self.codebooks.shape
        rows = (indices + torch.arange(S, device=indices.device) * K).flatten()
        # index_select: its backward (index_add) accumulates in a fixed order, unlike advanced
        # indexing's index_put, whose CPU accumulation order varies between runs
        return self.codebooks.view(S * K, D).index_select(0, rows).view(-1, S, D).sum(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + sg(x_hat - x), loss)``: the straight-through quantized vectors and the VQ loss."""
        x_hat = self.decode(self.indices(x))
        loss = ((x.detach() - x_hat) ** 2).sum(1).mean() + self.beta * ((x - x_hat.detach()) ** 2).sum(1).mean()
        return x + (x_hat - x).detach(), loss


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Min-max 8-bit quantization: ``(codes uint8, lo, hi)``; ``x ~ lo + codes * (hi - lo) / 255``."""
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return ((x - lo) / scale).round().clamp(0, 255).to(torch.uint8), lo, hi


def dequantize_uint8(codes: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return codes.float() * scale + lo
