"""3DGS training and evaluation: ``train(cfg, out_dir, resume)`` and ``evaluate(cfg, ckpt, out_dir)``.

The loop (one training view per step, as in 3DGS and gsplat's ``simple_trainer``):

``view -> render_raw (SH degree grows every sh_degree_interval steps) -> (1 - l) L1 + l D-SSIM ->
backward -> one Adam per parameter group (positions on an exponential decay) -> gsplat's
DefaultStrategy (clone / split / prune / opacity reset, from meta["means2d"] gradients)``

It shares the engine's run plumbing (progress bar + TensorBoard + ``log.jsonl``, atomic
checkpoints with ``latest.pt``, RNG state capture) but not ``engine.fit``: densification replaces
the parameter tensors and their optimizer states every few hundred steps, which ``fit``'s single
fixed optimizer does not model. A checkpoint holds the (variable-size) parameters, every
optimizer's state, the schedule, the densification state and the RNG states, so ``--resume``
reproduces the uninterrupted run.

Outputs in the run folder: ``ckpt/``, ``tb/``, ``log.jsonl``, ``renders/step_XXXXXXXX/*.png``
(render | ground truth), ``point_cloud.ply`` (standard 3DGS .ply) and ``metrics.json``.

With a ``compact`` config section the same loop trains Compact 3DGS (``splatting/compact/``):
the per-Gaussian groups are ``means, scales, quats, opacities, mask`` (no SH; densification
handles the mask like any other attribute), a second Adam trains the colour field and the R-VQ
codebooks, the loss adds ``mask_lambda * mean(sigmoid(mask))`` and (in the R-VQ phase)
``vq_lambda * VQ loss``, masked Gaussians are removed at every densification step and every
``prune_every`` steps after it, and the run writes ``compact.cgs`` (post-processed) and
``compact_plain.cgs`` instead of the .ply.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from perception3d.config import config_to_dict
from perception3d.engine.checkpoint import FORMAT_VERSION, CheckpointManager
from perception3d.engine.checkpoint import read_checkpoint as _read_checkpoint_file
from perception3d.engine.data import derive_seed, get_rng_state, seed_everything, set_rng_state
from perception3d.engine.logger import RunLogger
from perception3d.errors import ConfigError, DataError
from perception3d.io.atomic import atomic_path, atomic_write_text
from splatting.compact.model import CompactGaussians, CompactModel
from splatting.config import SplatConfig, SplatDataConfig
from splatting.data import SplatDataset, load_scene
from splatting.report import write_report
from splatting.data.triangulate import triangulate_views
from splatting.gaussians import Gaussians, render_raw
from splatting.metrics import LPIPS, default_lpips, psnr, ssim, ssim_loss

__all__ = ["prepare_scene", "TrainState", "build", "train_step", "train", "evaluate", "evaluate_views"]

_GROUPS = ("means", "scales", "quats", "opacities", "sh0", "shN")
_COMPACT_GROUPS = ("means", "scales", "quats", "opacities", "mask")
# Logged as sums over the log window: the net change of the Gaussian count by the strategy
# (clone / split minus its opacity and size pruning) and the Gaussians removed by the volume mask.
_COUNTS = ("gaussians_refined", "gaussians_masked")


def _groups(cfg: SplatConfig) -> tuple[str, ...]:
    return _COMPACT_GROUPS if cfg.compact else _GROUPS


# generator settings recorded in synthetic.json -> the config field that sets them
_SYNTHETIC_FIELDS = {"seed": "data.synthetic.seed", "num_views": "data.synthetic.num_views",
                     "width": "data.synthetic.width", "height": "data.synthetic.height",
                     "num_points": "data.synthetic.num_points", "background_rgb": "data.background",
                     "arc_deg": "data.synthetic.arc_deg"}


def _synthetic_difference(record: dict, options: dict) -> list[str]:
    """``field: recorded vs configured`` for every configured generator setting that differs."""
    full_ring = {"arc_deg": 360.0}  # recorded only when the cameras span less than the ring
    return [f"{field} = {record.get(k, full_ring.get(k))!r} in the scene, {options.get(k, full_ring.get(k))!r} "
            "configured" for k, field in _SYNTHETIC_FIELDS.items()
            if record.get(k, full_ring.get(k)) != options.get(k, full_ring.get(k))]


def prepare_scene(cfg: SplatDataConfig) -> Path:
    """The scene path, generating the synthetic scene first when it is configured and missing.

    With ``data.synthetic`` set, a ``data.root`` that already holds a generated scene must have been
    generated with the same settings (its ``synthetic.json``): a scene of other settings is a
    ConfigError naming them, not a silent reuse. Generation writes into a temporary folder of its
    own, renamed into place when complete (`splatting.data.write_synthetic_scene`).

    Raises:
        ConfigError: ``data.root`` holds a synthetic scene of other settings, or the scene cannot be
            generated there (a parent is a file, the folder is not writable).
        DataError: ``data.root`` does not exist and ``data.synthetic`` is not set.
    """
    from splatting.data.synthetic import read_synthetic_record, synthetic_options, write_synthetic_scene

    root = Path(cfg.root)
    s = cfg.synthetic
    options = None
    if s is not None:
        try:
            options = synthetic_options(seed=s.seed, num_views=s.num_views, width=s.width, height=s.height,
                                        num_points=s.num_points, background_rgb=cfg.background, arc_deg=s.arc_deg)
        except DataError as e:
            raise ConfigError(f"data.synthetic: {e}") from None

    def check_record() -> Path:
        record = read_synthetic_record(root) if options is not None and root.is_dir() else None
        if record is not None and _synthetic_difference(record, options):
            raise ConfigError(f"data.root={root}: holds a synthetic scene generated with other settings than "
                              f"data.synthetic ({'; '.join(_synthetic_difference(record, options))}); delete the "
                              "folder to generate it again, point data.root elsewhere, or set data.synthetic to "
                              "the scene's settings (null: use the scene as it is)")
        return root

    if root.exists():
        return check_record()
    if s is None:
        raise DataError(f"data.root={root}: not found (a COLMAP folder, transforms.json or LLFF folder), "
                        "and data.synthetic is not set, so none is generated")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"data.root={root}: cannot generate the synthetic scene there: {parent} is a file, "
                                  "not a folder")
            break
    print(f"[data] generating the synthetic scene ({s.num_views} views, {s.width}x{s.height}) into {root}")
    try:
        return write_synthetic_scene(root, seed=s.seed, num_views=s.num_views, width=s.width, height=s.height,
                                     num_points=s.num_points, background_rgb=cfg.background, exist_ok=True,
                                     arc_deg=s.arc_deg)
    except FileExistsError:  # another process generated a scene there meanwhile
        return check_record()
    except OSError as e:
        raise ConfigError(f"data.root={root}: cannot generate the synthetic scene there "
                          f"({e.strerror or e}: {e.filename or root})") from None


def _device(cfg: SplatConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def _datasets(cfg: SplatConfig) -> tuple[SplatDataset, SplatDataset]:
    scene = load_scene(prepare_scene(cfg.data), images=cfg.data.images)
    kw = dict(downscale=cfg.data.downscale, test_every=cfg.data.test_every, background_rgb=cfg.data.background)
    train_set = SplatDataset(scene, "train", train_views=cfg.data.train_views, **kw)
    test_set = SplatDataset(scene, "test", **kw)
    if len(train_set) == 0:
        raise DataError(f"{cfg.data.root}: no training views (data.test_every={cfg.data.test_every} holds out "
                        f"{len(test_set)} of {len(scene.frames)} views)")
    return train_set, test_set


def _no_test_views(cfg: SplatConfig) -> str:
    return (f"no held-out views (data.test_every={cfg.data.test_every}"
            + (": 0 holds none out" if cfg.data.test_every == 0 else "") + ")")


def _initial_gaussians(cfg: SplatConfig, train_set: SplatDataset, scene_scale: float) -> Gaussians:
    m = cfg.model
    pts = train_set.scene.points
    if m.init == "sfm" and pts is not None and len(pts) > 0:
        rgb = None if train_set.scene.points_rgb is None else torch.from_numpy(train_set.scene.points_rgb) / 255.0
        return Gaussians.from_points(torch.from_numpy(np.asarray(pts, np.float32)), rgb, m.sh_degree, m.init_opacity,
                                     m.init_scale)
    if m.init == "triangulate":
        pts, rgb = triangulate_views(train_set, progress=cfg.train.progress)
        print(f"[init] {len(pts)} points triangulated from SIFT matches between the {len(train_set)} training views")
        return Gaussians.from_points(torch.from_numpy(pts), torch.from_numpy(rgb) / 255.0, m.sh_degree, m.init_opacity,
                                     m.init_scale)
    centres = torch.stack([torch.from_numpy(f.camtoworld[:3, 3]) for f in train_set.frames]).float()
    return Gaussians.random(m.init_num_points, centres.mean(0), m.init_extent * scene_scale, m.sh_degree,
                            seed=cfg.train.seed, init_opacity=m.init_opacity, init_scale=m.init_scale)


def _optimizers(cfg: SplatConfig, params: torch.nn.ParameterDict, scene_scale: float) -> dict:
    o = cfg.optim
    lrs = {"means": o.means_lr * scene_scale, "scales": o.scales_lr, "quats": o.quats_lr,
           "opacities": o.opacities_lr, "sh0": o.sh0_lr, "shN": o.shN_lr,
           "mask": cfg.compact.mask_lr if cfg.compact else 0.0}
    # one Adam per group: the layout gsplat's strategies update when Gaussians are added or removed
    # fused: one kernel per step instead of a dozen elementwise ops (measured 44 -> 5 ms at 100k Gaussians)
    return {k: torch.optim.Adam([{"params": params[k], "lr": lrs[k], "name": k}], eps=1e-15, fused=True)
            for k in _groups(cfg)}


def _strategy(cfg: SplatConfig):
    from gsplat.strategy import DefaultStrategy

    s = cfg.strategy
    if s.absgrad:
        raise ConfigError("strategy.absgrad needs gsplat's CUDA rasterizer (absolute 2D gradients); "
                          "the CPU rasterizer provides plain gradients")
    return DefaultStrategy(prune_opa=s.prune_opa, grow_grad2d=s.grow_grad2d, grow_scale3d=s.grow_scale3d,
                           prune_scale3d=s.prune_scale3d, refine_start_iter=s.refine_start_iter,
                           # no densification or opacity reset at the last step: nothing would train after it
                           refine_stop_iter=min(s.refine_stop_iter, cfg.train.max_steps), reset_every=s.reset_every,
                           refine_every=s.refine_every, absgrad=s.absgrad, revised_opacity=s.revised_opacity,
                           verbose=False)


def _view(dataset: SplatDataset, i: int, device: torch.device):
    s = dataset[i]
    viewmat = torch.linalg.inv(s.camtoworld)[None].to(device)
    return s.image.to(device), viewmat, s.K[None].to(device), s.width, s.height, s.name


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def depth_image(depth: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """Expected depth `[H, W]` as `uint8 [H, W, 3]` (turbo: near red .. far blue, 2nd to 98th
    percentile of the covered pixels); pixels the Gaussians cover less than half are black."""
    import matplotlib

    d, covered = depth.float().cpu().numpy(), (alpha > 0.5).cpu().numpy()
    out = np.zeros((*d.shape, 3), np.uint8)
    if covered.any():
        lo, hi = np.percentile(d[covered], [2, 98])
        t = 1 - np.clip((d - lo) / max(hi - lo, 1e-9), 0, 1)
        out[covered] = (matplotlib.colormaps["turbo"](t[covered])[:, :3] * 255 + 0.5).astype(np.uint8)
    return out


def error_image(pred: torch.Tensor, image: torch.Tensor, full_scale: float = 0.25) -> np.ndarray:
    """Mean absolute colour error per pixel as `uint8 [H, W, 3]` (inferno, black 0 .. yellow `full_scale`)."""
    import matplotlib

    err = (pred - image).abs().mean(-1).float().cpu().numpy()
    return (matplotlib.colormaps["inferno"](np.clip(err / full_scale, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def evaluate_views(gaussians: Gaussians, dataset: SplatDataset, cfg: SplatConfig, render_dir: Path | None,
                   lpips: LPIPS | None = None, device: torch.device = torch.device("cpu")) -> dict:
    """Render every view of ``dataset``: mean PSNR / SSIM (/ LPIPS), render time, and PNGs.

    Returns:
        ``{"psnr", "ssim", ["lpips"], "num_gaussians", "ms_per_view", "fps", "views"}``.
    """
    from PIL import Image

    g = gaussians.to(device)
    bg = torch.tensor(cfg.data.background, dtype=torch.float32, device=device)[None]
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    seconds = 0.0
    for i in range(len(dataset)):
        image, viewmat, K, W, H, name = _view(dataset, i, device)
        t0 = time.perf_counter()
        rgb, _, _, _ = g.render(viewmat, K, W, H, backgrounds=bg, rasterize_mode=cfg.model.rasterize_mode,
                                near_plane=cfg.model.near_plane, far_plane=cfg.model.far_plane)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        pred = rgb[0].clamp(0, 1)
        scores["psnr"].append(float(psnr(pred, image)))
        scores["ssim"].append(float(ssim(pred, image)))
        if lpips is not None:
            scores["lpips"].append(float(lpips(pred, image)))
        if render_dir is not None and i < cfg.eval.num_renders:
            render_dir.mkdir(parents=True, exist_ok=True)
            _, alpha, depth, _ = g.render(viewmat, K, W, H, backgrounds=bg, rasterize_mode=cfg.model.rasterize_mode,
                                          near_plane=cfg.model.near_plane, far_plane=cfg.model.far_plane,
                                          render_mode="RGB+ED")
            stem = Path(name).stem
            images = {"": np.concatenate([_to_uint8(pred), _to_uint8(image)], axis=1),
                      "_depth": depth_image(depth[0, ..., 0], alpha[0, ..., 0]),
                      "_error": error_image(pred, image)}
            for suffix, picture in images.items():
                with atomic_path(render_dir / f"{stem}{suffix}.png") as tmp:
                    Image.fromarray(picture).save(tmp, format="PNG")
    out = {k: float(np.mean(v)) for k, v in scores.items() if v}
    out["num_gaussians"] = len(gaussians)
    if len(dataset):  # no views: nothing rendered, no timing to report
        n = len(dataset)
        out.update(ms_per_view=1000 * seconds / n, fps=n / max(seconds, 1e-9))
    out["views"] = len(dataset)
    return out


def _lpips(cfg: SplatConfig, device: torch.device) -> LPIPS | None:
    if cfg.eval.lpips_weights:
        return LPIPS.from_file(cfg.eval.lpips_weights).to(device)
    return default_lpips(device)


def run_record(step: int, elapsed_s: float, cfg: SplatConfig) -> dict:
    """What every splatting checkpoint holds besides its model: step, time, RNG states, config, format."""
    return {"step": step, "elapsed_s": elapsed_s, "rng": [get_rng_state()], "config": config_to_dict(cfg),
            "format": FORMAT_VERSION}


def _save_checkpoint(ckpts: CheckpointManager, step: int, ts: "TrainState", cfg: SplatConfig, elapsed_s: float) -> Path:
    state = {
        "model": {k: v.detach().cpu() for k, v in ts.params.items()},
        "optimizer": {k: o.state_dict() for k, o in ts.optimizers.items()},
        "scheduler": ts.scheduler.state_dict(),
        "strategy": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                     for k, v in ts.strategy_state.items()},
        **({} if ts.compact is None else {"compact": ts.compact.state_dict(),
                                          "compact_optimizer": ts.compact_optimizer.state_dict()}),
        **run_record(step, elapsed_s, cfg),
    }
    return ckpts.save(step, state)


def read_checkpoint(path: str | Path) -> dict:
    """`perception3d.engine.checkpoint.read_checkpoint`, remembering the file in ``state["_path"]``
    (the checks of `_restore` name it)."""
    state = _read_checkpoint_file(path)
    state.setdefault("_path", str(path))
    return state


# compact options that shape the saved colour field and codebooks: a checkpoint fits only the same ones
_COMPACT_STRUCTURE = ("hash_levels", "hash_features", "hash_log2_size", "hash_min_resolution", "hash_max_resolution",
                      "mlp_hidden", "vq_stages", "vq_codebook_size")


def _checkpoint_config_difference(ck: dict, cfg: SplatConfig) -> list[str]:
    """``key: checkpoint value -> config value`` for the settings a checkpoint's tensors depend on."""
    saved = ck.get("config")
    if not isinstance(saved, dict):
        return []
    out = []
    sh = (saved.get("model") or {}).get("sh_degree")
    if sh is not None and sh != cfg.model.sh_degree:
        out.append(f"model.sh_degree: {sh} in the checkpoint, {cfg.model.sh_degree} in the config")
    comp = saved.get("compact")
    if isinstance(comp, dict) and cfg.compact is not None:
        for k in _COMPACT_STRUCTURE:
            if k in comp and comp[k] != getattr(cfg.compact, k):
                out.append(f"compact.{k}: {comp[k]} in the checkpoint, {getattr(cfg.compact, k)} in the config")
    return out


def _checkpoint_mismatch(cfg: SplatConfig, ts: "TrainState", ck: dict) -> str | None:
    """Why checkpoint ``ck`` cannot be resumed into the run ``cfg`` built (``ts``), or None."""
    if ("compact" in ck) != (cfg.compact is not None):
        return ("a Compact 3DGS checkpoint (colour field and codebooks), but the config has no compact section"
                if "compact" in ck else "a plain 3DGS checkpoint (SH colours), but the config has a compact section")
    differ = _checkpoint_config_difference(ck, cfg)
    if differ:
        return "trained with other settings: " + "; ".join(differ)
    model, optim = ck.get("model"), ck.get("optimizer")
    if not isinstance(model, dict) or not isinstance(optim, dict):
        return "not a splatting checkpoint (no parameter / optimizer dicts)"
    missing = [k for k in _groups(cfg) if k not in model or k not in optim]
    if missing:
        return f"not a splatting checkpoint of this kind (no parameter group(s) {', '.join(missing)})"
    counts = {k: int(model[k].shape[0]) if isinstance(model[k], torch.Tensor) and model[k].ndim else -1
              for k in _groups(cfg)}
    if len(set(counts.values())) != 1 or -1 in counts.values():
        return f"inconsistent Gaussian counts per parameter group {counts}"
    for k in _groups(cfg):
        want, got = tuple(ts.params[k].shape[1:]), tuple(model[k].shape[1:])
        if want != got:
            if k == "shN":
                have = int(round((got[0] + 1) ** 0.5)) - 1 if got else "?"
                return (f"its Gaussians carry SH degree {have} (shN [N, {', '.join(map(str, got))}]), the config's "
                        f"model.sh_degree={cfg.model.sh_degree} needs shN [N, {', '.join(map(str, want))}]")
            return (f"parameter {k!r} has shape [N, {', '.join(map(str, got))}], the config needs "
                    f"[N, {', '.join(map(str, want))}]")
    for k in _groups(cfg):
        for st in (optim[k].get("state") or {}).values() if isinstance(optim[k], dict) else ():
            for name in ("exp_avg", "exp_avg_sq"):
                t = st.get(name) if isinstance(st, dict) else None
                if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(model[k].shape):
                    return (f"optimizer state {name} of {k!r} has shape {tuple(t.shape)}, its parameter "
                            f"{tuple(model[k].shape)}")
    if ts.compact is not None:
        own, saved = ts.compact.state_dict(), ck.get("compact")
        if not isinstance(saved, dict) or "compact_optimizer" not in ck:
            return "a Compact 3DGS checkpoint without its colour field / codebook state"
        for k, v in own.items():
            got = saved.get(k)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(v.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else "missing"
                return (f"compact state {k!r} has shape {shape}, the config's compact section makes "
                        f"{tuple(v.shape)} (other hash grid / MLP / R-VQ options)")
    return None


def _gaussians_from_checkpoint(state: dict, path, cfg: SplatConfig):
    try:
        m = state["model"]
        if "compact" not in state:
            return Gaussians(m["means"], m["quats"], m["scales"], m["opacities"], m["sh0"], m["shN"])
        if cfg.compact is None:
            raise DataError(f"{path}: a Compact 3DGS checkpoint, but the config has no compact section")
        opts = cfg.compact
        saved = (state.get("config") or {}).get("compact")
        if isinstance(saved, dict):  # the field and codebooks the checkpoint holds, whatever the config says
            from perception3d.config import from_dict

            opts = from_dict(type(cfg.compact), saved, source=f"{path}: config.compact")
        model = CompactModel(opts, torch.zeros(3), 1.0)
        model.load_state_dict(state["compact"])
        return CompactGaussians.from_training(m, model)
    except KeyError as e:
        raise DataError(f"{path}: not a splatting checkpoint (missing parameter {e})") from None
    except (ConfigError, RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: does not fit the config ({type(e).__name__}: {e})") from None


@dataclass
class TrainState:
    """Everything a training step touches (parameters, optimisers, schedule, densification state)."""

    train_set: SplatDataset
    test_set: SplatDataset
    params: torch.nn.ParameterDict
    optimizers: dict
    scheduler: torch.optim.lr_scheduler.ExponentialLR
    strategy: object
    strategy_state: dict
    background: torch.Tensor
    device: torch.device
    compact: CompactModel | None = None  # Compact 3DGS: colour field and quantizers
    compact_optimizer: torch.optim.Optimizer | None = None


def _compact_optimizer(cfg: SplatConfig, model: CompactModel) -> torch.optim.Optimizer:
    c = cfg.compact
    return torch.optim.Adam([{"params": model.field.parameters(), "lr": c.field_lr},
                             {"params": [model.vq_scale.codebooks, model.vq_rot.codebooks], "lr": c.vq_lr}], eps=1e-15)


def snapshot(ts: TrainState):
    """The current Gaussians, for rendering: ``Gaussians`` or ``CompactGaussians``."""
    return Gaussians.from_params(ts.params) if ts.compact is None else CompactGaussians.from_training(ts.params, ts.compact)


def build(cfg: SplatConfig) -> TrainState:
    """Datasets, initial Gaussians, optimisers and the densification strategy of a fresh run."""
    device = _device(cfg)
    weights = cfg.eval.lpips_weights
    if weights and not Path(weights).expanduser().is_file():  # loaded after setup: checked before it
        raise DataError(f"eval.lpips_weights={weights}: LPIPS weight file not found")
    seed_everything(cfg.train.seed)
    train_set, test_set = _datasets(cfg)
    train_set.preload()  # every image decoded now: a corrupt one fails here, not mid-run
    test_set.preload()
    scene_scale = train_set.scene_scale()
    params = _initial_gaussians(cfg, train_set, scene_scale).to_params(device)
    compact = None
    if cfg.compact:
        del params["sh0"], params["shN"]
        params["mask"] = torch.nn.Parameter(torch.full((len(params["means"]),), cfg.compact.mask_init, device=device))
        centre = torch.from_numpy(np.stack([f.camtoworld[:3, 3] for f in train_set.frames]).mean(0))
        compact = CompactModel(cfg.compact, centre, scene_scale).to(device)
    optimizers = _optimizers(cfg, params, scene_scale)
    strategy = _strategy(cfg)
    strategy.check_sanity(params, optimizers)
    bg = torch.tensor(cfg.data.background, dtype=torch.float32, device=device)[None]
    return TrainState(train_set, test_set, params, optimizers, _scheduler(cfg, optimizers),
                      strategy, strategy.initialize_state(scene_scale=scene_scale), bg, device, compact,
                      None if compact is None else _compact_optimizer(cfg, compact))


def _scheduler(cfg: SplatConfig, optimizers: dict) -> torch.optim.lr_scheduler.ExponentialLR:
    gamma = cfg.optim.means_lr_final_ratio ** (1.0 / max(cfg.train.max_steps, 1))
    return torch.optim.lr_scheduler.ExponentialLR(optimizers["means"], gamma=gamma)


def _restore(cfg: SplatConfig, ts: TrainState, ck: dict) -> tuple[int, float]:
    """Load a checkpoint's parameters, optimiser / schedule / strategy / RNG states; its step and
    the training seconds it took to get there.

    Raises:
        DataError: the checkpoint does not fit the config (plain vs Compact 3DGS, another
            ``model.sh_degree``, other compact field / codebook options, missing or inconsistent
            tensors), naming the checkpoint and what differs; raised before anything is changed.
    """
    problem = _checkpoint_mismatch(cfg, ts, ck)
    if problem is not None:
        where = ck.get("_path", f"the checkpoint of step {ck.get('step')}")
        raise DataError(f"{where}: cannot resume this run from it: {problem}. Resume with the config the run was "
                        "trained with (its config.yaml), or start a new run in another --out folder")
    for k in _groups(cfg):
        ts.params[k] = torch.nn.Parameter(ck["model"][k].to(ts.device))
    ts.optimizers = _optimizers(cfg, ts.params, ts.train_set.scene_scale())
    for k in _groups(cfg):
        ts.optimizers[k].load_state_dict(ck["optimizer"][k])
    if ts.compact is not None:
        ts.compact.load_state_dict(ck["compact"])
        ts.compact_optimizer.load_state_dict(ck["compact_optimizer"])
    ts.scheduler = _scheduler(cfg, ts.optimizers)
    ts.scheduler.load_state_dict(ck["scheduler"])
    ts.strategy_state = {k: (v.to(ts.device) if isinstance(v, torch.Tensor) else v) for k, v in ck["strategy"].items()}
    set_rng_state(ck["rng"][0])
    return int(ck["step"]), float(ck.get("elapsed_s", 0.0))


def view_index(cfg: SplatConfig, step: int, n: int) -> int:
    """The training view of ``step``: a seeded permutation of the ``n`` views per epoch."""
    epoch, pos = divmod(step, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, 7, epoch)))[pos])


def train_step(cfg: SplatConfig, ts: TrainState, step: int) -> dict[str, torch.Tensor]:
    """One optimisation step (render, loss, backward, Adam, schedule, densification); its losses."""
    image, viewmat, K, W, H, _ = _view(ts.train_set, view_index(cfg, step, len(ts.train_set)), ts.device)
    p = ts.params
    kw = dict(backgrounds=ts.background, rasterize_mode=cfg.model.rasterize_mode, near_plane=cfg.model.near_plane,
              far_plane=cfg.model.far_plane)
    extra, terms = 0.0, {}
    if ts.compact is None:
        sh_degree = min(step // cfg.model.sh_degree_interval, cfg.model.sh_degree)
        rgb, _, _, meta = render_raw(p["means"], p["quats"], p["scales"], p["opacities"], p["sh0"], p["shN"], viewmat,
                                     K, W, H, sh_degree, **kw)
    else:
        c, sh_degree = cfg.compact, None
        if not ts.compact.vq_active and step >= int(c.vq_start_fraction * cfg.train.max_steps):
            ts.compact.start_vq(p)
        rgb, _, _, meta, terms = ts.compact.render(p, viewmat, K, W, H, **kw)
        mask_on = step >= int(c.mask_start_fraction * cfg.train.max_steps)
        extra = c.mask_lambda * mask_on * terms["mask"] + c.vq_lambda * terms["vq"]
    # The strategy counts iterations from 1, as the 3DGS paper's code does: gsplat's DefaultStrategy
    # resets opacities whenever `step % reset_every == 0`, which at a 0-based step 0 would set every
    # opacity to 0.01 before the first update (measured on a small synthetic scene: 17 -> 6.5 dB PSNR after 10 steps).
    it = step + 1
    ts.strategy.step_pre_backward(p, ts.optimizers, ts.strategy_state, it, meta)
    l1 = (rgb[0] - image).abs().mean()
    d_ssim = ssim_loss(rgb[0], image)
    loss = (1 - cfg.optim.ssim_lambda) * l1 + cfg.optim.ssim_lambda * d_ssim + extra
    loss.backward()
    for opt in (*ts.optimizers.values(), *([ts.compact_optimizer] if ts.compact is not None else [])):
        opt.step()
        opt.zero_grad(set_to_none=True)
    ts.scheduler.step()
    n0 = len(p["means"])
    ts.strategy.step_post_backward(p, ts.optimizers, ts.strategy_state, it, meta, packed=False)
    n1 = len(p["means"])
    counts = {"gaussians_refined": n1 - n0}
    if ts.compact is not None:
        _prune_masked(cfg, ts, it)
        counts["gaussians_masked"] = n1 - len(p["means"])
    return {"loss": loss.detach(), "l1": l1.detach(), "d_ssim": d_ssim.detach(), "sh_degree": sh_degree,
            **{f"loss_{k}": v.detach() for k, v in terms.items()}, **counts}


def _prune_masked(cfg: SplatConfig, ts: TrainState, it: int) -> None:
    """Remove masked Gaussians at every densification step and every ``prune_every`` steps after."""
    from gsplat.strategy.ops import remove

    s = ts.strategy
    refining = s.refine_start_iter < it < s.refine_stop_iter and it % s.refine_every == 0
    if refining or (it >= s.refine_stop_iter and it % cfg.compact.prune_every == 0):
        masked = ts.compact.masked(ts.params)
        if bool(masked.any()):
            remove(ts.params, ts.optimizers, ts.strategy_state, masked)


def train(cfg: SplatConfig, out_dir: str | Path, resume: bool = False, on_start: Callable[[], None] | None = None) -> dict:
    """Train 3DGS as configured; evaluate on the held-out views; write renders, .ply and metrics.

    ``on_start`` is called once the run is set up (after ``resume`` restored its checkpoint), before
    the first step: ``tools/train.py`` writes the run's ``config.yaml`` there."""
    if cfg.coherent is not None:
        from splatting.coherent.train import train as train_coherent

        return train_coherent(cfg, out_dir, resume, on_start)
    out_dir = Path(out_dir)
    ts = build(cfg)
    ckpts = CheckpointManager(out_dir / "ckpt", keep_last=cfg.train.keep_last_ckpts)
    start, elapsed = 0, 0.0
    if resume and ckpts.latest() is not None:
        start, elapsed = _restore(cfg, ts, read_checkpoint(ckpts.latest()))
    if on_start is not None:
        on_start()
    T = cfg.train.max_steps
    lpips = _lpips(cfg, ts.device)
    logger = RunLogger(out_dir, T, initial_step=start, initial_elapsed_s=elapsed, progress=cfg.train.progress)
    W, H = ts.train_set.size(0)
    logger.message(f"[splatting] {len(ts.train_set)} training / {len(ts.test_set)} held-out views of {W}x{H} px; "
                   f"{len(ts.params['means'])} Gaussians; device {ts.device}")
    evaluated = len(ts.test_set) > 0
    if not evaluated:
        logger.message(f"[splatting] {_no_test_views(cfg)}: this run is not evaluated (no PSNR / SSIM)")
    window: dict[str, list[float]] = {}
    last_ckpt = None
    try:
        for step in range(start, T):
            t0 = time.perf_counter()
            out = train_step(cfg, ts, step)
            window.setdefault("step_ms", []).append(1e3 * (time.perf_counter() - t0))
            done = step + 1
            logger.step()
            for k in ("loss", "l1", "d_ssim", "loss_mask", "loss_vq", *_COUNTS):
                if k in out:
                    window.setdefault(k, []).append(float(out[k]))
            if done % cfg.train.log_every == 0 or done == T:
                scalars = {k: float(np.sum(v) if k in _COUNTS else np.mean(v)) for k, v in window.items()}
                scalars.update(num_gaussians=len(ts.params["means"]), lr_means=ts.optimizers["means"].param_groups[0]["lr"])
                if out["sh_degree"] is not None:
                    scalars["sh_degree"] = out["sh_degree"]
                logger.log(done, scalars)
                window.clear()
            if evaluated and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != T:
                if done < ts.strategy.refine_stop_iter and done % ts.strategy.reset_every == 0:
                    logger.message(f"[splatting] eval at step {done} skipped: this step reset every opacity to "
                                   f"{2 * ts.strategy.prune_opa:g} (strategy.reset_every), so it would score the reset")
                else:
                    metrics = evaluate_views(snapshot(ts), ts.test_set, cfg,
                                             out_dir / "renders" / f"step_{done:08d}", lpips, ts.device)
                    logger.log(done, metrics, split="eval")
            if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == T:
                last_ckpt = _save_checkpoint(ckpts, done, ts, cfg, logger.elapsed_s)
    finally:
        logger.close()
    gaussians, files = snapshot(ts), {}
    if ts.compact is None:
        gaussians.save_ply(out_dir / "point_cloud.ply")
        files["ply"] = out_dir / "point_cloud.ply"
    else:  # evaluate what the post-processed file holds, rendered from the file
        gaussians.save(out_dir / "compact_plain.cgs", post=False)
        gaussians.save(out_dir / "compact.cgs", post=True)
        files.update(cgs=out_dir / "compact.cgs", cgs_plain=out_dir / "compact_plain.cgs")
        gaussians = CompactGaussians.load(out_dir / "compact.cgs", ts.device)
    render_dir = out_dir / "renders" / f"step_{T:08d}"
    metrics = evaluate_views(gaussians, ts.test_set, cfg, render_dir, lpips, ts.device)
    metrics.update({f"mb_{k}": f.stat().st_size / 1e6 for k, f in files.items()})
    result = {"metrics": metrics, "train_views": len(ts.train_set), "step": T,
              "checkpoint": str(last_ckpt or ckpts.latest()), **{k: str(f) for k, f in files.items()},
              "report": str(out_dir / "report.html")}
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    write_report(out_dir, result, render_dir, f"{'Compact 3DGS' if ts.compact is not None else '3DGS'}: {out_dir.name}")
    if evaluated:
        print(f"[eval] {len(ts.test_set)} held-out views: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
              f"{metrics['num_gaussians']} Gaussians, {metrics['ms_per_view']:.1f} ms/view; "
              f"renders in {out_dir / 'renders'}")
    else:
        print(f"[eval] {_no_test_views(cfg)}: nothing evaluated; {metrics['num_gaussians']} Gaussians")
    return result


def evaluate(cfg: SplatConfig, ckpt: str | Path, out_dir: str | Path) -> dict:
    """Evaluate a checkpoint (file or run folder), a 3DGS .ply or a Compact 3DGS .cgs on the held-out views."""
    out_dir = Path(out_dir)
    device = _device(cfg)
    _, test_set = _datasets(cfg)
    if len(test_set) == 0:
        raise ConfigError(f"{cfg.data.root}: {_no_test_views(cfg)}: nothing to evaluate; set data.test_every "
                          "to hold views out")
    if str(ckpt).endswith(".ply"):
        gaussians = Gaussians.load_ply(ckpt)
    elif str(ckpt).endswith(".cgs"):
        gaussians = CompactGaussians.load(ckpt)
    else:
        gaussians = _gaussians_from_checkpoint(read_checkpoint(ckpt), ckpt, cfg)
    test_set.preload()
    render_dir = out_dir / "renders" / "eval"
    metrics = evaluate_views(gaussians, test_set, cfg, render_dir, _lpips(cfg, device), device)
    if str(ckpt).endswith((".ply", ".cgs")):
        metrics["mb_file"] = Path(ckpt).stat().st_size / 1e6
    result = {"metrics": metrics, "checkpoint": str(ckpt), "report": str(out_dir / "report.html")}
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    write_report(out_dir, result, render_dir, f"Splatting evaluation: {out_dir.name}")
    print(f"[eval] {len(test_set)} held-out views: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
          f"{metrics['num_gaussians']} Gaussians, {metrics['fps']:.1f} FPS")
    return result
