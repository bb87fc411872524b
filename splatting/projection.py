"""Projection of 3D Gaussians to 2D image-plane Gaussians (pinhole EWA splatting), in torch.

Conventions follow gsplat (``fully_fused_projection``, pinhole camera), so that the CPU path and
gsplat's CUDA path render the same scene the same way:

* camera: OpenCV axes (x right, y down, z forward); ``viewmats [C, 4, 4]`` map world to camera;
  ``Ks [C, 3, 3]`` are pinhole intrinsics; pixel ``(u, v)`` has its centre at ``(u + 0.5, v + 0.5)``.
* covariance ``Sigma = R S S^T R^T`` with ``R`` from the normalised quaternion ``(w, x, y, z)`` and
  ``S = diag(scales)`` (linear scales); in the camera ``Sigma_c = R_v Sigma R_v^T``.
* EWA: ``cov2d = J Sigma_c J^T`` with the Jacobian of the perspective map at the mean, where the
  mean's ``x / z`` and ``y / z`` are clamped to 1.3 times the half field of view (as gsplat does,
  to keep Gaussians far outside the image from exploding).
* a low-pass filter: ``eps2d`` (0.3 px^2) is added to the diagonal; in antialiased mode the opacity
  is multiplied by ``sqrt(det(cov2d) / det(cov2d + eps2d I))`` (the "compensation", Mip-Splatting).
* ``conics = (a, b, c)``: the inverse 2D covariance, used as ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``.
* radius: ``ceil(3 sqrt(lambda_max))`` pixels; a Gaussian gets radius 0 (culled) when it is behind
  ``near_plane`` or beyond ``far_plane``, its 2D covariance is degenerate, its radius is at most
  ``radius_clip``, or its bounding square misses the image.

Everything here is differentiable by autograd; radii and masks carry no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Projection", "quat_to_rotmat", "covariance_3d", "project_gaussians", "maybe_visible"]


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` quaternions ``(w, x, y, z)`` (normalised here) -> ``[..., 3, 3]`` rotations."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """World covariances ``R S S^T R^T``: quats ``[N, 4]``, linear scales ``[N, 3]`` -> ``[N, 3, 3]``."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


@dataclass(frozen=True)
class Projection:
    """Per-camera 2D Gaussians.

    Attributes:
        means2d: ``[C, N, 2]`` pixel coordinates of the projected means.
        conics: ``[C, N, 3]`` inverse 2D covariance ``(a, b, c)`` (after the ``eps2d`` dilation).
        depths: ``[C, N]`` camera-frame z of the means.
        radii: ``[C, N]`` int32 pixel radius, 0 for culled Gaussians.
        compensations: ``[C, N]`` antialiasing opacity factor, or None in classic mode.
    """

    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor
    compensations: torch.Tensor | None


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    antialiased: bool = False,
) -> Projection:
    """Project N Gaussians into C pinhole cameras (see the module docstring for the maths).

    Args:
        means: ``[N, 3]`` world positions.
        quats: ``[N, 4]`` rotations ``(w, x, y, z)``, any norm.
        scales: ``[N, 3]`` linear standard deviations along the local axes.
        viewmats: ``[C, 4, 4]`` world-to-camera transforms (OpenCV axes).
        Ks: ``[C, 3, 3]`` intrinsics.
        width, height: image size in pixels.
        eps2d: low-pass dilation added to the 2D covariance diagonal, px^2.
        near_plane, far_plane: depth range kept, metres (scene units).
        radius_clip: Gaussians whose radius is at most this many pixels are culled.
        antialiased: also return the opacity compensation factors.

    Returns:
        :class:`Projection`.
    """
    C, N = viewmats.shape[0], means.shape[0]
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.matmul(means, R.transpose(1, 2)) + t[:, None, :]  # [C, N, 3]
    # Sigma_c = (R_v M)(R_v M)^T with M = R_q S; one GEMM per camera: [3, 3] @ [3, N * 3]
    M = quat_to_rotmat(quats) * scales[..., None, :]  # [N, 3, 3]
    Mc = torch.matmul(R, M.permute(1, 0, 2).reshape(3, N * 3)).reshape(C, 3, N, 3)  # rows of R_v M

    x, y, z = means_c.unbind(-1)  # [C, N]
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    u = torch.clamp(x / z, min=-(cx / fx + 0.3 * tan_fovx), max=(width - cx) / fx + 0.3 * tan_fovx)
    v = torch.clamp(y / z, min=-(cy / fy + 0.3 * tan_fovy), max=(height - cy) / fy + 0.3 * tan_fovy)
    # J = [[fx/z, 0, -fx u/z], [0, fy/z, -fy v/z]];  cov2d = (J R_v M)(J R_v M)^T, written out
    rz = 1.0 / z
    row0 = (fx * rz)[..., None] * (Mc[:, 0] - u[..., None] * Mc[:, 2])  # [C, N, 3]
    row1 = (fy * rz)[..., None] * (Mc[:, 1] - v[..., None] * Mc[:, 2])
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)  # [C, N, 2]

    a, b, c = (row0 * row0).sum(-1), (row0 * row1).sum(-1), (row1 * row1).sum(-1)
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det_blur = a * c - b * b
    det = det_blur.clamp(min=1e-10)
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if antialiased else None
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        radius = torch.ceil(3.0 * torch.sqrt(mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.01))))
        valid = (det_blur > 0) & (z > near_plane) & (z < far_plane) & (radius > radius_clip)
        mx, my = means2d[..., 0], means2d[..., 1]
        valid &= (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        radii = torch.where(valid, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(means2d, conics, z, radii, compensations)


@torch.no_grad()
def maybe_visible(means: torch.Tensor, scales: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int,
                  height: int, eps2d: float = 0.3, near_plane: float = 0.01, far_plane: float = 1e10) -> torch.Tensor:
    """``[N]`` bool: Gaussians that may get a radius > 0 in at least one camera (a cheap, conservative test).

    Every Gaussian it rejects is culled by :func:`project_gaussians` too (depth outside
    ``(near, far)``, or its bounding square off the image), so projecting only the others changes
    no output. The bound: ``lambda_max(cov2d) <= |J|_F^2 s_max^2 + eps2d`` with the same clamped
    Jacobian; the radius ``3 sqrt(lambda_max + 0.1)`` (the 0.01 floor under the eigenvalue's
    square root) plus one pixel for the ceiling.
    """
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    x, y, z = (torch.matmul(means, R.transpose(1, 2)) + t[:, None, :]).unbind(-1)  # [C, N]
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    zs = torch.where(z > near_plane, z, torch.ones_like(z))
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    u = torch.clamp(x / zs, min=-(cx / fx + 0.3 * tan_fovx), max=(width - cx) / fx + 0.3 * tan_fovx)
    v = torch.clamp(y / zs, min=-(cy / fy + 0.3 * tan_fovy), max=(height - cy) / fy + 0.3 * tan_fovy)
    j2 = (fx * fx * (1 + u * u) + fy * fy * (1 + v * v)) / (zs * zs)  # |J|_F^2
    smax = scales.amax(dim=-1)
    r = 3.0 * torch.sqrt(j2 * smax * smax + eps2d + 0.1) + 1.0
    mx, my = fx * x / zs + cx, fy * y / zs + cy
    ok = (z > near_plane) & (z < far_plane)
    ok &= (mx + r > 0) & (mx - r < width) & (my + r > 0) & (my - r < height)
    return ok.any(dim=0)
