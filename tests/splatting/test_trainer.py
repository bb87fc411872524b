"""Tests for the 3DGS trainer: it learns, resumes exactly, and its exports render like the model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perception3d.config import load_config
from perception3d.engine.checkpoint import read_checkpoint, resolve_latest
from perception3d.errors import DataError
from splatting import trainer
from splatting.config import SplatConfig
from splatting.data import write_synthetic_scene
from splatting.gaussians import Gaussians
from splatting.io import load_splat
from splatting.metrics import psnr

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "splatting" / "3dgs_synthetic.yaml"


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views") / "scene"
    write_synthetic_scene(root, seed=1, num_views=12, width=80, height=60, num_points=1500,
                          background_rgb=(1.0, 1.0, 1.0))
    return root


def tiny_cfg(root: Path, *extra: str) -> SplatConfig:
    """60 steps on 80x60 views with densification from step 20 to 50 (no opacity reset: it would need
    more steps than this to recover from)."""
    overrides = [f"data.root={root}", "data.synthetic=null", "train.max_steps=60", "train.ckpt_every=30",
                 "train.eval_every=0", "train.log_every=10", "train.progress=false", "strategy.refine_start_iter=20",
                 "strategy.refine_every=10", "strategy.refine_stop_iter=50", "strategy.reset_every=1000",
                 "model.sh_degree_interval=20", "eval.num_renders=1", *extra]
    return load_config(CONFIG, SplatConfig, overrides=overrides)


@pytest.fixture(scope="module")
def trained(scene_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(scene_root)
    return cfg, out, trainer.train(cfg, out)


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(ckpt)["model"]


def test_training_learns_and_densifies(trained):
    cfg, out, result = trained
    ts = trainer.build(cfg)  # the same initial Gaussians (seeded)
    before = trainer.evaluate_views(Gaussians.from_params(ts.params), ts.test_set, cfg, None)
    after = result["metrics"]
    assert after["psnr"] > before["psnr"] + 3.0, (before, after)
    assert after["ssim"] > before["ssim"]
    assert after["num_gaussians"] != len(ts.params["means"])  # densification / pruning ran
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("step_ms" in rec for rec in logged)
    assert (out / "renders" / "step_00000060").is_dir() and any((out / "renders" / "step_00000060").glob("*.png"))
    assert json.loads((out / "metrics.json").read_text())["metrics"]["psnr"] == pytest.approx(after["psnr"])


def test_no_opacity_reset_at_the_last_step_and_no_eval_of_a_reset(scene_root, tmp_path):
    # resets at steps 20 and 40 by the config; 40 is the last step, and the eval at 20 would score a reset
    cfg = tiny_cfg(scene_root, "train.max_steps=40", "train.eval_every=20", "strategy.reset_every=20",
                   "strategy.refine_stop_iter=1000")
    trainer.train(cfg, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert not any(rec.get("split") == "eval" for rec in logged)
    assert any("eval at step 20 skipped" in rec.get("message", "") for rec in logged)
    opacity = torch.sigmoid(_params(tmp_path / "ckpt" / "latest.pt")["opacities"])
    reset_value = 2 * cfg.strategy.prune_opa
    assert float(opacity.max()) > 2 * reset_value  # a reset at step 40 would clamp every opacity to reset_value


def test_resume_reaches_the_uninterrupted_weights(trained, scene_root, tmp_path, monkeypatch):
    cfg, out, _ = trained
    real_step = trainer.train_step

    class Crash(Exception):
        pass

    def crashing(cfg_, ts, step):
        if step == 45:
            raise Crash
        return real_step(cfg_, ts, step)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(Crash):
        trainer.train(cfg, tmp_path)
    assert resolve_latest(tmp_path / "ckpt").name == "step_00000030.pt"
    elapsed = read_checkpoint(tmp_path / "ckpt" / "step_00000030.pt")["elapsed_s"]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train(cfg, tmp_path, resume=True)
    resumed_log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()[len(lines):]]
    assert 0 < elapsed and all(rec["time"] >= elapsed for rec in resumed_log if "step" in rec)  # the clock goes on
    ref, resumed = _params(resolve_latest(out / "ckpt")), _params(resolve_latest(tmp_path / "ckpt"))
    assert ref["means"].shape == resumed["means"].shape  # same densification decisions
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], rtol=0, atol=1e-6)


def test_ply_renders_exactly_like_the_checkpoint(trained):
    cfg, out, _ = trained
    p = _params(resolve_latest(out / "ckpt"))
    from_ckpt = Gaussians(p["means"], p["quats"], p["scales"], p["opacities"], p["sh0"], p["shN"])
    from_ply = Gaussians.load_ply(out / "point_cloud.ply")
    ts = trainer.build(cfg)
    s = ts.test_set[0]
    viewmat = torch.linalg.inv(s.camtoworld)[None]
    a = from_ckpt.render(viewmat, s.K[None], s.width, s.height)[0]
    b = from_ply.render(viewmat, s.K[None], s.width, s.height)[0]
    assert torch.equal(a, b)


def test_splat_renders_like_the_model_within_quantisation(trained, tmp_path):
    cfg, out, _ = trained
    g = Gaussians.load_ply(out / "point_cloud.ply")
    g.save_splat(tmp_path / "scene.splat")
    d = load_splat(tmp_path / "scene.splat")
    back = Gaussians(d["means"], d["quats"], d["scales_log"], d["opacities_logit"], d["sh0"], torch.zeros(len(g), 0, 3))
    s = trainer.build(cfg).test_set[0]
    viewmat = torch.linalg.inv(s.camtoworld)[None]
    bg = torch.ones(1, 3)
    a = g.render(viewmat, s.K[None], s.width, s.height, sh_degree=0, backgrounds=bg)[0][0].clamp(0, 1)
    b = back.render(viewmat, s.K[None], s.width, s.height, backgrounds=bg)[0][0].clamp(0, 1)
    # .splat keeps 8-bit colour and opacity: the same image up to that quantisation
    assert float(psnr(b, a)) > 40.0


def test_eval_cli_on_checkpoint_and_ply(trained, scene_root, tmp_path):
    cfg, out, result = trained
    overrides = [f"data.root={scene_root}", "data.synthetic=null", "eval.num_renders=1"]
    sets = [a for o in overrides for a in ("--set", o)]
    for ckpt in (out, out / "point_cloud.ply"):
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--config", str(CONFIG), "--ckpt",
                              str(ckpt), "--out", str(tmp_path / ckpt.name), *sets],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        metrics = json.loads(run.stdout.strip().splitlines()[-1])["metrics"]
        assert metrics["psnr"] == pytest.approx(result["metrics"]["psnr"], abs=1e-4)
        assert metrics["num_gaussians"] == result["metrics"]["num_gaussians"]


def test_missing_scene_is_a_clear_error(tmp_path):
    cfg = load_config(CONFIG, SplatConfig, overrides=[f"data.root={tmp_path / 'nowhere'}", "data.synthetic=null"])
    with pytest.raises(DataError, match="nowhere.*not found"):
        trainer.train(cfg, tmp_path / "out")


COMPACT = ("compact={hash_levels: 4, hash_log2_size: 10, mlp_hidden: 16, vq_stages: 2, vq_codebook_size: 16, "
           "vq_start_fraction: 0.6, mask_lr: 0.1, mask_lambda: 0.05, prune_every: 5}")


def test_compact_training_resumes_exactly_and_renders_from_its_file(scene_root, tmp_path, monkeypatch):
    from splatting.compact.model import CompactGaussians

    cfg = tiny_cfg(scene_root, COMPACT, "compact.mask_init=-3.0")  # masks prune within the 60 steps
    result = trainer.train(cfg, tmp_path / "a")
    ts = trainer.build(cfg)
    before = trainer.evaluate_views(trainer.snapshot(ts), ts.test_set, cfg, None)
    after = result["metrics"]
    assert after["psnr"] > before["psnr"] + 3.0, (before, after)
    assert after["mb_cgs"] < after["mb_cgs_plain"]
    # the final metrics are those of the post-processed file, rendered from the file
    again = trainer.evaluate_views(CompactGaussians.load(tmp_path / "a" / "compact.cgs"), ts.test_set, cfg, None)
    assert again["psnr"] == pytest.approx(after["psnr"], abs=1e-4)
    # exact resume across the start of the R-VQ phase (step 36)
    real_step = trainer.train_step

    def crashing(cfg_, ts_, step):
        if step == 45:
            raise RuntimeError("crash")
        return real_step(cfg_, ts_, step)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        trainer.train(cfg, tmp_path / "b")
    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train(cfg, tmp_path / "b", resume=True)
    ref, resumed = (read_checkpoint(resolve_latest(tmp_path / d / "ckpt")) for d in ("a", "b"))
    # the logged counts account for every Gaussian added or removed
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    refined, masked = (sum(rec.get(k, 0) for rec in logged) for k in ("gaussians_refined", "gaussians_masked"))
    assert masked > 0
    assert len(ts.params["means"]) + refined - masked == len(ref["model"]["means"])
    for k in ref["model"]:
        torch.testing.assert_close(resumed["model"][k], ref["model"][k], rtol=0, atol=1e-6)
    for k in ref["compact"]:
        torch.testing.assert_close(resumed["compact"][k], ref["compact"][k], rtol=0, atol=1e-6)


def test_masked_gaussians_are_removed_with_their_optimizer_state(scene_root):
    cfg = tiny_cfg(scene_root, COMPACT)
    ts = trainer.build(cfg)
    n = len(ts.params["means"])
    with torch.no_grad():
        ts.params["mask"][::3] = -10.0  # a third switched off
    keep = ts.params["means"].detach()[torch.arange(n) % 3 != 0].clone()
    trainer._prune_masked(cfg, ts, it=33)  # not a densification step (every 10 from 20 to 50): nothing
    assert len(ts.params["means"]) == n
    trainer._prune_masked(cfg, ts, it=30)
    assert torch.equal(ts.params["means"].detach(), keep)
    for k, opt in ts.optimizers.items():
        state = opt.state[opt.param_groups[0]["params"][0]]
        assert opt.param_groups[0]["params"][0] is ts.params[k] and (not state or len(state["exp_avg"]) == len(keep))


def test_mask_sparsity_loss_starts_at_its_fraction_of_the_steps(scene_root):
    delayed = tiny_cfg(scene_root, COMPACT, "compact.mask_start_fraction=0.5")  # from step 30 of 60
    without = tiny_cfg(scene_root, COMPACT, "compact.mask_lambda=0.0")

    def masks_after(cfg, step):
        ts = trainer.build(cfg)
        trainer.train_step(cfg, ts, step)
        return ts.params["mask"].detach()

    assert torch.equal(masks_after(delayed, 29), masks_after(without, 29))
    assert not torch.equal(masks_after(delayed, 30), masks_after(without, 30))
