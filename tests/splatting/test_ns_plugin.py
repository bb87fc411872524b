"""The nerfstudio plugin (splatting/ns_plugin.py), run by nerfstudio's own commands in its environment.

nerfstudio 1.1.5 needs numpy<2 and torchvision, so it lives in a virtual environment of its own
(`.venv-nerfstudio` at the repository root, or `$P3D_NERFSTUDIO_VENV`); these tests drive its
`ns-train`, `ns-export` and `ns-eval` by subprocess, with this checkout first on `PYTHONPATH`, and
check the results here with our own reader, rasterizer and metrics. They skip without that
environment. About 2 minutes on 2 cores, 25-45 s of it p3d-coherentgs.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from splatting.data import load_scene, read_image, write_synthetic_scene
from splatting.gaussians import Gaussians
from splatting.io import gaussian_ply_property_names
from splatting.metrics import psnr

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / os.environ.get("P3D_NERFSTUDIO_VENV", ".venv-nerfstudio")  # an absolute override replaces ROOT
EVAL_EVERY = 4  # views 0, 4, 8 are held out (nerfstudio-data --eval-mode interval), as SplatDataset's test_every
STEPS = 60
COHERENT_STRIDE = 2

pytestmark = pytest.mark.skipif(
    not (VENV / "bin" / "ns-train").is_file(),
    reason=f"no nerfstudio environment at {VENV} (no bin/ns-train): create it as scripts/install.sh does for "
           "nerfstudio, or point $P3D_NERFSTUDIO_VENV at one")


def ns(command: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the environment's nerfstudio commands on this checkout's code; fail with its output's tail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([str(VENV / "bin" / command), *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=timeout)
    assert run.returncode == 0, f"{command} {' '.join(map(str, args))} failed:\n{(run.stdout + run.stderr)[-4000:]}"
    return run


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 12-view 80x60 synthetic scene in nerfstudio's format (transforms.json + points3D.ply)."""
    return write_synthetic_scene(tmp_path_factory.mktemp("ns") / "scene", seed=1, num_views=12, width=80, height=60,
                                 num_points=1500)


def train_and_export(method: str, scene: Path, tmp: Path, *model_args,
                     split: tuple = ("--eval-mode", "interval", "--eval-interval", EVAL_EVERY)) -> dict:
    """``method`` trained on ``scene`` for 60 steps on the CPU (3DGS: densification from step 20 to 50),
    exported; ``split``: the nerfstudio-data options choosing the training views."""
    # The synthetic views have a white background; nerfstudio's default (random colours behind the
    # Gaussians) needs far more than 60 steps to cover it with opaque white Gaussians.
    ns("ns-train", method, "--data", scene, "--output-dir", tmp / "out", "--experiment-name", "tiny",
       "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
       "--viewer.quit-on-train-completion", "True", "--max-num-iterations", STEPS, "--logging.steps-per-log", 10,
       "--pipeline.model.warmup-length", 20, "--pipeline.model.refine-every", 10,
       "--pipeline.model.stop-split-at", 50, "--pipeline.model.sh-degree-interval", 20,
       "--pipeline.model.background-color", "white", *model_args, "nerfstudio-data", *split)
    run_dir = tmp / "out" / "tiny" / method / "run"
    ns("ns-export", "gaussian-splat", "--load-config", run_dir / "config.yml", "--output-dir", tmp / "export")
    return {"scene": scene, "run_dir": run_dir, "ply": tmp / "export" / "splat.ply", "tmp": tmp}


@pytest.fixture(scope="module")
def run(scene, tmp_path_factory) -> dict:
    return train_and_export("p3d-3dgs", scene, tmp_path_factory.mktemp("p3d-3dgs"))


@pytest.fixture(scope="module")
def compact_run(scene, tmp_path_factory) -> dict:
    """Compact 3DGS with the quickstart's mask settings; R-VQ from step 48 (vq_start_fraction 0.8)."""
    return train_and_export("p3d-compact3dgs", scene, tmp_path_factory.mktemp("p3d-compact3dgs"),
                            "--pipeline.model.compact.mask-lambda", 0.05, "--pipeline.model.compact.mask-init", 0,
                            "--optimizers.mask.optimizer.lr", 0.1)


@pytest.fixture(scope="module")
def coherent_run(tmp_path_factory) -> dict:
    """CoherentGS on 3 views: a 5-view scene on a 40-degree arc, nerfstudio-data's fraction split trains
    on views 0, 2, 4 and holds out 1 and 3 (between them). Stage 1 and the plane sweep are cut down
    (150 steps, 32 planes) for time; the 60 steps and their other options are the other runs'."""
    tmp = tmp_path_factory.mktemp("p3d-coherentgs")
    scene = write_synthetic_scene(tmp / "scene", seed=1, num_views=5, width=80, height=60, num_points=500,
                                  arc_deg=40)
    return train_and_export("p3d-coherentgs", scene, tmp, "--pipeline.model.coherent.stride", COHERENT_STRIDE,
                            "--pipeline.model.coherent.align-steps", 150, "--pipeline.model.coherent.mvs-planes", 32,
                            split=("--eval-mode", "fraction", "--train-split-fraction", 0.6))


def test_nerfstudio_lists_the_methods():
    """`ns-train --help` lists the methods; nerfstudio's registry holds our models, on the CPU without CUDA."""
    help_text = ns("ns-train", "--help").stdout
    assert all(m in help_text for m in ("p3d-3dgs", "p3d-compact3dgs", "p3d-coherentgs")), help_text[-3000:]
    code = ("import json, torch\nfrom nerfstudio.configs.method_configs import all_methods\n"
            "print(json.dumps({m: [type(c.pipeline.model).__module__ + '.' + type(c.pipeline.model).__name__,"
            " c.machine.device_type, c.max_num_iterations] for m, c in all_methods.items() if m.startswith('p3d-')}"
            " | {'cuda': torch.cuda.is_available()}))")
    got = json.loads(ns("python", "-c", code).stdout.strip().splitlines()[-1])
    device = "cuda" if got.pop("cuda") else "cpu"
    # real defaults (30k steps); the tests pass small values
    assert got == {"p3d-3dgs": ["splatting.ns_plugin.P3DSplatModelConfig", device, 30000],
                   "p3d-compact3dgs": ["splatting.ns_plugin.P3DCompactModelConfig", device, 30000],
                   "p3d-coherentgs": ["splatting.ns_plugin.P3DCoherentModelConfig", device, 3000]}, got


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {run_dir}"
    acc = EventAccumulator(str(events[-1]))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_training_lowers_the_loss_and_densifies(run):
    loss = _scalars(run["run_dir"], "Train Loss")
    count = _scalars(run["run_dir"], "Train Metrics Dict/gaussian_count")
    assert [s for s, _ in loss] == list(range(0, STEPS, 10)), loss
    first, last = loss[0][1], np.mean([v for _, v in loss[-2:]])
    assert last < 0.7 * first, loss  # measured: 0.29 -> 0.16
    assert count[-1][1] > 1.5 * count[0][1], count  # densified through our rasterizer's meta: 1500 -> ~5700


def _ns_camera(c2w_opencv: np.ndarray, transform: dict) -> np.ndarray:
    """A camera of the scene in the frame nerfstudio trained in (dataparser_transforms.json:
    ``x_ns = scale * (T @ x)``), so that it sees the exported Gaussians as in training."""
    T = np.eye(4)
    T[:3] = np.asarray(transform["transform"])
    c2w = T @ c2w_opencv
    c2w[:3, 3] *= transform["scale"]
    return c2w


def _render_views(run: dict) -> list[float]:
    """PSNR of the exported .ply, read by our reader and rendered by our rasterizer, per scene view."""
    g = Gaussians.load_ply(run["ply"])
    transform = json.loads((run["run_dir"] / "dataparser_transforms.json").read_text())
    scores = []
    for f in load_scene(run["scene"]).frames:
        viewmat = torch.from_numpy(np.linalg.inv(_ns_camera(f.camtoworld, transform))).float()[None]
        rgb, _, _, _ = g.render(viewmat, torch.from_numpy(f.K).float()[None], f.width, f.height,
                                backgrounds=torch.ones(1, 3))
        scores.append(float(psnr(rgb[0].clamp(0, 1), torch.from_numpy(read_image(f.image_path)).float())))
    return scores


def _ply_properties(path: Path) -> list[str]:
    header = path.read_bytes().split(b"end_header")[0].decode("ascii")
    return [line.split()[-1] for line in header.splitlines() if line.startswith("property")]


def test_export_is_a_standard_ply_that_renders_the_views(run):
    assert _ply_properties(run["ply"]) == gaussian_ply_property_names(3)  # the 3DGS layout, SH degree 3
    g = Gaussians.load_ply(run["ply"])
    assert len(g) > 2000 and g.sh_degree == 3
    scores = _render_views(run)
    train = [s for i, s in enumerate(scores) if i % EVAL_EVERY]
    held_out = [s for i, s in enumerate(scores) if i % EVAL_EVERY == 0]
    # the initial Gaussians score ~11.6 dB (nerfstudio's step-0 training PSNR); 60 steps reach ~20.5
    assert np.mean(train) > 17.0, scores
    # nerfstudio's own evaluation of the same held-out views (its renderer: our model's get_outputs
    # on the checkpoint) agrees with ours from the exported file
    assert abs(_ns_eval_psnr(run) - np.mean(held_out)) < 0.2, (_ns_eval_psnr(run), held_out)


def _ns_eval_psnr(run: dict) -> float:
    out = run["tmp"] / "eval.json"
    if not out.is_file():
        ns("ns-eval", "--load-config", run["run_dir"] / "config.yml", "--output-path", out)
    return json.loads(out.read_text())["results"]["psnr"]


def test_compact3dgs_trains_and_exports(compact_run):
    """p3d-compact3dgs: the loss falls, the mask and R-VQ terms are on, and the exported .ply (SH fitted
    to the colour field, the mask and R-VQ applied) renders the held-out views as nerfstudio's evaluation does."""
    loss = _scalars(compact_run["run_dir"], "Train Loss Dict/main_loss")
    assert np.mean([v for _, v in loss[-2:]]) < 0.7 * loss[0][1], loss  # measured: 0.35 -> 0.16
    mask = _scalars(compact_run["run_dir"], "Train Loss Dict/mask_loss")
    assert all(v > 0 for _, v in mask), mask  # 0.05 * mean(sigmoid(mask logits))
    vq = dict(_scalars(compact_run["run_dir"], "Train Loss Dict/vq_loss"))
    assert vq[40] == 0 and vq[50] > 0, vq  # R-VQ from step 48
    assert _ply_properties(compact_run["ply"]) == gaussian_ply_property_names(3)
    scores = _render_views(compact_run)
    held_out = [s for i, s in enumerate(scores) if i % EVAL_EVERY == 0]
    assert np.mean([s for i, s in enumerate(scores) if i % EVAL_EVERY]) > 17.0, scores  # measured ~20
    assert abs(_ns_eval_psnr(compact_run) - np.mean(held_out)) < 0.3, (_ns_eval_psnr(compact_run), held_out)


def test_coherentgs_trains_and_exports(coherent_run):
    """p3d-coherentgs: built at iteration 0 from the 3 training views (one Gaussian per 2x2 pixel block),
    stage 1 lowers the flow error, every optimizer steps the model's own parameters, the loss falls, and
    the exported .ply renders the held-out views far better than the initial Gaussians."""
    run_dir = coherent_run["run_dir"]
    before = _scalars(run_dir, "coherent/flow_px_before_alignment")[0][1]
    after = _scalars(run_dir, "coherent/flow_px_after_alignment")[0][1]
    assert after < before, (before, after)  # measured: 1.56 -> 1.31 px
    loss = _scalars(run_dir, "Train Loss Dict/main_loss")
    assert np.mean([v for _, v in loss[-2:]]) < 0.8 * loss[0][1], loss  # measured: 0.143 -> 0.091
    assert all(v > 0 for _, v in _scalars(run_dir, "Train Loss Dict/disparity_tv_loss"))
    assert all(v > 0 for _, v in _scalars(run_dir, "Train Loss Dict/flow_loss"))
    # nerfstudio built the optimizers on placeholders; the set-up handed them the CoherentModel's parameters
    ckpt = torch.load(sorted((run_dir / "nerfstudio_models").glob("*.ckpt"))[-1], map_location="cpu")
    n = 3 * (60 // COHERENT_STRIDE) * (80 // COHERENT_STRIDE)
    optimizers = ckpt["optimizers"]
    assert sorted(optimizers) == sorted(["decoders", "alignment", "features_dc", "features_rest", "scales", "quats"])
    for name, state in optimizers.items():  # every parameter stepped at every step, with gradients
        assert all(int(s["step"]) == STEPS and s["exp_avg"].abs().max() > 0 for s in state["state"].values()), name
    decoders = [k for k in ckpt["pipeline"] if k.startswith("_model.coherent.decoders.")]
    assert len(optimizers["decoders"]["state"]) == len(decoders) > 0
    assert optimizers["features_dc"]["state"][0]["exp_avg"].shape == (n, 1, 3)
    # the export: the baked Gaussians, all of them, in the 3DGS layout of SH degree 1
    assert _ply_properties(coherent_run["ply"]) == gaussian_ply_property_names(1)
    assert len(Gaussians.load_ply(coherent_run["ply"])) == n
    scores = _render_views(coherent_run)
    held_out = [scores[1], scores[3]]
    # measured: 23.6 and 24.6 dB; ~19.3 after stage 1 and one step; copying the nearest training view: 20.9 and 19.1
    assert np.mean(held_out) > 22.0, scores
