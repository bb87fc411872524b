"""The nerfstudio plugin: ``ns-train p3d-3dgs --data <folder>`` trains 3DGS on any nerfstudio
dataparser's data, on a CPU too.

nerfstudio finds the methods through the ``nerfstudio.method_configs`` entry points of setup.py
(``p3d_3dgs``, ``p3d_compact3dgs``, ``p3d_coherentgs`` below). This module imports nerfstudio, so
nothing else in the package imports it; it runs in nerfstudio's own environment (scripts/install.sh,
the nerfstudio option: nerfstudio 1.1.5 needs numpy<2 and torchvision).

:class:`P3DSplatModel` is nerfstudio's ``SplatfactoModel`` with what must change replaced:

* ``populate_modules``: the 3DGS initialisation (identity rotations, nearest-neighbour scales,
  opacity 0.1) on the tensors' own device (splatfacto moves them to CUDA), gsplat's ``DefaultStrategy`` with the 3DGS
  paper's rules (the config defaults below, the same as ``configs/splatting``), and LPIPS from the
  local weights of :func:`splatting.metrics.default_lpips` (splatfacto's torchmetrics LPIPS
  downloads AlexNet when the model is built; without the local file LPIPS is left out);
* ``get_outputs``: renders with :func:`splatting.rasterize.rasterize` (our C++ rasterizer on CPU
  tensors, gsplat's CUDA kernels on CUDA ones; the same ``meta`` that the strategy reads);
* ``step_post_backward``: the strategy counts steps from 1, as our trainer does (gsplat resets every
  opacity at a multiple of ``reset_every``, step 0 included), and skips the run's last step, after
  which nothing would train.

Everything else (the parameters under splatfacto's names, the trainer, checkpoints, the viewer,
``ns-eval``, ``ns-export gaussian-splat``, which checks for a ``SplatfactoModel``) is nerfstudio's.
The learning-rate schedules return Python floats (:class:`_ExponentialDecay`), so that torch >= 2.6
loads the checkpoints.

:class:`P3DCompactModel` (``p3d-compact3dgs``) trains Compact 3DGS the same way (see its docstring);
nerfstudio's exporter can only write it as a standard .ply, with SH fitted to its colour field.

:class:`P3DCoherentModel` (``p3d-coherentgs``) trains CoherentGS (``splatting/coherent/``) on the
dataparser's training images, 2-4 views of one size (a scene of a few views, or an eval mode that holds
the others out, e.g. ``nerfstudio-data --eval-mode fraction``): one Gaussian per ``coherent.stride``
pixel block of each view, built with stage 1 when training starts (the images are unknown before), the
optimizers handed its parameters then; stage 2 is nerfstudio's loop with the flow and disparity-TV
losses, without densification. The baked Gaussians are splatfacto's ``gauss_params``, so evaluation,
the viewer and ``ns-export gaussian-splat`` work as for 3DGS; resuming a run is not supported.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Type, Union

import numpy as np
import torch
from gsplat.strategy import DefaultStrategy
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.model_components.lib_bilagrid import BilateralGrid
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification
from nerfstudio.utils.colors import get_color

from splatting.coherent.model import CoherentModel, CoherentOptions
from splatting.coherent.train import align_depths, build_model, coherence_losses, param_groups
from splatting.compact.model import CompactModel, CompactOptions
from splatting.config import SplatOptimConfig
from splatting.gaussians import knn_scales
from splatting.rasterize import rasterize
from splatting.sh import num_sh_bases, rgb_to_sh0, sh0_to_rgb, sh_basis

__all__ = ["P3DSplatModelConfig", "P3DSplatModel", "P3DCompactModelConfig", "P3DCompactModel",
           "P3DCoherentModelConfig", "P3DCoherentModel", "p3d_3dgs", "p3d_compact3dgs", "p3d_coherentgs"]


@dataclass
class P3DSplatModelConfig(SplatfactoModelConfig):
    """Splatfacto rendered by ``splatting.rasterize``, with the 3DGS paper's densification.

    The fields below differ from splatfacto's defaults (``configs/splatting`` uses the same values);
    the others are splatfacto's.
    """

    _target: Type = field(default_factory=lambda: P3DSplatModel)
    num_downscales: int = 0
    """train at full resolution from the start (splatfacto: 2, a quarter of it for 3000 steps)"""
    cull_alpha_thresh: float = 0.005
    """prune Gaussians below this opacity (splatfacto: 0.1)"""
    cull_scale_thresh: float = 0.1
    """prune Gaussians larger than this x the scene scale (splatfacto: 0.5)"""
    densify_grad_thresh: float = 0.0002
    """grow Gaussians whose mean image-plane gradient exceeds this (splatfacto: 0.0008 of absgrad)"""
    use_absgrad: bool = False
    """must stay False: the CPU rasterizer gives plain gradients (splatfacto: True)"""
    stop_screen_size_at: int = 0
    """0: no splitting / culling by screen size (splatfacto: until step 4000)"""
    pause_refine_after_reset: int = 0
    """steps without densification after an opacity reset (splatfacto: #train views + refine_every)"""
    backend: Literal["auto", "cpu", "reference", "gsplat"] = "auto"
    """splatting.rasterize backend; auto: gsplat for CUDA tensors, our C++ kernels for CPU ones"""


class _LocalLPIPS:
    """LPIPS for splatfacto's metrics from the local weights (:func:`splatting.metrics.default_lpips`),
    loaded at first use; NaN (dropped from the metrics) without them. Not an ``nn.Module``: it is not
    part of the checkpoint, so a checkpoint loads whether or not the weights are present."""

    def __init__(self) -> None:
        self.model, self.loaded = None, False

    def __call__(self, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:  # [1, 3, H, W] in [0, 1]
        if not self.loaded:
            from splatting.metrics import default_lpips

            self.model, self.loaded = default_lpips(), True
        if self.model is None or min(gt.shape[-2:]) < 31:
            return torch.tensor(float("nan"))
        self.model.to(gt.device)
        return self.model(pred.permute(0, 2, 3, 1), gt.permute(0, 2, 3, 1))


def _viewmats(camtoworld_gl: torch.Tensor) -> torch.Tensor:
    """nerfstudio's ``[C, 3, 4]`` camera-to-world (OpenGL axes) -> ``[C, 4, 4]`` world-to-camera (OpenCV)."""
    R = camtoworld_gl[:, :3, :3] * camtoworld_gl.new_tensor([1.0, -1.0, -1.0])
    Rt = R.transpose(1, 2)
    out = torch.zeros(R.shape[0], 4, 4, dtype=R.dtype, device=R.device)
    out[:, :3, :3] = Rt
    out[:, :3, 3] = -(Rt @ camtoworld_gl[:, :3, 3:])[..., 0]
    out[:, 3, 3] = 1.0
    return out


class P3DSplatModel(SplatfactoModel):
    """``SplatfactoModel`` rendering through :func:`splatting.rasterize.rasterize` (see the module docstring)."""

    config: P3DSplatModelConfig
    sh_colours = False
    """``features_dc`` holds SH coefficients even at ``sh_degree`` 0 (splatfacto: a colour logit then)"""

    def populate_modules(self) -> None:
        from pytorch_msssim import SSIM
        from torchmetrics.image import PeakSignalNoiseRatio

        cfg = self.config
        if cfg.use_absgrad:
            raise ValueError("pipeline.model.use_absgrad=True: our CPU rasterizer gives plain image-plane gradients, "
                             "not absolute ones; keep it False (with densify_grad_thresh ~0.0002)")
        if self.seed_points is not None and not cfg.random_init:
            means = self.seed_points[0].float()
            rgb = self.seed_points[1].float() / 255.0 if self.seed_points[1].shape[0] > 0 else torch.rand(len(means), 3)
        else:
            means = (torch.rand(cfg.num_random, 3) - 0.5) * cfg.random_scale
            rgb = torch.rand(cfg.num_random, 3)
        params = self._initial_params(means, rgb)
        self.gauss_params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.contiguous()) for k, v in params.items()})
        self.camera_optimizer = cfg.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self.lpips = _LocalLPIPS()
        self.step = 0
        self.crop_box = None
        # the viewer's grey behind renders of a model trained on random backgrounds (as splatfacto)
        self.background_color = (torch.tensor([0.1490, 0.1647, 0.2157]) if cfg.background_color == "random"
                                 else get_color(cfg.background_color))
        if cfg.use_bilateral_grid:
            self.bil_grids = BilateralGrid(num=self.num_train_data, grid_X=cfg.grid_shape[0], grid_Y=cfg.grid_shape[1],
                                           grid_W=cfg.grid_shape[2])
        self.strategy = DefaultStrategy(
            prune_opa=cfg.cull_alpha_thresh, grow_grad2d=cfg.densify_grad_thresh, grow_scale3d=cfg.densify_size_thresh,
            grow_scale2d=cfg.split_screen_size, prune_scale3d=cfg.cull_scale_thresh, prune_scale2d=cfg.cull_screen_size,
            refine_scale2d_stop_iter=cfg.stop_screen_size_at, refine_start_iter=cfg.warmup_length,
            refine_stop_iter=cfg.stop_split_at, reset_every=cfg.reset_alpha_every * cfg.refine_every,
            refine_every=cfg.refine_every, pause_refine_after_reset=cfg.pause_refine_after_reset, absgrad=False,
            revised_opacity=False, verbose=False)
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.last_step: Optional[int] = None  # the trainer's last step, set by get_training_callbacks

    def _initial_params(self, means: torch.Tensor, rgb: torch.Tensor) -> Dict[str, torch.Tensor]:
        """3DGS's initial Gaussians under splatfacto's names (and its opacity shape ``[N, 1]``)."""
        n, deg = len(means), self.config.sh_degree
        # splatfacto's colour convention: SH coefficients, or a colour logit when sh_degree is 0
        dc = rgb_to_sh0(rgb) if deg > 0 else torch.logit(rgb, eps=1e-6)
        return {"means": means, "scales": torch.log(knn_scales(means))[:, None].repeat(1, 3),
                "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1), "features_dc": dc,
                "features_rest": torch.zeros(n, num_sh_bases(deg) - 1, 3),
                "opacities": torch.full((n, 1), math.log(0.1 / 0.9))}

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes):
        trainer = training_callback_attributes.trainer
        if trainer is not None:
            self.last_step = getattr(trainer, "_start_step", 0) + trainer.config.max_num_iterations - 1
        return super().get_training_callbacks(training_callback_attributes)

    def step_post_backward(self, step: int) -> None:
        assert step == self.step
        if step == self.last_step:  # densifying or resetting opacities now would leave them untrained
            return
        self.strategy.step_post_backward(params=self.gauss_params, optimizers=self.optimizers,
                                         state=self.strategy_state, step=step + 1, info=self.info, packed=False)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        """Render one camera: ``rgb [H, W, 3]`` on the background, ``accumulation [H, W, 1]``,
        ``depth [H, W, 1]`` (expected depth; outside training or with ``output_depth_during_training``)."""
        if not isinstance(camera, Cameras):
            return {}
        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            camtoworld = self.camera_optimizer.apply_to_camera(camera)
        else:
            camtoworld = camera.camera_to_worlds
        p = self._render_params()
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(p["means"]).squeeze()
            p = {k: v[keep] for k, v in p.items()}
        if len(p["means"]) == 0:
            W, H = int(camera.width.item()), int(camera.height.item())
            return self.get_empty_outputs(W, H, self.background_color)
        d = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / d)
        Ks = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(d)
        self.last_size = (H, W)
        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        viewmats = _viewmats(camtoworld).to(self.device)
        rgb, alpha, depth, self.info = self._rasterize(p, viewmats, Ks, W, H, render_mode)
        if self.training:
            self._rendered(camera, p, viewmats, Ks, W, H, alpha, depth)
        background = self._get_background_color()
        rgb = torch.clamp(rgb + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        if depth is not None:
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    def _render_params(self) -> Dict[str, torch.Tensor]:
        """The Gaussians :meth:`get_outputs` renders, under splatfacto's names."""
        return dict(self.gauss_params)

    def _rendered(self, camera: Cameras, p: Dict[str, torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor,
                  W: int, H: int, alpha: torch.Tensor, depth: Optional[torch.Tensor]) -> None:
        """Called by :meth:`get_outputs` in training after rendering ``p`` (``alpha [1, H, W, 1]``, ``depth``
        the same or None): the strategy's bookkeeping before the backward pass."""
        self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step + 1,
                                        self.info)

    def _rasterize(self, p: Dict[str, torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, W: int, H: int,
                   render_mode: str):
        """``(rgb, alpha, depth, meta)`` of :func:`splatting.rasterize.rasterize` (on a black background)."""
        if self.config.sh_degree > 0 or self.sh_colours:
            colors = torch.cat([p["features_dc"][:, None, :], p["features_rest"]], dim=1)
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors, sh_degree = torch.sigmoid(p["features_dc"]), None
        return rasterize(p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]).squeeze(-1),
                         colors, viewmats, Ks, W, H, sh_degree=sh_degree, render_mode=render_mode,
                         rasterize_mode=self.config.rasterize_mode, backend=self.config.backend)

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        return {k: v for k, v in metrics.items() if not (k.endswith("lpips") and math.isnan(v))}, images


class _ExponentialDecay(ExponentialDecayScheduler):
    """nerfstudio's exponential decay with Python-float learning rates: its numpy floats end up in the
    optimizer state of the checkpoint, which torch >= 2.6's ``torch.load`` (weights only by default)
    refuses, so ``ns-export`` / ``ns-viewer`` / ``ns-eval`` / resuming could not read our checkpoints."""

    def get_scheduler(self, optimizer, lr_init):
        scheduler = super().get_scheduler(optimizer, lr_init)
        scheduler.lr_lambdas = [lambda step, f=f: float(f(step)) for f in scheduler.lr_lambdas]
        return scheduler


@dataclass
class _ExponentialDecayConfig(ExponentialDecaySchedulerConfig):
    _target: Type = field(default_factory=lambda: _ExponentialDecay)


@dataclass
class P3DCompactModelConfig(P3DSplatModelConfig):
    """Compact 3DGS (``splatting/compact/``): volume masks, a hash-grid colour field instead of SH,
    residual VQ of scales and rotations in the last steps; the rest as ``P3DSplatModelConfig``."""

    _target: Type = field(default_factory=lambda: P3DCompactModel)
    compact: CompactOptions = field(default_factory=CompactOptions)
    """the paper's settings (for 30k steps). Its mask_lr, field_lr and vq_lr are not read here: the
    optimizers mask, compact_field and compact_codebooks set the learning rates"""
    sh_degree: int = 3
    """training uses the colour field; ns-export gaussian-splat writes SH of this degree fitted to it"""


class P3DCompactModel(P3DSplatModel):
    """Compact 3DGS under nerfstudio: the per-Gaussian ``means, scales, quats, opacities, mask`` are
    ``gauss_params`` (densified by the strategy), the colour field and codebooks a
    :class:`~splatting.compact.model.CompactModel`; the loop follows ``splatting.trainer`` (mask loss from
    ``mask_start_fraction``, R-VQ from ``vq_start_fraction`` of the run, masked Gaussians removed at
    each densification and every ``prune_every`` steps after it).

    For ``ns-export gaussian-splat`` (the standard .ply) the properties ``opacities``, ``scales``,
    ``quats`` give what is rendered (the mask folded into the opacity, R-VQ applied), and
    ``features_dc`` / ``features_rest`` SH coefficients least-squares fitted to the field's colour
    over 64 directions: a lossy, uncompressed copy. The Compact 3DGS file (.cgs) is written by our
    own trainer, not through nerfstudio.
    """

    config: P3DCompactModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        aabb = self.scene_box.aabb  # nerfstudio scales the cameras into [-1, 1]^3
        self.compact = CompactModel(self.config.compact, aabb.mean(0), float((aabb[1] - aabb[0]).max() / 2))
        self._terms: Dict[str, torch.Tensor] = {}
        self._baked = None

    def _initial_params(self, means, rgb):
        p = super()._initial_params(means, rgb)
        del p["features_dc"], p["features_rest"]
        p["mask"] = torch.full((len(means),), float(self.config.compact.mask_init))
        return p

    def get_gaussian_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        return {k: [self.gauss_params[k]] for k in ("means", "scales", "quats", "opacities", "mask")}

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        groups = super().get_param_groups()
        groups["compact_field"] = list(self.compact.field.parameters())
        groups["compact_codebooks"] = [self.compact.vq_scale.codebooks, self.compact.vq_rot.codebooks]
        return groups

    def _started(self, fraction: float) -> bool:
        return self.last_step is not None and self.step >= int(fraction * (self.last_step + 1))

    def step_cb(self, optimizers, step) -> None:
        super().step_cb(optimizers, step)
        if not self.compact.vq_active and self._started(self.config.compact.vq_start_fraction):
            self.compact.start_vq(self.gauss_params)

    def _rasterize(self, p, viewmats, Ks, W, H, render_mode):
        p = {**p, "opacities": p["opacities"].squeeze(-1)}
        rgb, alpha, depth, meta, terms = self.compact.render(p, viewmats, Ks, W, H, render_mode=render_mode,
                                                             rasterize_mode=self.config.rasterize_mode,
                                                             backend=self.config.backend)
        self._terms = terms if self.training else {}
        return rgb, alpha, depth, meta

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        losses = super().get_loss_dict(outputs, batch, metrics_dict)
        if self._terms:
            c = self.config.compact
            losses["mask_loss"] = c.mask_lambda * self._started(c.mask_start_fraction) * self._terms["mask"]
            losses["vq_loss"] = c.vq_lambda * self._terms["vq"]
        return losses

    def step_post_backward(self, step: int) -> None:
        super().step_post_backward(step)
        if step == self.last_step:
            return
        from gsplat.strategy.ops import remove

        s, it = self.strategy, step + 1
        if (s.refine_start_iter < it < s.refine_stop_iter and it % s.refine_every == 0) or \
                (it >= s.refine_stop_iter and it % self.config.compact.prune_every == 0):
            masked = self.compact.masked(self.gauss_params)
            if bool(masked.any()):
                remove(self.gauss_params, self.optimizers, self.strategy_state, masked)

    # -- what ns-export gaussian-splat reads --------------------------------------------------------
    @property
    def opacities(self) -> torch.Tensor:
        keep = ~self.compact.masked(self.gauss_params)
        o = torch.sigmoid(self.gauss_params["opacities"]) * keep[:, None]
        return torch.logit(o.clamp(1e-8, 1 - 1e-7))  # masked: below 1/255, which ns-export drops

    @property
    def scales(self) -> torch.Tensor:
        s = self.gauss_params["scales"]
        return self.compact.vq_scale(s.detach())[0] if self.compact.vq_active else s

    @property
    def quats(self) -> torch.Tensor:
        q = torch.nn.functional.normalize(self.gauss_params["quats"].detach(), dim=-1)
        return self.compact.vq_rot(q)[0] if self.compact.vq_active else q

    @property
    def features_dc(self) -> torch.Tensor:
        return self._bake_sh()[:, 0]

    @property
    def shs_0(self) -> torch.Tensor:  # splatfacto reads features_dc as a colour logit when sh_degree is 0
        return self._bake_sh()[:, 0]

    @property
    def colors(self) -> torch.Tensor:  # ns-export --ply-color-mode rgb
        return sh0_to_rgb(self._bake_sh()[:, 0])

    @property
    def features_rest(self) -> torch.Tensor:
        return self._bake_sh()[:, 1:]

    @torch.no_grad()
    def _bake_sh(self) -> torch.Tensor:
        """``[N, K, 3]`` SH coefficients fitted (least squares) to the field's colours over 64 directions."""
        means = self.gauss_params["means"].detach()
        key = (means.data_ptr(), len(means), self.step)
        if self._baked is None or self._baked[0] != key:
            i = torch.arange(64, dtype=torch.float32, device=means.device) + 0.5  # Fibonacci sphere
            z, phi = 1 - 2 * i / 64, math.pi * (1 + 5 ** 0.5) * i
            r = torch.sqrt(1 - z * z)
            dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
            m = self.compact
            feats = m.field.encode((means - m.centre) / m.radius)
            cols = torch.stack([m.field(feats, d.expand(len(means), 3)) for d in dirs], 1)  # [N, 64, 3]
            basis = sh_basis(self.config.sh_degree, dirs)  # [64, K]; rendered colour = SH + 0.5
            self._baked = (key, torch.linalg.pinv(basis) @ (cols - 0.5))
        return self._baked[1]


@dataclass
class P3DCoherentModelConfig(P3DSplatModelConfig):
    """CoherentGS (``splatting/coherent/``) on the dataparser's training images (2-4 views of one size);
    the defaults of ``configs/splatting/coherentgs_*.yaml``; the other fields as ``P3DSplatModelConfig``
    (its densification fields are not read: CoherentGS keeps its Gaussians)."""

    _target: Type = field(default_factory=lambda: P3DCoherentModel)
    coherent: CoherentOptions = field(default_factory=CoherentOptions)
    """the method's options. Its decoder_lr is not read here, nor align_lr in stage 2: the optimizers
    decoders and alignment set them (align_lr is stage 1's rate)"""
    init_opacity: float = 0.5
    """every Gaussian's initial opacity (splatting config: model.init_opacity)"""
    init_scale: float = 1.0
    """multiplier on the Gaussians' initial size, their pixel block's footprint (model.init_scale)"""
    sh_degree: int = 1
    sh_degree_interval: int = 500
    output_depth_during_training: bool = True
    """must stay True: the disparity TV loss needs the rendered depth"""


# the optimizers' parameter groups (splatting.coherent.train.param_groups under splatfacto's colour names)
_COHERENT_GROUPS = {"decoders": "decoders", "alignment": "alignment", "sh0": "features_dc", "shN": "features_rest",
                    "scales": "scales", "quats": "quats"}


class P3DCoherentModel(P3DSplatModel):
    """CoherentGS under nerfstudio: the training views are the dataparser's training images (give a
    scene of a few views, or let its eval mode hold the others out); 2-4 are expected, all of one size.

    * **Set-up** when training starts (a callback before iteration 0; the images are unknown in
      ``populate_modules``): the datamanager's training images and cameras (OpenGL -> OpenCV as
      ``_viewmats``; RGBA images composited over the background colour) go through
      :func:`splatting.coherent.train.build_model` (flow, plane-sweep depth, the
      :class:`~splatting.coherent.model.CoherentModel` as ``self.coherent``) and stage 1,
      :func:`~splatting.coherent.train.align_depths` (its flow errors are logged as
      ``coherent/flow_px_before_alignment`` / ``_after_alignment``).
    * **Optimizers.** nerfstudio builds them from :meth:`get_param_groups` before training, when the
      parameters do not exist yet: the groups then hold a zero-size placeholder, and the set-up replaces
      those optimizers (and their schedulers) in the trainer's ``Optimizers`` by new ones over the
      model's parameters, from the same configs.
    * **Stage 2** is nerfstudio's loop: splatfacto's photometric loss plus ``disparity_tv_loss`` and
      ``flow_loss`` (:func:`splatting.coherent.train.coherence_losses`, weighted by ``tv_lambda`` and
      ``flow_lambda``); no densification, no opacity reset.
    * **gauss_params** hold the baked Gaussians (``features_dc`` is SH at every degree), refreshed after
      every step: evaluation, the viewer and ``ns-export gaussian-splat`` read them. A checkpoint holds
      them and ``self.coherent``'s state; loading it rebuilds ``self.coherent`` with the shapes of its
      buffers (views, their Gaussian grids) without the datamanager. Resuming training from it is not
      supported (the optimizers would be built before the model's parameters exist).
    """

    config: P3DCoherentModelConfig
    sh_colours = True

    def populate_modules(self) -> None:
        if not self.config.output_depth_during_training:
            raise ValueError("pipeline.model.output_depth_during_training=False: p3d-coherentgs needs the rendered "
                             "depth in training (disparity TV loss); keep it True")
        super().populate_modules()
        self.coherent: Optional[CoherentModel] = None
        self._placeholder = (torch.nn.Parameter(torch.zeros(0)),)  # a tuple: not a registered parameter
        self._views: tuple = ()  # training viewmats [V, 4, 4], Ks [V, 3, 3] and the flow targets
        self._terms: Dict[str, torch.Tensor] = {}

    def _initial_params(self, means, rgb):
        n_rest = num_sh_bases(self.config.sh_degree) - 1
        return {"means": torch.zeros(0, 3), "scales": torch.zeros(0, 3), "quats": torch.zeros(0, 4),
                "features_dc": torch.zeros(0, 3), "features_rest": torch.zeros(0, n_rest, 3),
                "opacities": torch.zeros(0, 1)}

    def get_gaussian_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        if self.coherent is None:  # nerfstudio builds the optimizers before training starts
            return {name: list(self._placeholder) for name in _COHERENT_GROUPS.values()}
        return {_COHERENT_GROUPS[k]: v for k, v in param_groups(self.coherent).items()}

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes):
        callbacks = super().get_training_callbacks(training_callback_attributes)
        attrs = training_callback_attributes
        if attrs.pipeline is None or attrs.optimizers is None:
            raise ValueError("p3d-coherentgs: training needs the pipeline's datamanager and the optimizers")
        set_up = TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self._set_up,
                                  args=[attrs.pipeline.datamanager, attrs.optimizers])
        return callbacks[:1] + [set_up] + callbacks[1:]  # after step_cb

    def _set_up(self, datamanager, optimizers: Optimizers, step: int) -> None:
        """Build ``self.coherent`` from the training views, run stage 1, hand its parameters to the optimizers."""
        from nerfstudio.utils import writer
        from nerfstudio.utils.rich_utils import CONSOLE

        if self.coherent is not None:
            return
        t0 = time.perf_counter()
        cached = datamanager.cached_train  # loads (and undistorts) the images, updating the cameras' intrinsics
        dataset = datamanager.train_dataset
        images = [self._input_rgb(d["image"]) for d in cached]
        sizes = sorted({tuple(im.shape[:2]) for im in images})
        if len(images) < 2 or len(sizes) != 1:
            raise ValueError(f"p3d-coherentgs needs at least 2 training views of one size (it matches them to each "
                             f"other); the dataparser gives {len(images)} of sizes (H, W) {sizes}")
        cameras = dataset.cameras
        viewmats, Ks = _viewmats(cameras.camera_to_worlds.float()), cameras.get_intrinsics_matrices().float()
        cfg, device = self.config, self.device
        model, flow_targets, init = build_model(images, viewmats, Ks, [Path(f).name for f in dataset.image_filenames],
                                                cfg.coherent, cfg.sh_degree, cfg.init_opacity, cfg.init_scale, device)
        viewmats, Ks = viewmats.to(device), Ks.to(device)
        before, after = align_depths(model, viewmats, Ks, flow_targets, cfg.coherent.align_steps, cfg.coherent.align_lr)
        self.coherent, self._views = model, (viewmats, Ks, flow_targets)
        self._bake()
        fresh = Optimizers(optimizers.config, self.get_gaussian_param_groups())
        for attr in ("optimizers", "parameters", "schedulers"):
            getattr(optimizers, attr).update(getattr(fresh, attr))
        writer.put_scalar(name="coherent/flow_px_before_alignment", scalar=before, step=step)
        writer.put_scalar(name="coherent/flow_px_after_alignment", scalar=after, step=step)
        H, W = sizes[0]
        CONSOLE.print(f"[coherent] {len(images)} training views of {W}x{H} px, {len(model.view_of_gaussian())} "
                      f"Gaussians; {init.source} depth ({100 * init.kept.mean():.0f}% of the plane-sweep depths "
                      f"kept); stage 1 ({cfg.coherent.align_steps} steps): median flow error {before:.2f} -> "
                      f"{after:.2f} px; set-up {time.perf_counter() - t0:.1f} s", markup=False)

    def _input_rgb(self, image: torch.Tensor) -> torch.Tensor:
        """A cached training image -> ``float32 [H, W, 3]`` in [0, 1] on the CPU."""
        image = image.cpu()
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if image.shape[-1] == 4:
            image = image[..., :3] * image[..., 3:] + (1 - image[..., 3:]) * self.background_color.cpu()
        return image.contiguous()

    @staticmethod
    def _splatfacto_params(g: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """:meth:`CoherentModel.gaussians` under splatfacto's names and shapes."""
        return {"means": g["means"], "scales": g["scales"], "quats": g["quats"], "features_dc": g["sh0"][:, 0],
                "features_rest": g["shN"], "opacities": g["opacities"][:, None]}

    @torch.no_grad()
    def _bake(self) -> None:
        for k, v in self._splatfacto_params(self.coherent.gaussians()).items():
            self.gauss_params[k] = torch.nn.Parameter(v.detach().contiguous(), requires_grad=False)

    def _render_params(self) -> Dict[str, torch.Tensor]:
        self._terms = {}
        if self.training and self.coherent is not None:
            return self._splatfacto_params(self.coherent.gaussians())
        return dict(self.gauss_params)

    def _rendered(self, camera, p, viewmats, Ks, W, H, alpha, depth) -> None:
        if self.coherent is None:
            return
        if not camera.metadata or "cam_idx" not in camera.metadata:
            raise ValueError("p3d-coherentgs: the training camera has no metadata['cam_idx'] (its input view); use "
                             "a FullImageDatamanager")

        def render_virtual(viewmat: torch.Tensor) -> tuple:
            _, a, d, _ = self._rasterize(p, viewmat[None], Ks, W, H, "RGB+ED")
            return d[0, ..., 0], a[0, ..., 0]

        viewmats_in, Ks_in, flow_targets = self._views
        tv, flow = coherence_losses(self.coherent, p, int(camera.metadata["cam_idx"]), depth[0, ..., 0],
                                    alpha[0, ..., 0], viewmats_in, Ks_in, flow_targets, render_virtual)
        self._terms = {"tv": tv, "flow": flow}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        losses = super().get_loss_dict(outputs, batch, metrics_dict)
        if self._terms:
            c = self.config.coherent
            losses["disparity_tv_loss"] = c.tv_lambda * self._terms["tv"]
            losses["flow_loss"] = c.flow_lambda * self._terms["flow"]
        return losses

    def step_post_backward(self, step: int) -> None:
        assert step == self.step
        self._bake()  # no densification, no opacity reset

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore  # splatfacto's signature
        state = {k[len("coherent."):]: v for k, v in state_dict.items() if k.startswith("coherent.")}
        if state and self.coherent is None:
            if self.training:
                raise NotImplementedError(
                    "p3d-coherentgs cannot resume training from a checkpoint: nerfstudio builds the optimizers "
                    "before the checkpoint's CoherentGS parameters exist. Train from the start; ns-eval, "
                    "ns-export and ns-viewer read the checkpoint")
            self.coherent = self._empty_coherent(state).to(self.device)
        return super().load_state_dict(state_dict, **kwargs)

    def _empty_coherent(self, state: Dict[str, torch.Tensor]) -> CoherentModel:
        """A CoherentModel of a checkpoint's shapes (views, their ``h x w`` Gaussian grids from the
        ``code<v>`` buffers) for ``load_state_dict`` to fill: every buffer and parameter is in the state."""
        cfg, s = self.config, self.config.coherent.stride
        grids = [tuple(state[f"code{v}"].shape[-2:]) for v in range(len(state["log_a"]))]
        return CoherentModel([torch.zeros(h * s, w * s, 3) for h, w in grids], [torch.eye(4)] * len(grids),
                             [torch.eye(3)] * len(grids), [np.ones((h * s, w * s), np.float32) for h, w in grids],
                             cfg.coherent, cfg.sh_degree, cfg.init_opacity, cfg.init_scale)

    # -- what ns-export gaussian-splat reads (features_dc is SH at every sh_degree) -------------------
    @property
    def shs_0(self) -> torch.Tensor:
        return self.features_dc

    @property
    def colors(self) -> torch.Tensor:  # ns-export --ply-color-mode rgb
        return sh0_to_rgb(self.features_dc)


def _adam(lr: float, scheduler=None) -> dict:
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def _splat_optimizers(**colour) -> dict:
    """The 3DGS paper's learning rates of the Gaussians' geometry; ``colour``: the other groups."""
    return {"means": _adam(1.6e-4, _ExponentialDecayConfig(lr_final=1.6e-6, max_steps=30000)), "opacities": _adam(0.05),
            "scales": _adam(0.005), "quats": _adam(0.001), **colour}


def _trainer_config(method_name: str, model: SplatfactoModelConfig, optimizers: dict, max_num_iterations: int = 30000,
                    load_3d_points: bool = True) -> TrainerConfig:
    """splatfacto's trainer settings with the model's ``optimizers``, on the CPU when there is no CUDA."""
    warm = dict(max_steps=30000, warmup_steps=1000, lr_pre_warmup=0)
    return TrainerConfig(
        method_name=method_name,
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=max_num_iterations,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=NerfstudioDataParserConfig(load_3D_points=load_3d_points),
                                                   cache_images_type="uint8"),
            model=model,
        ),
        optimizers={
            **optimizers,
            "camera_opt": _adam(1e-4, _ExponentialDecayConfig(lr_final=5e-7, **warm)),
            "bilateral_grid": _adam(2e-3, _ExponentialDecayConfig(lr_final=1e-4, **warm)),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


p3d_3dgs = MethodSpecification(
    config=_trainer_config("p3d-3dgs", P3DSplatModelConfig(),
                           _splat_optimizers(features_dc=_adam(0.0025), features_rest=_adam(0.0025 / 20))),
    description="perception3d 3DGS: splatfacto on our rasterizer (C++ on CPU, gsplat on CUDA), the paper's "
                "densification",
)

_compact = CompactOptions()
p3d_compact3dgs = MethodSpecification(
    config=_trainer_config("p3d-compact3dgs", P3DCompactModelConfig(compact=_compact),
                           _splat_optimizers(mask=_adam(_compact.mask_lr), compact_field=_adam(_compact.field_lr),
                                             compact_codebooks=_adam(_compact.vq_lr))),
    description="perception3d Compact 3DGS (masks, hash-grid colour, R-VQ) on our rasterizer",
)

_coherent, _optim = CoherentOptions(), SplatOptimConfig()
p3d_coherentgs = MethodSpecification(
    config=_trainer_config(
        "p3d-coherentgs", P3DCoherentModelConfig(coherent=_coherent),
        {"decoders": _adam(_coherent.decoder_lr), "alignment": _adam(0.1 * _coherent.align_lr),
         "features_dc": _adam(_optim.sh0_lr), "features_rest": _adam(_optim.shN_lr), "scales": _adam(_optim.scales_lr),
         "quats": _adam(_optim.quats_lr)},
        max_num_iterations=3000, load_3d_points=False),
    description="perception3d CoherentGS: sparse-view 3DGS from 2-4 views (one Gaussian per pixel block, depth from "
                "plane-sweep stereo, per-view decoders, flow and disparity-TV losses) on our rasterizer",
)
