"""CoherentGS training: ``train(cfg, out_dir, resume)`` for a splatting config with a ``coherent`` section.

Set-up (once, from the K training views): optical flow between every pair of views with
forward-backward masks (:mod:`splatting.coherent.flow`), the initial depth of every view
(:mod:`splatting.coherent.depth`), one Gaussian per ``stride`` x ``stride`` pixel block on its
ray (:class:`splatting.coherent.model.CoherentModel`).

Stage 1, **depth alignment** (``coherent.align_steps`` Adam steps, no rendering): only each view's
disparity scale and offset are optimised, so that the Gaussians of every view project into every
other view where the flow says their pixel went (the flow loss below, alone).

Stage 2, **full optimisation** (``train.max_steps`` steps, one training view per step as in
3DGS, no densification): ``(1 - l) L1 + l D-SSIM`` on the view, plus ``tv_lambda`` x the total
variation of the rendered disparity in that view and in a virtual view between two input cameras
(a random point on the path between their poses: multi-view coherence), plus ``flow_lambda`` x
the flow loss. Everything learns: the decoders (depth and opacity residuals), colours, scale
factors, rotations, and the alignment at a tenth of its stage-1 rate.

Outputs as for 3DGS (``splatting.trainer``): checkpoints (their ``model`` entry holds the current
Gaussians, so ``p3d eval`` reads them like any splatting checkpoint), ``point_cloud.ply``,
``metrics.json``, renders, ``report.html``; plus ``inputs/<view>.png``: each input view beside its
initial depth (white: pixels the plane sweep kept) and its trained depth.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from perception3d.engine.checkpoint import CheckpointManager
from perception3d.engine.data import seed_everything, set_rng_state
from perception3d.engine.logger import RunLogger
from perception3d.errors import ConfigError, DataError
from perception3d.io.atomic import atomic_path, atomic_write_text
from splatting.coherent.depth import InitialDepth, initial_depths, project
from splatting.coherent.flow import pair_flows, pixel_grid, sample_map
from splatting.coherent.model import CoherentModel, CoherentOptions, tv_loss
from splatting.coherent.nets import load_net
from splatting.config import SplatConfig
from splatting.gaussians import Gaussians, render_raw
from splatting.metrics import ssim_loss
from splatting.report import write_report

__all__ = ["CoherentState", "build", "build_model", "align", "align_depths", "train_step", "coherence_losses",
           "param_groups", "train", "interpolate_pose"]


@dataclass
class CoherentState:
    """What training touches: data, the model, its optimiser and the flow targets."""

    train_set: object
    test_set: object
    model: CoherentModel
    optimizer: torch.optim.Optimizer
    viewmats: torch.Tensor  # [K, 4, 4] training cameras
    Ks: torch.Tensor
    images: list[torch.Tensor]
    flow_targets: dict  # (i, j) -> (Gaussian indices of view i, target pixel positions in view j)
    init: InitialDepth
    background: torch.Tensor
    device: torch.device


def _flow_targets(model: CoherentModel, flows: dict, device: torch.device) -> dict:
    """Per ordered view pair: the Gaussians of view i whose pixel's flow passed the consistency
    check, and where in view j the flow puts them (pixel positions, centres at +0.5)."""
    s = model.opts.stride
    out = {}
    for (i, j), (flow, mask) in flows.items():
        h, w = model.sizes[i]
        centres = pixel_grid(h, w, s).reshape(-1, 2)
        f = sample_map(torch.from_numpy(flow).permute(2, 0, 1), centres)
        ok = sample_map(torch.from_numpy(mask.astype(np.float32))[None], centres, mode="nearest")[:, 0] > 0.5
        idx = torch.nonzero(ok)[:, 0]
        out[(i, j)] = idx.to(device), (centres + f)[idx].to(device)
    return out


def flow_errors(means: list[torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, targets: dict) -> torch.Tensor:
    """Pixel distances between where view i's Gaussians project in view j and where the flow puts their
    pixel, over every ordered pair (``means``: per view ``[n_v, 3]``)."""
    errs = [(project(means[i][idx], viewmats[j], Ks[j])[0] - target).norm(dim=-1)
            for (i, j), (idx, target) in targets.items()]
    return torch.cat(errs) if errs else means[0][:0, 0]


def flow_loss(means: list[torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, targets: dict,
              scale_px: float = 2.0) -> torch.Tensor:
    """The robust (Cauchy) flow loss ``mean log(1 + (e / scale_px)^2)`` over :func:`flow_errors`: a
    Gaussian whose pixel the flow got wrong (tens of pixels off) pulls little."""
    e = flow_errors(means, viewmats, Ks, targets)
    return torch.log1p((e / scale_px) ** 2).mean() if len(e) else means[0].sum() * 0


def interpolate_pose(c2w_a: torch.Tensor, c2w_b: torch.Tensor, t: float) -> torch.Tensor:
    """The camera -> world pose a fraction ``t`` of the way from ``a`` to ``b`` (rotation by slerp,
    centre linearly)."""
    from scipy.spatial.transform import Rotation, Slerp

    rots = Rotation.from_matrix(np.stack([c2w_a[:3, :3].double().cpu().numpy(), c2w_b[:3, :3].double().cpu().numpy()]))
    out = torch.eye(4, dtype=c2w_a.dtype)
    out[:3, :3] = torch.from_numpy(Slerp([0.0, 1.0], rots)([t]).as_matrix()[0]).to(c2w_a.dtype)
    out[:3, 3] = (1 - t) * c2w_a[:3, 3].cpu() + t * c2w_b[:3, 3].cpu()
    return out.to(c2w_a.device)


def param_groups(model: CoherentModel) -> dict[str, list[torch.nn.Parameter]]:
    """Stage 2's parameter groups, by name, in the optimiser's order."""
    return {"decoders": list(model.decoders.parameters()), "alignment": [model.log_a, model.b], "sh0": [model.sh0],
            "shN": [model.shN], "scales": [model.scales], "quats": [model.quats]}


def _optimizer(cfg: SplatConfig, model: CoherentModel) -> torch.optim.Optimizer:
    c, o = cfg.coherent, cfg.optim
    lr = {"decoders": c.decoder_lr, "alignment": 0.1 * c.align_lr, "sh0": o.sh0_lr, "shN": o.shN_lr,
          "scales": o.scales_lr, "quats": o.quats_lr}
    return torch.optim.Adam([{"params": params, "lr": lr[name], "name": name}
                             for name, params in param_groups(model).items()], eps=1e-15)


def build_model(images: list[torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, names: list[str],
                opts: CoherentOptions, sh_degree: int, init_opacity: float, init_scale: float,
                device: torch.device | str = "cpu", progress: bool = False) -> tuple[CoherentModel, dict, InitialDepth]:
    """The set-up of the module docstring for ``images`` (per view ``float32 [H, W, 3]`` in [0, 1], one
    size) with ``[V, 4, 4]`` world -> camera ``viewmats`` and ``[V, 3, 3]`` ``Ks``; ``names`` are the
    image file names (``depth_source: folder`` reads ``<stem>`` depth maps).

    Returns:
        ``(model, flow targets, initial depth)``, the model and the targets on ``device``.
    """
    net = load_net(opts.flow_model, "coherent.flow_model") if opts.flow_model else None
    flows = pair_flows([im.numpy() for im in images], opts.flow_method, net, progress, viewmats, Ks)
    init = initial_depths(torch.stack(images), viewmats, Ks, flows, opts, names, progress)
    model = CoherentModel(images, list(torch.linalg.inv(viewmats)), list(Ks), list(init.depth), opts,
                          sh_degree, init_opacity, init_scale).to(device)
    return model, _flow_targets(model, flows, device), init


def build(cfg: SplatConfig) -> CoherentState:
    """Data, flows, initial depths, the model and its optimiser (before stage 1).

    Raises:
        ConfigError: fewer than 2 training views, or views of different sizes.
        DataError: a configured depth folder or network file does not exist (checked first).
    """
    from splatting.trainer import _datasets, _device

    opts = cfg.coherent
    for key, path, kind in (("depth_folder", opts.depth_folder if opts.depth_source == "folder" else None, "folder"),
                            ("depth_model", opts.depth_model if opts.depth_source == "model" else None, "file"),
                            ("flow_model", opts.flow_model, "file")):
        found = path is None or (Path(path).expanduser().is_dir() if kind == "folder" else Path(path).expanduser().is_file())
        if not found:
            raise DataError(f"coherent.{key}={path}: {kind} not found")
    device = _device(cfg)
    seed_everything(cfg.train.seed)
    train_set, test_set = _datasets(cfg)
    if len(train_set) < 2:
        raise ConfigError(f"data.train_views={cfg.data.train_views}: CoherentGS needs at least 2 training views "
                          f"(it matches them to each other); this scene gives {len(train_set)}")
    train_set.preload()
    test_set.preload()
    sizes = {train_set.size(i) for i in range(len(train_set))}
    if len(sizes) != 1:
        raise DataError(f"{cfg.data.root}: CoherentGS needs training views of one size; got {sorted(sizes)}")
    progress = cfg.train.progress
    images = [train_set[i].image for i in range(len(train_set))]
    viewmats, Ks = train_set.cameras()
    model, flow_targets, init = build_model(images, viewmats, Ks, [f.name for f in train_set.frames], opts,
                                            cfg.model.sh_degree, cfg.model.init_opacity, cfg.model.init_scale,
                                            device, progress)
    bg = torch.tensor(cfg.data.background, dtype=torch.float32, device=device)[None]
    return CoherentState(train_set, test_set, model, _optimizer(cfg, model), viewmats.to(device), Ks.to(device),
                         [im.to(device) for im in images], flow_targets, init, bg, device)


def align(cfg: SplatConfig, st: CoherentState, logger: RunLogger | None = None) -> tuple[float, float]:
    """Stage 1 (:func:`align_depths` with the config's steps and rate), logged; the median flow error
    before and after (pixels)."""
    m = st.model
    before, after = align_depths(m, st.viewmats, st.Ks, st.flow_targets, cfg.coherent.align_steps,
                                 cfg.coherent.align_lr)
    if logger is not None:
        scale = ", ".join(f"{x:.3f}" for x in m.log_a.detach().exp().tolist())
        offset = ", ".join(f"{x:+.3f}" for x in m.b.detach().tolist())
        logger.message(f"[coherent] stage 1, depth alignment ({cfg.coherent.align_steps} steps): median flow error "
                       f"{before:.2f} -> {after:.2f} px; per-view disparity scale {scale}, offset {offset}")
    return before, after


def align_depths(model: CoherentModel, viewmats: torch.Tensor, Ks: torch.Tensor, flow_targets: dict, steps: int,
                 lr: float) -> tuple[float, float]:
    """Stage 1: ``steps`` Adam steps (rate ``lr``) on each view's disparity scale and offset against the
    flow loss alone; the median flow error before and after (pixels)."""
    m = model
    opt = torch.optim.Adam([m.log_a, m.b], lr=lr)

    def means() -> list[torch.Tensor]:
        return [m.view_means(v, residuals=False) for v in range(m.num_views)]

    with torch.no_grad():
        before = float(flow_errors(means(), viewmats, Ks, flow_targets).median())
    for _ in range(steps):
        value = flow_loss(means(), viewmats, Ks, flow_targets)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    with torch.no_grad():
        after = float(flow_errors(means(), viewmats, Ks, flow_targets).median())
    return before, after


def coherence_losses(model: CoherentModel, g: dict, v: int, depth: torch.Tensor, alpha: torch.Tensor,
                     viewmats: torch.Tensor, Ks: torch.Tensor, flow_targets: dict,
                     render_virtual: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's regularisers for a step on input view ``v``: ``(disparity TV, flow loss)``, unweighted.

    Args:
        model, g: the model and its :meth:`~CoherentModel.gaussians` of this step.
        depth, alpha: ``[H, W]`` expected depth and opacity rendered in view ``v``.
        viewmats, Ks: ``[V, 4, 4]`` world -> camera and ``[V, 3, 3]`` of the input views.
        flow_targets: as built by :func:`build_model`.
        render_virtual: world -> camera ``[4, 4]`` -> ``(depth [H, W], alpha [H, W])`` of ``g`` seen
            by a camera of view ``v``'s intrinsics there; called (once) only when ``tv_lambda > 0``.
    """
    K_views = model.num_views
    tv = tv_loss(1.0 / depth.clamp(min=1e-6), alpha)
    if model.opts.tv_lambda > 0:  # a virtual view between this input camera and another
        other = (v + 1 + int(torch.randint(K_views - 1, ()))) % K_views
        c2w = interpolate_pose(torch.linalg.inv(viewmats[v]), torch.linalg.inv(viewmats[other]), float(torch.rand(())))
        d2, a2 = render_virtual(torch.linalg.inv(c2w))
        tv = tv + tv_loss(1.0 / d2.clamp(min=1e-6), a2)
    means = list(torch.split(g["means"], model.counts))
    return tv, flow_loss(means, viewmats, Ks, flow_targets)


def _render(cfg: SplatConfig, g: dict, viewmat: torch.Tensor, K: torch.Tensor, W: int, H: int, sh_degree: int,
            bg: torch.Tensor):
    return render_raw(g["means"], g["quats"], g["scales"], g["opacities"], g["sh0"], g["shN"], viewmat[None], K[None],
                      W, H, sh_degree, backgrounds=bg, render_mode="RGB+ED", rasterize_mode=cfg.model.rasterize_mode,
                      near_plane=cfg.model.near_plane, far_plane=cfg.model.far_plane)


def train_step(cfg: SplatConfig, st: CoherentState, step: int) -> dict[str, torch.Tensor]:
    """One stage-2 step: photometric + disparity TV (training and virtual view) + flow loss; Adam."""
    from splatting.trainer import view_index

    c, m = cfg.coherent, st.model
    v = view_index(cfg, step, m.num_views)
    H, W = st.images[v].shape[:2]
    sh_degree = min(step // cfg.model.sh_degree_interval, cfg.model.sh_degree)
    g = m.gaussians()
    rgb, alpha, depth, _ = _render(cfg, g, st.viewmats[v], st.Ks[v], W, H, sh_degree, st.background)
    l1 = (rgb[0] - st.images[v]).abs().mean()
    d_ssim = ssim_loss(rgb[0], st.images[v])

    def render_virtual(viewmat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, a2, d2, _ = _render(cfg, g, viewmat, st.Ks[v], W, H, sh_degree, st.background)
        return d2[0, ..., 0], a2[0, ..., 0]

    tv, fl = coherence_losses(m, g, v, depth[0, ..., 0], alpha[0, ..., 0], st.viewmats, st.Ks, st.flow_targets,
                              render_virtual)
    loss = (1 - cfg.optim.ssim_lambda) * l1 + cfg.optim.ssim_lambda * d_ssim + c.tv_lambda * tv + c.flow_lambda * fl
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    st.optimizer.step()
    return {"loss": loss.detach(), "l1": l1.detach(), "d_ssim": d_ssim.detach(), "loss_tv": tv.detach(),
            "loss_flow": fl.detach(), "sh_degree": sh_degree}


def snapshot(st: CoherentState) -> Gaussians:
    """The current Gaussians (detached), as plain 3DGS Gaussians."""
    with torch.no_grad():
        g = st.model.gaussians()
    return Gaussians(g["means"].detach(), g["quats"].detach(), g["scales"].detach(), g["opacities"].detach(),
                     g["sh0"].detach(), g["shN"].detach())


def _save_checkpoint(ckpts: CheckpointManager, step: int, st: CoherentState, cfg: SplatConfig,
                     elapsed_s: float) -> Path:
    from splatting.trainer import run_record

    g = snapshot(st)
    state = {
        "model": {"means": g.means.cpu(), "quats": g.quats.cpu(), "scales": g.scales_log.cpu(),
                  "opacities": g.opacities_logit.cpu(), "sh0": g.sh0.cpu(), "shN": g.shN.cpu()},
        "coherent": {k: v.detach().cpu() for k, v in st.model.state_dict().items()},
        "optimizer": st.optimizer.state_dict(),
        **run_record(step, elapsed_s, cfg),
    }
    return ckpts.save(step, state)


def _restore(st: CoherentState, ck: dict) -> tuple[int, float]:
    where = ck.get("_path", f"the checkpoint of step {ck.get('step')}")
    if "coherent" not in ck:
        raise DataError(f"{where}: cannot resume this run from it: not a CoherentGS checkpoint (no 'coherent' "
                        "state). Resume with the config the run was trained with, or use another --out folder")
    try:
        st.model.load_state_dict({k: v.to(st.device) for k, v in ck["coherent"].items()})
        st.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"{where}: cannot resume this run from it: it does not fit the config (other views, "
                        f"stride, layers or decoder?): {type(e).__name__}: {str(e).splitlines()[0]}") from None
    set_rng_state(ck["rng"][0])
    return int(ck["step"]), float(ck.get("elapsed_s", 0.0))


def _write_inputs(out_dir: Path, st: CoherentState) -> Path:
    """``inputs/<view>.png``: input view | initial depth (kept plane-sweep pixels outlined white) | trained depth."""
    from PIL import Image

    from splatting.trainer import _to_uint8, depth_image

    folder = out_dir / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    s = st.model.opts.stride
    for v, frame in enumerate(st.train_set.frames):
        H, W = st.images[v].shape[:2]
        init = torch.from_numpy(st.init.depth[v])
        init_img = depth_image(init, torch.ones_like(init))
        with torch.no_grad():
            trained = st.model.depth_map(v).cpu()
        up = torch.nn.functional.interpolate(trained[None, None], size=(H // s * s, W // s * s), mode="nearest")[0, 0]
        trained_img = np.zeros((H, W, 3), np.uint8)
        trained_img[:up.shape[0], :up.shape[1]] = depth_image(up, torch.ones_like(up))
        kept = st.init.kept[v]
        edge = kept & ~np.roll(kept, 1, 0) | kept & ~np.roll(kept, 1, 1)
        init_img[edge] = 255
        row = np.concatenate([_to_uint8(st.images[v].cpu()), init_img, trained_img], axis=1)
        with atomic_path(folder / f"{Path(frame.name).stem}.png") as tmp:
            Image.fromarray(row).save(tmp, format="PNG")
    return folder


def train(cfg: SplatConfig, out_dir: str | Path, resume: bool = False,
          on_start: Callable[[], None] | None = None) -> dict:
    """Train CoherentGS as configured (both stages); evaluate on the held-out views; write the outputs."""
    from splatting.trainer import _lpips, _no_test_views, evaluate_views, read_checkpoint

    out_dir = Path(out_dir)
    t_setup = time.perf_counter()
    st = build(cfg)
    ckpts = CheckpointManager(out_dir / "ckpt", keep_last=cfg.train.keep_last_ckpts)
    start, elapsed = 0, 0.0
    if resume and ckpts.latest() is not None:
        start, elapsed = _restore(st, read_checkpoint(ckpts.latest()))
    if on_start is not None:
        on_start()
    T = cfg.train.max_steps
    lpips = _lpips(cfg, st.device)
    logger = RunLogger(out_dir, T, initial_step=start, initial_elapsed_s=elapsed, progress=cfg.train.progress)
    H, W = st.images[0].shape[:2]
    kept = 100 * st.init.kept.mean()
    logger.message(f"[coherent] {len(st.train_set)} training views ({', '.join(f.name for f in st.train_set.frames)}) / "
                   f"{len(st.test_set)} held-out views of {W}x{H} px; {len(st.model.view_of_gaussian())} Gaussians; "
                   f"{st.init.source} depth ({kept:.0f}% of the plane-sweep depths kept); set-up "
                   f"{time.perf_counter() - t_setup:.1f} s; device {st.device}")
    evaluated = len(st.test_set) > 0
    if not evaluated:
        logger.message(f"[coherent] {_no_test_views(cfg)}: this run is not evaluated (no PSNR / SSIM)")
    window: dict[str, list[float]] = {}
    last_ckpt = None
    try:
        if start == 0:
            before, after = align(cfg, st, logger)
            logger.log(0, {"flow_px_before_alignment": before, "flow_px_after_alignment": after})
        for step in range(start, T):
            t0 = time.perf_counter()
            out = train_step(cfg, st, step)
            window.setdefault("step_ms", []).append(1e3 * (time.perf_counter() - t0))
            done = step + 1
            logger.step()
            for k in ("loss", "l1", "d_ssim", "loss_tv", "loss_flow"):
                window.setdefault(k, []).append(float(out[k]))
            if done % cfg.train.log_every == 0 or done == T:
                scalars = {k: float(np.mean(v)) for k, v in window.items()}
                scalars["sh_degree"] = out["sh_degree"]
                logger.log(done, scalars)
                window.clear()
            if evaluated and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != T:
                metrics = evaluate_views(snapshot(st), st.test_set, cfg, out_dir / "renders" / f"step_{done:08d}",
                                         lpips, st.device)
                logger.log(done, metrics, split="eval")
            if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == T:
                last_ckpt = _save_checkpoint(ckpts, done, st, cfg, logger.elapsed_s)
    finally:
        logger.close()
    gaussians = snapshot(st)
    gaussians.save_ply(out_dir / "point_cloud.ply")
    inputs = _write_inputs(out_dir, st)
    render_dir = out_dir / "renders" / f"step_{T:08d}"
    metrics = evaluate_views(gaussians, st.test_set, cfg, render_dir, lpips, st.device)
    metrics["mb_ply"] = (out_dir / "point_cloud.ply").stat().st_size / 1e6
    result = {"metrics": metrics, "train_views": len(st.train_set),
              "train_view_names": [f.name for f in st.train_set.frames], "step": T,
              "checkpoint": str(last_ckpt or ckpts.latest()), "ply": str(out_dir / "point_cloud.ply"),
              "inputs": str(inputs), "report": str(out_dir / "report.html")}
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    write_report(out_dir, result, render_dir, f"CoherentGS: {out_dir.name}")
    if evaluated:
        print(f"[eval] {len(st.test_set)} held-out views: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
              f"{metrics['num_gaussians']} Gaussians; renders in {out_dir / 'renders'}, input depths in {inputs}")
    return result
