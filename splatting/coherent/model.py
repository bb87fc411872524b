"""CoherentGS's structured Gaussians: one per (downsampled) input pixel, moved only along its ray.

Written from the paper's description (Paliwal et al., "CoherentGS: Sparse Novel View Synthesis with
Coherent 3D Gaussians", ECCV 2024); no code of its authors was used.

Per input view ``v`` and Gaussian pixel ``p`` (the centre of a ``stride`` x ``stride`` block):

* **position** ``o_v + z r_p`` with the camera centre ``o_v``, the pixel's ray ``r_p`` scaled to
  unit z-depth and the depth ``z = exp(delta_z(p)) / (exp(log_a_v) d0(p) + b_v m_v)``: the initial
  disparity ``d0 = 1 / depth`` (:mod:`splatting.coherent.depth`) aligned by a per-view scale
  ``exp(log_a_v)`` and offset ``b_v`` (relative to the view's mean disparity ``m_v``), times the
  decoder's multiplicative residual;
* **opacity** ``sigmoid(logit(model.init_opacity) + delta_o(p))``;
* **scale** the block's footprint at depth ``z`` (``z stride / f``, times ``model.init_scale``),
  times a learnt per-Gaussian factor; so a Gaussian that moves keeps covering its pixels;
* rotation and SH colour are free per-Gaussian parameters (colour starts at the block's mean colour).

**Single-view coherence.** ``(delta_z, delta_o)`` are the output of a small convolutional decoder of
its own per view (1x1 conv, SiLU, 3x3 conv, SiLU, 1x1 conv; the last layer starts at zero) whose
input is a fixed positional code of the pixel grid: Fourier features ``sin / cos(2^k pi x)``,
``k < code_frequencies``, of the normalised pixel coordinates. The decoder can only produce fields
as smooth as its input, so neighbouring Gaussians move together. **Depth layers** let them break
apart at depth edges: the initial depth map is cut where neighbouring disparities differ by more
than ``layer_edge`` (relative), the ``layers`` largest connected regions become layers (the rest
joins the nearest layer), and the code is given once per layer, zero outside it, so each layer
has a field of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from perception3d.errors import ConfigError
from splatting.coherent.depth import rays_through
from splatting.coherent.flow import pixel_grid
from splatting.sh import num_sh_bases, rgb_to_sh0

__all__ = ["CoherentOptions", "CoherentModel", "depth_layers", "positional_code", "tv_loss"]


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"coherent.{key}={value!r}: expected {expected}")


@dataclass(frozen=True)
class CoherentOptions:
    """CoherentGS options (the ``coherent`` section of a splatting config; ``model.init_opacity``,
    ``model.init_scale``, ``model.sh_degree`` and the ``optim`` colour / scale / rotation learning
    rates apply too; densification (``strategy``) does not: CoherentGS keeps its Gaussians).

    Attributes:
        stride: one Gaussian per ``stride`` x ``stride`` block of each input view's pixels.
        depth_source: ``"mvs"`` plane-sweep stereo between the input views; ``"folder"`` one depth map
            per view from ``depth_folder``; ``"model"`` a monocular depth network from ``depth_model``
            (both aligned to the plane sweep in scale and offset; :mod:`splatting.coherent.depth`).
        depth_folder: a folder of ``<image stem>.npy`` / ``.png`` depth maps.
        depth_model: an ``.onnx`` or TorchScript monocular depth network (:mod:`splatting.coherent.nets`).
        depth_model_input: the square input size the network takes (518 for Depth Anything, 256 / 384 for MiDaS).
        depth_model_output: what it outputs: ``"disparity"`` (relative inverse depth) or ``"depth"``.
        mvs_planes, mvs_window, mvs_min_ncc: plane-sweep planes, NCC patch size and the NCC a depth
            needs to be kept.
        flow_method: ``"dis"`` or ``"farneback"`` (OpenCV); ``flow_model``: a learned flow network
            file used instead.
        layers, layer_edge: depth layers per view and the relative disparity jump between them.
        code_frequencies, decoder_width, decoder_lr: the positional code, the decoder's hidden
            channels and its Adam learning rate.
        align_steps, align_lr: stage 1 (depth alignment): Adam steps on the per-view scale and
            offset against the optical flow alone, and their learning rate (a tenth of it in stage 2).
        flow_lambda: weight of the flow loss (mean pixel distance between where a Gaussian of one
            input view projects in another and where the flow says its pixel went).
        tv_lambda: weight of the total-variation loss on rendered disparity (relative to its mean),
            in the training view and in a virtual view between two input cameras.
    """

    stride: int = 2
    depth_source: Literal["mvs", "folder", "model"] = "mvs"
    depth_folder: Optional[str] = None
    depth_model: Optional[str] = None
    depth_model_input: int = 518
    depth_model_output: Literal["disparity", "depth"] = "disparity"
    mvs_planes: int = 64
    mvs_window: int = 5
    mvs_min_ncc: float = 0.5
    flow_method: Literal["dis", "farneback"] = "dis"
    flow_model: Optional[str] = None
    layers: int = 4
    layer_edge: float = 0.05
    code_frequencies: int = 4
    decoder_width: int = 32
    decoder_lr: float = 1e-3
    align_steps: int = 300
    align_lr: float = 0.01
    flow_lambda: float = 0.01
    tv_lambda: float = 0.1

    def __post_init__(self) -> None:
        for k in ("stride", "depth_model_input", "mvs_planes", "layers", "code_frequencies", "decoder_width"):
            v = getattr(self, k)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, k, v, "a whole number >= 1")
        _check(isinstance(self.align_steps, int) and self.align_steps >= 0, "align_steps", self.align_steps,
               "a whole number >= 0")
        _check(self.mvs_planes >= 3, "mvs_planes", self.mvs_planes, "at least 3 planes")
        _check(self.mvs_window % 2 == 1, "mvs_window", self.mvs_window, "an odd patch size")
        for k in ("decoder_lr", "align_lr", "flow_lambda", "tv_lambda", "layer_edge"):
            v = getattr(self, k)
            _check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, k, v, "a finite number >= 0")
        _check(-1.0 <= self.mvs_min_ncc <= 1.0, "mvs_min_ncc", self.mvs_min_ncc, "an NCC in [-1, 1]")
        if self.depth_source == "folder":
            _check(bool(self.depth_folder), "depth_folder", self.depth_folder, "a folder (depth_source is 'folder')")
        if self.depth_source == "model":
            _check(bool(self.depth_model), "depth_model", self.depth_model, "a network file (depth_source is 'model')")


def depth_layers(depth: np.ndarray, layers: int, edge: float) -> np.ndarray:
    """``int64 [h, w]`` layer index per pixel of a depth map (see the module docstring)."""
    from scipy.ndimage import distance_transform_edt, label

    disp = 1.0 / np.maximum(depth, 1e-12)
    boundary = np.zeros(depth.shape, bool)
    for axis in (0, 1):
        a, b = np.swapaxes(disp, 0, axis)[:-1], np.swapaxes(disp, 0, axis)[1:]
        jump = np.abs(a - b) > edge * np.minimum(a, b)
        bnd = np.swapaxes(boundary, 0, axis)
        bnd[:-1] |= jump
        bnd[1:] |= jump
    regions, n = label(~boundary)
    out = np.full(depth.shape, -1, np.int64)
    if n:
        sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        for rank, region in enumerate(np.argsort(-sizes)[:layers]):
            out[regions == region + 1] = rank
    if (out < 0).all():
        return np.zeros(depth.shape, np.int64)
    _, (iy, ix) = distance_transform_edt(out < 0, return_indices=True)
    return out[iy, ix]


def positional_code(h: int, w: int, frequencies: int) -> torch.Tensor:
    """``[4 frequencies + 3, h, w]``: x, y (aspect kept, x in [-1, 1]), 1, and their Fourier features."""
    x = (torch.arange(w, dtype=torch.float32) + 0.5) * (2.0 / w) - 1.0
    y = ((torch.arange(h, dtype=torch.float32) + 0.5) * (2.0 / h) - 1.0) * (h / w)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    feats = [xx, yy, torch.ones_like(xx)]
    for k in range(frequencies):
        for c in (xx, yy):
            feats += [torch.sin(math.pi * 2 ** k * c), torch.cos(math.pi * 2 ** k * c)]
    return torch.stack(feats)


def _decoder(channels: int, width: int) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, width, 1), torch.nn.SiLU(),
                              torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(width, 2, 1))
    torch.nn.init.zeros_(net[-1].weight)
    torch.nn.init.zeros_(net[-1].bias)
    return net


def tv_loss(disparity: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Total variation of ``disparity [H, W]`` relative to its mean, over neighbours both covered (alpha > 0.5)."""
    covered = alpha > 0.5
    if not bool(covered.any()):
        return disparity.sum() * 0
    d = disparity / disparity[covered].mean().detach().clamp(min=1e-12)
    terms = []
    for dim in (0, 1):
        a, b = d.narrow(dim, 0, d.shape[dim] - 1), d.narrow(dim, 1, d.shape[dim] - 1)
        m = covered.narrow(dim, 0, d.shape[dim] - 1) & covered.narrow(dim, 1, d.shape[dim] - 1)
        terms.append((a - b).abs()[m].mean() if bool(m.any()) else d.sum() * 0)
    return terms[0] + terms[1]


class CoherentModel(torch.nn.Module):
    """The structured Gaussians of V input views (see the module docstring).

    Args:
        images: per view ``float32 [H, W, 3]``.
        camtoworlds, Ks: per view ``[4, 4]`` camera -> world and ``[3, 3]`` intrinsics at that resolution.
        depths: per view ``float32 [H, W]`` initial z-depth.
        opts: :class:`CoherentOptions`.
        sh_degree, init_opacity, init_scale: from the ``model`` config section.
    """

    def __init__(self, images: list[torch.Tensor], camtoworlds: list[torch.Tensor], Ks: list[torch.Tensor],
                 depths: list[np.ndarray], opts: CoherentOptions, sh_degree: int, init_opacity: float,
                 init_scale: float):
        super().__init__()
        s = opts.stride
        self.opts, self.num_views = opts, len(images)
        self.init_logit = math.log(init_opacity / (1 - init_opacity))
        self.log_init_scale = math.log(init_scale)
        self.sizes: list[tuple[int, int]] = []
        self.decoders = torch.nn.ModuleList()
        rgb, counts = [], []
        for v, (img, c2w, K, depth) in enumerate(zip(images, camtoworlds, Ks, depths)):
            H, W = img.shape[:2]
            h, w = H // s, W // s
            self.sizes.append((h, w))
            centres = pixel_grid(h, w, s)
            K = K.float()
            rays = rays_through(centres, K).reshape(-1, 3) @ c2w[:3, :3].float().T
            ix, iy = ((centres - 0.5).long()).unbind(-1)  # the pixel at (or just before) the block's centre
            d0 = torch.from_numpy(np.asarray(depth, np.float32))[iy, ix]
            layer = torch.from_numpy(depth_layers(d0.numpy(), opts.layers, opts.layer_edge))
            code = positional_code(h, w, opts.code_frequencies)
            masks = F.one_hot(layer, opts.layers).permute(2, 0, 1).float()  # [L, h, w]
            code = (masks[:, None] * code[None]).reshape(-1, h, w)
            self.register_buffer(f"origin{v}", c2w[:3, 3].float().clone())
            self.register_buffer(f"rays{v}", rays.contiguous())
            self.register_buffer(f"disp0_{v}", (1.0 / d0.reshape(-1)).contiguous())
            self.register_buffer(f"code{v}", code.contiguous())
            self.register_buffer(f"layers{v}", layer.reshape(-1).clone())
            self.register_buffer(f"footprint{v}", torch.tensor(s * 2.0 / float(K[0, 0] + K[1, 1])))
            self.decoders.append(_decoder(code.shape[0], opts.decoder_width))
            rgb.append(F.avg_pool2d(img.permute(2, 0, 1)[None], s)[0, :, :h, :w].reshape(3, -1).T)
            counts.append(h * w)
        self.counts = counts
        n = sum(counts)
        self.log_a = torch.nn.Parameter(torch.zeros(self.num_views))
        self.b = torch.nn.Parameter(torch.zeros(self.num_views))
        self.sh0 = torch.nn.Parameter(rgb_to_sh0(torch.cat(rgb).clamp(0, 1))[:, None, :].contiguous())
        self.shN = torch.nn.Parameter(torch.zeros(n, num_sh_bases(sh_degree) - 1, 3))
        self.scales = torch.nn.Parameter(torch.zeros(n, 3))  # log factor on the footprint
        self.quats = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))

    def buffer(self, name: str, v: int) -> torch.Tensor:
        return getattr(self, f"{name}{v}")

    def _view_fields(self, v: int, residuals: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(depth [n_v], opacity residual [n_v])`` of view ``v``'s Gaussians."""
        disp0 = self.buffer("disp0_", v)
        disp = disp0 * self.log_a[v].exp() + self.b[v] * disp0.mean()
        disp = disp.clamp(min=1e-3 * float(disp0.mean()))
        if not residuals:
            return 1.0 / disp, torch.zeros_like(disp)
        out = self.decoders[v](self.buffer("code", v)[None])[0].reshape(2, -1)
        return out[0].exp() / disp, out[1]

    def view_means(self, v: int, residuals: bool = True) -> torch.Tensor:
        """World positions ``[n_v, 3]`` of view ``v``'s Gaussians."""
        depth, _ = self._view_fields(v, residuals)
        return self.buffer("origin", v) + depth[:, None] * self.buffer("rays", v)

    def depth_map(self, v: int) -> torch.Tensor:
        """``[h, w]`` the current depth of view ``v``'s Gaussians."""
        return self._view_fields(v)[0].reshape(self.sizes[v])

    def gaussians(self) -> dict[str, torch.Tensor]:
        """Every Gaussian as rasterizer parameters: ``means, quats, scales (log), opacities (logit), sh0, shN``."""
        means, scales, opac = [], [], []
        for v in range(self.num_views):
            depth, d_o = self._view_fields(v)
            means.append(self.buffer("origin", v) + depth[:, None] * self.buffer("rays", v))
            scales.append((depth * self.buffer("footprint", v)).log() + self.log_init_scale)
            opac.append(self.init_logit + d_o)
        return {"means": torch.cat(means), "quats": self.quats, "scales": torch.cat(scales)[:, None] + self.scales,
                "opacities": torch.cat(opac), "sh0": self.sh0, "shN": self.shN}

    def view_of_gaussian(self) -> torch.Tensor:
        """``int64 [N]``: the input view each Gaussian belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_views), torch.tensor(self.counts))
