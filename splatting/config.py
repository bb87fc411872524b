"""The splatting experiment's config: ``task: splatting`` YAML files under ``configs/splatting/``.

Every field is documented here; defaults follow the 3DGS paper and gsplat's ``simple_trainer``
(learning rates, densification schedule), scaled down where a CPU run needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from perception3d.errors import ConfigError
from splatting.coherent.model import CoherentOptions
from splatting.compact.model import CompactOptions

__all__ = ["SyntheticViewsConfig", "SplatDataConfig", "SplatModelConfig", "SplatOptimConfig", "StrategyConfig",
           "SplatTrainConfig", "SplatEvalConfig", "SplatConfig"]


def _require(ok: bool, key: str, value, expected: str) -> None:
    """ConfigError ``key=value: expected ...`` unless ``ok`` (checked in ``__post_init__``, before any work)."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _int_at_least(obj, prefix: str, names: str, low: int) -> None:
    for name in names.split():
        v = getattr(obj, name)
        _require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{prefix}.{name}", v,
                 f"a whole number >= {low}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonneg(obj, prefix: str, names: str) -> None:
    for name in names.split():
        v = getattr(obj, name)
        _require(_finite(v) and v >= 0, f"{prefix}.{name}", v, "a finite number >= 0")


def _positive(obj, prefix: str, names: str) -> None:
    for name in names.split():
        v = getattr(obj, name)
        _require(_finite(v) and v > 0, f"{prefix}.{name}", v, "a finite number > 0")


@dataclass(frozen=True)
class SyntheticViewsConfig:
    """Generate the synthetic multi-view scene (:func:`splatting.data.write_synthetic_scene`) at ``data.root``.

    Attributes:
        seed: scene and camera seed.
        num_views: cameras on the orbit (every ``test_every``-th is held out).
        width, height: image size, pixels.
        num_points: surface points written as the SfM-like initial point cloud.
        arc_deg: the cameras span this much of the ring (360: all around; 90: a frontal arc, for
            sparse-view training).
    """

    seed: int = 0
    num_views: int = 40
    width: int = 200
    height: int = 150
    num_points: int = 4000
    arc_deg: float = 360.0

    def __post_init__(self) -> None:
        _int_at_least(self, "data.synthetic", "seed", 0)
        _int_at_least(self, "data.synthetic", "num_views width height num_points", 1)
        _require(_finite(self.arc_deg) and 0.0 < self.arc_deg <= 360.0, "data.synthetic.arc_deg", self.arc_deg,
                 "an angle in (0, 360]")


@dataclass(frozen=True)
class SplatDataConfig:
    """Where the images and cameras come from.

    Attributes:
        root: a COLMAP folder (``sparse/0`` + ``images/``), a transforms.json (or its folder:
            Blender / instant-ngp / nerfstudio), or an LLFF folder (``poses_bounds.npy``).
        synthetic: if set and ``root`` does not exist, the synthetic scene is generated there.
        images: the image folder under ``root`` of a COLMAP or LLFF scene, e.g. ``images_8`` (LLFF
            scenes are published with ``images_4/`` and ``images_8/``, 4x and 8x smaller, beside
            ``images/``); null: ``images/``, or an LLFF scene's only ``images*`` folder.
        downscale: integer image downscale factor (intrinsics follow).
        test_every: every n-th view (sorted by name) is held out for evaluation (0: none).
        train_views: sparse-view training: keep only this many of the training views, at positions
            ``round(linspace(0, n - 1, K))`` of the n in name order (RegNeRF's LLFF rule; see
            ``SplatDataset``); the held-out views stay the same. ``p3d train --views K`` sets it.
            null: train on every view not held out.
        background: RGB the renders are composited on, and RGBA images are flattened on.
    """

    root: str = "data_cache/synthetic_views"
    synthetic: Optional[SyntheticViewsConfig] = field(default_factory=SyntheticViewsConfig)
    images: Optional[str] = None
    downscale: int = 1
    test_every: int = 8
    train_views: Optional[int] = None
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        _require(isinstance(self.root, str) and self.root.strip() != "", "data.root", self.root,
                 "a dataset path (a COLMAP / LLFF folder or a transforms .json)")
        if self.images is not None:
            _require(isinstance(self.images, str) and self.images.strip() != "" and not Path(self.images).is_absolute()
                     and ".." not in Path(self.images).parts, "data.images", self.images,
                     "a folder name under data.root (e.g. images_8) or null")
        _int_at_least(self, "data", "downscale", 1)
        _int_at_least(self, "data", "test_every", 0)
        if self.train_views is not None:
            _int_at_least(self, "data", "train_views", 1)
        bg = self.background
        _require(len(bg) == 3 and all(_finite(c) and 0.0 <= c <= 1.0 for c in bg), "data.background", bg,
                 "3 numbers (RGB) in [0, 1]")
        s = self.synthetic
        if s is not None and self.test_every > 0:
            held_out = -(-s.num_views // self.test_every)  # views 0, test_every, 2 test_every, ...
            _require(s.num_views - held_out >= 1, "data.synthetic.num_views", s.num_views,
                     f"more than {held_out} views: with data.test_every={self.test_every}, {held_out} of them are "
                     "held out and none would be left to train on")


@dataclass(frozen=True)
class SplatModelConfig:
    """Initial Gaussians and rendering options.

    Attributes:
        init: ``"sfm"``: one Gaussian per point of the scene's point cloud (random if it has none);
            ``"random"``: ``init_num_points`` uniform in a cube of ``init_extent`` x the scene scale;
            ``"triangulate"``: for posed captures without SfM points (instant-ngp / nerfstudio
            transforms.json), SIFT matches between neighbouring training views triangulated with the
            known cameras (``splatting/data/triangulate.py``; about 1.2 s per 270x480 view on 2 cores).
        init_num_points, init_extent: random initialisation.
        init_opacity, init_scale: initial opacity; multiplier on the nearest-neighbour scale.
        sh_degree: highest SH degree learnt (0-3).
        sh_degree_interval: the SH degree in use grows by one every this many steps.
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (Mip-Splatting's opacity compensation).
        near_plane, far_plane: depth range rendered.
    """

    init: Literal["sfm", "random", "triangulate"] = "sfm"
    init_num_points: int = 100_000
    init_extent: float = 3.0
    init_opacity: float = 0.1
    init_scale: float = 1.0
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    rasterize_mode: Literal["classic", "antialiased"] = "classic"
    near_plane: float = 0.01
    far_plane: float = 1e10

    def __post_init__(self) -> None:
        _int_at_least(self, "model", "init_num_points sh_degree_interval", 1)
        _require(self.sh_degree in (0, 1, 2, 3) and not isinstance(self.sh_degree, bool), "model.sh_degree",
                 self.sh_degree, "0, 1, 2 or 3 (the SH degrees the rasterizer evaluates)")
        _positive(self, "model", "init_extent init_scale near_plane")
        _require(_finite(self.init_opacity) and 0.0 < self.init_opacity < 1.0, "model.init_opacity",
                 self.init_opacity, "an opacity strictly between 0 and 1 (it is stored as a logit)")
        _require(isinstance(self.far_plane, (int, float)) and self.far_plane > self.near_plane, "model.far_plane",
                 self.far_plane, f"a depth > model.near_plane = {self.near_plane}")


@dataclass(frozen=True)
class SplatOptimConfig:
    """Adam learning rates per parameter group (3DGS / gsplat defaults).

    Attributes:
        means_lr: position learning rate, times the scene scale; decays exponentially to
            ``means_lr * means_lr_final_ratio`` over the run.
        scales_lr, quats_lr, opacities_lr, sh0_lr, shN_lr: the other groups (constant).
        ssim_lambda: loss = ``(1 - ssim_lambda) * L1 + ssim_lambda * (1 - SSIM)``.
    """

    means_lr: float = 1.6e-4
    means_lr_final_ratio: float = 0.01
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    ssim_lambda: float = 0.2

    def __post_init__(self) -> None:
        _nonneg(self, "optim", "means_lr scales_lr quats_lr opacities_lr sh0_lr shN_lr")
        _positive(self, "optim", "means_lr_final_ratio")
        _require(_finite(self.ssim_lambda) and 0.0 <= self.ssim_lambda <= 1.0, "optim.ssim_lambda",
                 self.ssim_lambda, "a weight in [0, 1]")


@dataclass(frozen=True)
class StrategyConfig:
    """Densification and pruning: gsplat's ``DefaultStrategy`` (the 3DGS paper's rules), its options.

    Attributes:
        prune_opa: prune Gaussians whose opacity falls below this.
        grow_grad2d: clone / split Gaussians whose mean image-plane gradient exceeds this.
        grow_scale3d: clone if the largest scale is below this x scene scale, else split.
        prune_scale3d: prune Gaussians larger than this x scene scale (after the first reset).
        refine_start_iter, refine_stop_iter, refine_every: when densification runs (never at the
            run's last step, where nothing would train after it).
        reset_every: opacities are reset to ``2 * prune_opa`` every this many steps before
            ``refine_stop_iter`` (never at the last step); an eval that falls on a reset is skipped.
        absgrad: use absolute gradients (AbsGS); then ``grow_grad2d`` should be ~0.0008.
        revised_opacity: Rota Bulo et al.'s opacity correction when splitting.
    """

    prune_opa: float = 0.005
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3000
    absgrad: bool = False
    revised_opacity: bool = False

    def __post_init__(self) -> None:
        _require(_finite(self.prune_opa) and 0.0 <= self.prune_opa < 0.5, "strategy.prune_opa", self.prune_opa,
                 "an opacity in [0, 0.5) (opacity resets set 2 x prune_opa)")
        _nonneg(self, "strategy", "grow_grad2d")
        _positive(self, "strategy", "grow_scale3d prune_scale3d")
        _int_at_least(self, "strategy", "refine_start_iter refine_stop_iter", 0)
        _int_at_least(self, "strategy", "refine_every reset_every", 1)


@dataclass(frozen=True)
class SplatTrainConfig:
    """The training run.

    Attributes:
        seed: initialisation, view order, densification noise.
        max_steps: optimisation steps (one training view each).
        log_every: scalars to the progress bar, TensorBoard and ``log.jsonl``.
        eval_every: held-out evaluation (0: only at the end).
        ckpt_every: checkpoints (0: only at the end); ``--resume`` continues exactly.
        keep_last_ckpts: step checkpoints kept.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        progress: show a progress bar.
    """

    seed: int = 0
    max_steps: int = 30_000
    log_every: int = 50
    eval_every: int = 0
    ckpt_every: int = 0
    keep_last_ckpts: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _int_at_least(self, "train", "seed", 0)
        _int_at_least(self, "train", "max_steps log_every keep_last_ckpts", 1)
        _int_at_least(self, "train", "eval_every ckpt_every", 0)


@dataclass(frozen=True)
class SplatEvalConfig:
    """Evaluation.

    Attributes:
        num_renders: held-out views saved as PNG at each evaluation (render beside ground truth; its
            expected depth and its error as `*_depth.png`, `*_error.png`; all in the report).
        lpips_weights: a local LPIPS (AlexNet) weights file; None: ``$P3D_LPIPS_WEIGHTS`` or
            ``~/.cache/perception3d/lpips_alex.pth`` if present, else LPIPS is skipped.
    """

    num_renders: int = 4
    lpips_weights: Optional[str] = None

    def __post_init__(self) -> None:
        _int_at_least(self, "eval", "num_renders", 0)


@dataclass(frozen=True)
class SplatConfig:
    """A Gaussian-splatting experiment."""

    task: str = "splatting"
    data: SplatDataConfig = field(default_factory=SplatDataConfig)
    model: SplatModelConfig = field(default_factory=SplatModelConfig)
    optim: SplatOptimConfig = field(default_factory=SplatOptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: SplatTrainConfig = field(default_factory=SplatTrainConfig)
    eval: SplatEvalConfig = field(default_factory=SplatEvalConfig)
    # Compact 3DGS (masks, hash-grid colour, R-VQ; splatting/compact/) instead of SH colour when set
    compact: Optional[CompactOptions] = None
    # CoherentGS (pixel-aligned Gaussians from 2-4 views; splatting/coherent/) when set
    coherent: Optional[CoherentOptions] = None

    def __post_init__(self) -> None:
        if self.compact is not None and self.coherent is not None:
            raise ConfigError("compact and coherent: a config sets one of them (Compact 3DGS or CoherentGS), "
                              "not both")
