"""The nerfstudio plugin: ``ns-train p3d-3dgs --data <folder>`` trains 3DGS on any nerfstudio
dataparser's data, on a CPU too.

nerfstudio finds the methods through the ``nerfstudio.method_configs`` entry points of setup.py
(``p3d_3dgs``, ``p3d_compact3dgs`` below). This module imports nerfstudio, so nothing else in the
package imports it; it runs in nerfstudio's own environment (scripts/install.sh, the nerfstudio
option: nerfstudio 1.1.5 needs numpy<2 and torchvision).

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Type, Union

import torch
from gsplat.strategy import DefaultStrategy
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.model_components.lib_bilagrid import BilateralGrid
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification
from nerfstudio.utils.colors import get_color

from splatting.compact.model import CompactModel, CompactOptions
from splatting.gaussians import knn_scales
from splatting.rasterize import rasterize
from splatting.sh import num_sh_bases, rgb_to_sh0, sh0_to_rgb, sh_basis

__all__ = ["P3DSplatModelConfig", "P3DSplatModel", "P3DCompactModelConfig", "P3DCompactModel", "p3d_3dgs",
           "p3d_compact3dgs"]


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
        p: Dict[str, torch.Tensor] = dict(self.gauss_params)
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(self.means).squeeze()
            if keep.sum() == 0:
                W, H = int(camera.width.item()), int(camera.height.item())
                return self.get_empty_outputs(W, H, self.background_color)
            p = {k: v[keep] for k, v in p.items()}
        d = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / d)
        Ks = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(d)
        self.last_size = (H, W)
        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        rgb, alpha, depth, self.info = self._rasterize(p, _viewmats(camtoworld).to(self.device), Ks, W, H, render_mode)
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step + 1,
                                            self.info)
        background = self._get_background_color()
        rgb = torch.clamp(rgb + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        if depth is not None:
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    def _rasterize(self, p: Dict[str, torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, W: int, H: int,
                   render_mode: str):
        """``(rgb, alpha, depth, meta)`` of :func:`splatting.rasterize.rasterize` (on a black background)."""
        if self.config.sh_degree > 0:
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


def _adam(lr: float, scheduler=None) -> dict:
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def _trainer_config(method_name: str, model: SplatfactoModelConfig, gaussian_optimizers: dict) -> TrainerConfig:
    """splatfacto's trainer settings (learning rates = the 3DGS paper's), on the CPU when there is no CUDA."""
    warm = dict(max_steps=30000, warmup_steps=1000, lr_pre_warmup=0)
    return TrainerConfig(
        method_name=method_name,
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=30000,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=NerfstudioDataParserConfig(load_3D_points=True),
                                                   cache_images_type="uint8"),
            model=model,
        ),
        optimizers={
            "means": _adam(1.6e-4, _ExponentialDecayConfig(lr_final=1.6e-6, max_steps=30000)),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            **gaussian_optimizers,
            "camera_opt": _adam(1e-4, _ExponentialDecayConfig(lr_final=5e-7, **warm)),
            "bilateral_grid": _adam(2e-3, _ExponentialDecayConfig(lr_final=1e-4, **warm)),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


p3d_3dgs = MethodSpecification(
    config=_trainer_config("p3d-3dgs", P3DSplatModelConfig(),
                           {"features_dc": _adam(0.0025), "features_rest": _adam(0.0025 / 20)}),
    description="perception3d 3DGS: splatfacto on our rasterizer (C++ on CPU, gsplat on CUDA), the paper's "
                "densification",
)

_compact = CompactOptions()
p3d_compact3dgs = MethodSpecification(
    config=_trainer_config("p3d-compact3dgs", P3DCompactModelConfig(compact=_compact),
                           {"mask": _adam(_compact.mask_lr), "compact_field": _adam(_compact.field_lr),
                            "compact_codebooks": _adam(_compact.vq_lr)}),
    description="perception3d Compact 3DGS (masks, hash-grid colour, R-VQ) on our rasterizer",
)
