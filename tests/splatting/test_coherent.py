"""CoherentGS (splatting/coherent/): the sparse-view rule, flow and its masks, plane-sweep depth against
ray-cast ground truth, depth from a folder and from networks we write (ONNX and TorchScript),
depth layers, the structured Gaussians, stage-1 alignment, and the commands (synthetic and an
LLFF scene laid out as published)."""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perception3d.config import load_config
from perception3d.errors import ConfigError, DataError
from splatting.coherent.depth import (align_disparity, fill_and_smooth, initial_depths, model_disparity,
                                      pixel_rays, project)
from splatting.coherent.flow import epipolar_distance, forward_backward_mask, optical_flow, pair_flows
from splatting.coherent.model import CoherentModel, CoherentOptions, depth_layers, tv_loss
from splatting.coherent.nets import load_net
from splatting.coherent.train import align, build, flow_errors, interpolate_pose
from splatting.config import SplatConfig
from splatting.data import SplatDataset, load_scene, write_synthetic_scene
from splatting.data.synthetic import cast_rays, make_synthetic_scene, orbit_cameras
from splatting.gaussians import Gaussians

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "splatting" / "coherentgs_synthetic.yaml"
# the test scene: the config's scene (40-degree arc) at 100x75 with 9 views: test views 0 and 8,
# training views 1, 4, 7 by the sparse-view rule
SCENE = dict(seed=0, num_views=9, width=100, height=75, num_points=500, arc_deg=40.0)


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory) -> Path:
    return write_synthetic_scene(tmp_path_factory.mktemp("coherent") / "scene", **SCENE)


def config(root: Path, *sets: str) -> SplatConfig:
    return load_config(CONFIG, SplatConfig, [f"data.root={root}", "data.synthetic=null", "train.progress=false",
                                             "train.device=cpu", *sets])


@pytest.fixture(scope="module")
def views(scene_root):
    """The 3 training views: images, cameras and their ray-cast ground-truth z-depth."""
    ds = SplatDataset(load_scene(scene_root), "train", train_views=3).preload()
    images = torch.stack([ds[i].image for i in range(len(ds))])
    viewmats, Ks = ds.cameras()
    scene = make_synthetic_scene(SCENE["seed"])
    H, W = images.shape[1:3]
    gt = []
    for v in range(len(ds)):
        c2w = ds.frames[v].camtoworld
        rays = pixel_rays(Ks[v], H, W).double().numpy().reshape(-1, 3) @ c2w[:3, :3].T
        norm = np.linalg.norm(rays, axis=1)
        t, _, _ = cast_rays(scene, c2w[None, :3, 3], rays / norm[:, None])
        gt.append((t / norm).reshape(H, W))
    return ds, images, viewmats, Ks, np.stack(gt).astype(np.float32)


# --- data -----------------------------------------------------------------------------------------
def test_sparse_view_rule_picks_first_last_and_evenly_between(scene_root):
    scene = load_scene(scene_root)
    full = SplatDataset(scene, "train", test_every=4)  # 9 frames: 0, 4, 8 held out; 6 to train on
    assert [f.name for f in full.frames] == ["0001.png", "0002.png", "0003.png", "0005.png", "0006.png", "0007.png"]
    for k, want in ((2, ["0001.png", "0007.png"]), (3, ["0001.png", "0003.png", "0007.png"]),
                    (4, ["0001.png", "0003.png", "0005.png", "0007.png"])):
        assert [f.name for f in SplatDataset(scene, "train", test_every=4, train_views=k).frames] == want
    test = SplatDataset(scene, "test", test_every=4, train_views=3)
    assert [f.name for f in test.frames] == ["0000.png", "0004.png", "0008.png"]  # the held-out views stay
    with pytest.raises(DataError, match=r"train_views=7: the scene has only 6 training views"):
        SplatDataset(scene, "train", test_every=4, train_views=7)
    with pytest.raises(ConfigError, match=r"data.train_views=0"):
        config(scene_root, "data.train_views=0")


def test_arc_cameras_and_the_full_ring_unchanged():
    ring = orbit_cameras(12, 40, 30, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(ring, orbit_cameras(12, 40, 30, seed=3, arc_deg=360.0)))
    arc = orbit_cameras(12, 40, 30, seed=3, arc_deg=40.0)
    az = np.degrees(np.unwrap([math.atan2(c[1, 3], c[0, 3]) for c, _ in arc]))
    assert 30 < az.max() - az.min() < 40
    el = np.degrees([math.asin((c[2, 3] - 0.35) / np.linalg.norm(c[:3, 3] - [0, 0, 0.35])) for c, _ in arc])
    assert el.max() - el.min() < 40 * 40 / 360 + 1  # the elevation range shrinks with the arc


# --- flow -----------------------------------------------------------------------------------------
def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).random((h, w, 3))
    return np.clip(gaussian_filter(noise, (1.5, 1.5, 0)) * 3 - 1, 0, 1).astype(np.float32)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_recovers_a_known_shift(method):
    big = _texture(100, 140)
    a, b = big[10:90, 10:130], big[7:87, 15:135]  # b's pixel (x, y) shows a's (x + 5, y - 3)
    flow = optical_flow(a, b, method)
    inner = flow[15:-15, 15:-15]
    np.testing.assert_allclose(np.median(inner.reshape(-1, 2), 0), [-5.0, 3.0], atol=0.2)
    assert (np.abs(inner - [-5.0, 3.0]).max(-1) < 1.0).mean() > 0.9


def test_forward_backward_mask():
    H, W = 20, 30
    fwd = np.zeros((H, W, 2), np.float32)
    fwd[..., 0] = 3.0
    back = -fwd.copy()
    mask = forward_backward_mask(fwd, back)
    assert mask[:, :W - 3].all() and not mask[:, W - 2:].any()  # flows leaving the image fail
    back[5:10, 10:20] = [4.0, 0.0]  # where forward lands there, going back does not return
    bad = forward_backward_mask(fwd, back)
    assert not bad[5:10, 8:16].any() and bad[:5, :W - 3].all()


# --- depth ----------------------------------------------------------------------------------------
def test_plane_sweep_against_ray_cast_depth(views):
    """The plane sweep's kept depths and the filled map, against the scene's exact depth."""
    ds, images, viewmats, Ks, gt = views
    flows = pair_flows([im.numpy() for im in images], viewmats=viewmats, Ks=Ks)
    init = initial_depths(images, viewmats, Ks, flows, CoherentOptions(), [f.name for f in ds.frames])
    hit = np.isfinite(gt)
    rel = np.abs(init.depth - gt) / np.where(hit, gt, 1.0)
    kept = init.kept & hit
    assert kept.mean() > 0.2, kept.mean()
    assert np.median(rel[kept]) < 0.015 and (rel[kept] < 0.05).mean() > 0.85
    assert np.median(rel[hit]) < 0.03 and (rel[hit] < 0.05).mean() > 0.7
    assert (init.near < gt[hit].min()).all() and (init.far > np.median(gt[hit])).all()
    # the flow error with the exact depth: the flow agrees with the geometry
    for (i, j), (flow, mask) in list(flows.items())[:2]:
        H, W = gt.shape[1:]
        pts = (pixel_rays(Ks[i], H, W) * torch.from_numpy(gt[i])[..., None]) @ torch.linalg.inv(viewmats[i])[:3, :3].T \
            + torch.linalg.inv(viewmats[i])[:3, 3]
        uv, _ = project(pts, viewmats[j], Ks[j])
        ys, xs = np.mgrid[0:H, 0:W] + 0.5
        true_flow = uv.numpy() - np.stack([xs, ys], -1)
        err = np.linalg.norm(true_flow - flow, axis=-1)
        assert np.median(err[mask & hit[i]]) < 1.5
        # the epipolar check: the true flow lies on the epipolar lines; moved off them, it is that far
        on = epipolar_distance(true_flow, viewmats[i], Ks[i], viewmats[j], Ks[j])
        assert np.median(on[hit[i]]) < 1e-3
        normal = np.stack([-true_flow[..., 1], true_flow[..., 0]], -1)  # not the line's normal in general
        off = epipolar_distance(true_flow + 3.0 * normal / np.linalg.norm(normal, axis=-1, keepdims=True),
                                viewmats[i], Ks[i], viewmats[j], Ks[j])
        assert np.median(off[hit[i]]) > 1.0


def test_fill_prefers_the_far_side_and_median_keeps_edges():
    depth = np.ones((10, 12), np.float32)
    depth[:, 6:] = 5.0
    valid = np.ones_like(depth, bool)
    valid[:, 5] = False  # a hole on the edge between near (1) and far (5): the far side wins the tie
    valid[:3, 1:3] = False  # a hole inside the near side: filled from it
    filled = fill_and_smooth(depth, valid, median=1)
    np.testing.assert_array_equal(filled[:, 5], 5.0)
    np.testing.assert_array_equal(filled[:, :5], 1.0)
    spiky = depth.copy()
    spiky[2, 3] = spiky[7, 9] = 9.0
    smooth = fill_and_smooth(spiky, np.ones_like(valid))
    np.testing.assert_array_equal(smooth, depth)  # isolated spikes removed, the edge kept
    with pytest.raises(DataError, match="no valid depth"):
        fill_and_smooth(depth, np.zeros_like(valid))


def test_align_disparity_recovers_scale_and_offset_despite_outliers():
    rng = np.random.default_rng(0)
    src = rng.uniform(0.1, 1.0, (40, 50)).astype(np.float32)
    target = 2.5 * src + 0.3
    target[:4] += 5.0  # 8 % outliers
    a, b = align_disparity(src, target, np.ones_like(src, bool))
    assert a == pytest.approx(2.5, abs=1e-4) and b == pytest.approx(0.3, abs=1e-4)
    with pytest.raises(DataError, match="too few"):
        align_disparity(src, target, np.zeros_like(src, bool))


def test_depth_from_a_folder_is_aligned_to_the_plane_sweep(views, tmp_path):
    """Depth maps at the wrong scale (x 3, as a relative depth would be), as .npy and 16-bit .png: the
    per-view alignment brings them to the scene's scale, closer to the truth than the plane sweep."""
    ds, images, viewmats, Ks, gt = views
    names = [f.name for f in ds.frames]
    far = 50.0  # background: far away
    for v, name in enumerate(names):
        d = np.where(np.isfinite(gt[v]), gt[v], far) * 3.0
        if v == 0:
            Image.fromarray((d * 1000).astype(np.uint16)).save(tmp_path / f"{Path(name).stem}.png")
        else:
            np.save(tmp_path / f"{Path(name).stem}.npy", d)
    flows = pair_flows([im.numpy() for im in images], viewmats=viewmats, Ks=Ks)
    init = initial_depths(images, viewmats, Ks, flows, CoherentOptions(depth_source="folder", depth_folder=str(tmp_path)),
                          names)
    hit = np.isfinite(gt)
    rel = np.abs(init.depth - gt) / gt
    assert init.source == "folder" and np.median(rel[hit]) < 0.01
    (tmp_path / f"{Path(names[1]).stem}.npy").unlink()
    with pytest.raises(DataError, match=rf"no depth for view '{names[1]}' \(expected {Path(names[1]).stem}.npy"):
        initial_depths(images, viewmats, Ks, flows, CoherentOptions(depth_source="folder", depth_folder=str(tmp_path)),
                       names)


class _ConstantNet(torch.nn.Module):
    """A stand-in 'network' that returns a stored map whatever its input (shape checked)."""

    def __init__(self, out: torch.Tensor, inputs: int):
        super().__init__()
        self.register_buffer("out", out)
        self.inputs = inputs

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.out + 0 * sum(t.mean() for t in (x, *rest))  # every input used: ONNX keeps them


def _export(module: torch.nn.Module, example: tuple, path: Path) -> Path:
    if path.suffix == ".onnx":
        torch.onnx.export(module, example, str(path), dynamo=False)
    else:
        torch.jit.trace(module, example).save(str(path))
    return path


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_monocular_depth_network_from_a_local_file(views, tmp_path, suffix):
    """A network file (ONNX / TorchScript) whose output is a relative disparity (the true one / 4 at
    the network's 32 x 32 resolution): read with the documented convention, aligned per view."""
    ds, images, viewmats, Ks, gt = views
    v = 0
    disp = torch.from_numpy(1.0 / np.where(np.isfinite(gt[v]), gt[v], 50.0))[None, None].float()
    small = torch.nn.functional.interpolate(disp, size=(32, 32), mode="bilinear", align_corners=False)[0] / 4.0
    path = _export(_ConstantNet(small, 1), (torch.zeros(1, 3, 32, 32),), tmp_path / f"depth{suffix}")
    net = load_net(path, "coherent.depth_model")
    out = model_disparity(net, images[v].numpy(), 32, "disparity")
    assert out.shape == gt[v].shape
    hit = np.isfinite(gt[v])
    a, b = align_disparity(out, 1.0 / np.where(hit, gt[v], 1.0), hit)
    assert a == pytest.approx(4.0, rel=0.05)
    flows = pair_flows([im.numpy() for im in images], viewmats=viewmats, Ks=Ks)
    init = initial_depths(images, viewmats, Ks, flows, CoherentOptions(depth_source="model", depth_model=str(path),
                                                                   depth_model_input=32), [f.name for f in ds.frames])
    rel = np.abs(init.depth[v] - gt[v]) / np.where(hit, gt[v], 1.0)
    assert np.median(rel[hit]) < 0.05  # the same map for every view: only view 0's is right
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"coherent.depth_model=.*bad.onnx: not a loadable ONNX model"):
        load_net(tmp_path / "bad.onnx", "coherent.depth_model")
    with pytest.raises(DataError, match=r"coherent.flow_model=.*missing.pt: file not found"):
        load_net(tmp_path / "missing.pt", "coherent.flow_model")


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_flow_network_from_a_local_file(tmp_path, suffix):
    """A flow 'network' returning a known [1, 2, 24, 32] field: cropped back to the 20 x 30 images."""
    field = torch.randn(1, 2, 24, 32)
    path = _export(_ConstantNet(field, 2), (torch.zeros(1, 3, 24, 32), torch.zeros(1, 3, 24, 32)),
                   tmp_path / f"flow{suffix}")
    img = _texture(20, 30)
    flow = optical_flow(img, img, net=load_net(path, "coherent.flow_model"))
    np.testing.assert_allclose(flow, field[0, :, :20, :30].permute(1, 2, 0).numpy(), atol=1e-6)


# --- model ----------------------------------------------------------------------------------------
def test_depth_layers_break_only_at_depth_edges():
    ramp = np.tile(np.linspace(2.0, 3.0, 30, dtype=np.float32), (20, 1))  # one continuous slope
    assert (depth_layers(ramp, 4, 0.05) == 0).all()
    two = ramp.copy()
    two[:, 15:] += 3.0  # a box in front of a far wall
    layers = depth_layers(two, 4, 0.05)
    assert len(np.unique(layers)) == 2 and (layers[:, :15] == layers[0, 0]).all() and (layers[:, 15:] == layers[0, -1]).all()


def test_tv_loss_known_values():
    alpha = torch.ones(4, 5)
    assert float(tv_loss(torch.full((4, 5), 2.0), alpha)) == 0.0
    ramp = torch.arange(5.0)[None].repeat(4, 1) + 1.0  # mean 3, steps of 1 along x
    assert float(tv_loss(ramp, alpha)) == pytest.approx(1.0 / 3.0)
    alpha[:, 2:] = 0  # only covered neighbours count
    assert float(tv_loss(ramp, alpha)) == pytest.approx(1.0 / 1.5)


def test_interpolated_pose():
    a = torch.eye(4, dtype=torch.float64)
    b = torch.eye(4, dtype=torch.float64)
    t = math.radians(40)
    b[:3, :3] = torch.tensor([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    b[:3, 3] = torch.tensor([2.0, 0, 0])
    torch.testing.assert_close(interpolate_pose(a, b, 0.0), a)
    torch.testing.assert_close(interpolate_pose(a, b, 1.0), b)
    mid = interpolate_pose(a, b, 0.5)
    assert math.degrees(math.atan2(mid[1, 0], mid[0, 0])) == pytest.approx(20.0)
    torch.testing.assert_close(mid[:3, 3], torch.tensor([1.0, 0, 0], dtype=torch.float64))


def test_gaussians_sit_on_their_pixel_rays(views):
    ds, images, viewmats, Ks, gt = views
    depth = [np.where(np.isfinite(g), g, 20.0).astype(np.float32) for g in gt]
    opts = CoherentOptions(stride=2)
    m = CoherentModel(list(images), list(torch.linalg.inv(viewmats)), list(Ks), depth, opts, 1, 0.5, 1.0)
    H, W = gt.shape[1:]
    h, w = H // 2, W // 2
    assert m.counts == [h * w] * 3
    g = m.gaussians()
    assert g["means"].shape == (3 * h * w, 3) and g["shN"].shape == (3 * h * w, 3, 3)
    for v in range(3):
        uv, z = project(m.view_means(v), viewmats[v], Ks[v])
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * 2, (torch.arange(w) + 0.5) * 2, indexing="ij")
        torch.testing.assert_close(uv, torch.stack([xs, ys], -1).reshape(-1, 2), atol=1e-3, rtol=0)
        torch.testing.assert_close(z, torch.from_numpy(depth[v][0::2, 0::2][:h, :w]).reshape(-1), rtol=1e-5, atol=0)
    # the footprint: the scale covers the stride at the Gaussian's depth, and follows it
    z0 = m.depth_map(0).reshape(-1)
    torch.testing.assert_close(g["scales"][: h * w, 0].exp(), z0 * 2 / Ks[0, 0, 0], rtol=1e-4, atol=0)
    with torch.no_grad():
        m.log_a[0] = math.log(0.5)  # half the disparity: twice as far, twice as large
    torch.testing.assert_close(m.depth_map(0).reshape(-1), 2 * z0)
    assert torch.sigmoid(g["opacities"]).sub(0.5).abs().max() < 1e-6  # the decoder starts at zero residual


def test_stage_one_alignment_undoes_a_wrong_depth_scale(scene_root):
    """Initial depths 1.4x too far (disparity scale 1/1.4): stage 1 brings the flow error down and
    the disparity scale to about 1.4."""
    cfg = config(scene_root, "data.synthetic=null", "data.test_every=4", "coherent.align_steps=300")
    st = build(cfg)
    with torch.no_grad():
        st.model.log_a.fill_(math.log(1 / 1.4))
    before, after = align(cfg, st)
    assert before > 3 * after and after < 1.5
    np.testing.assert_allclose(st.model.log_a.detach().exp().numpy() * (1 + st.model.b.detach().numpy()), 1.0,
                               atol=0.15)  # the disparity at its mean: back to the plane sweep's
    with torch.no_grad():
        errs = flow_errors([st.model.view_means(v) for v in range(3)], st.viewmats, st.Ks, st.flow_targets)
    assert float(errs.median()) == pytest.approx(after, rel=1e-4)


def test_config_errors(scene_root):
    with pytest.raises(ConfigError, match="compact and coherent"):
        config(scene_root, "compact={}")
    with pytest.raises(ConfigError, match=r"coherent.depth_folder=None: expected a folder"):
        config(scene_root, "coherent.depth_source=folder")
    with pytest.raises(ConfigError, match=r"coherent.mvs_window=4"):
        config(scene_root, "coherent.mvs_window=4")
    with pytest.raises(ConfigError, match=r"data.synthetic.arc_deg=0"):
        config(scene_root, "data.synthetic={arc_deg: 0}")
    with pytest.raises(ConfigError, match=r"CoherentGS needs at least 2 training views"):
        build(config(scene_root, "data.train_views=1"))


# --- commands -------------------------------------------------------------------------------------
def run_tool(*args: str) -> subprocess.CompletedProcess:
    """``p3d ARGS`` as typed on the command line, from the repository root."""
    return subprocess.run([sys.executable, "-m", "p3d", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _llff_published(src: Path, root: Path) -> Path:
    """The synthetic scene written as an LLFF scene is published: poses_bounds.npy for 8x larger
    images and only the 1/8 folder, images_8/."""
    frames = sorted(load_scene(src).frames, key=lambda f: f.name)
    rows = []
    for f in frames:  # OpenCV (right, down, forward) -> LLFF (down, right, backward) columns, full size x 8
        c = f.camtoworld
        pose = np.stack([c[:3, 1], c[:3, 0], -c[:3, 2], c[:3, 3], [8 * f.height, 8 * f.width, 8 * f.K[0, 0]]], 1)
        rows.append(np.concatenate([pose.ravel(), [1.0, 10.0]]))
    (root / "images_8").mkdir(parents=True)
    np.save(root / "poses_bounds.npy", np.asarray(rows))
    for f in frames:
        Image.open(f.image_path).save(root / "images_8" / f"IMG_{f.name[:4]}.png")
    return root


def test_llff_one_command_views_3_then_eval_view_and_resume(scene_root, tmp_path):
    """The README's LLFF command on an LLFF-layout scene: `--data` and `--views 3`, a few steps; the
    run's files, the Gaussian count, then `p3d eval` of the run, `p3d view` and a `--resume` to more steps."""
    root = _llff_published(scene_root, tmp_path / "llff")
    readme = (ROOT / "README.md").read_text()
    typed = shlex.split(re.search(r"`(p3d train --config configs/splatting/coherentgs_llff.yaml --data \S+ --views 3)`",
                                  readme).group(1))
    llff = ROOT / typed[3]
    out = tmp_path / "run"
    sets = ["--set", "train.max_steps=20", "--set", "train.ckpt_every=10", "--set", "train.progress=false",
            "--set", "coherent.align_steps=20"]
    argv = typed[1:]
    argv[argv.index("--data") + 1] = str(root)  # the README's command, on the scene written here
    r = run_tool(*argv, "--out", str(out), *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "metrics.json").read_text())
    assert res["train_view_names"] == ["IMG_0001.png", "IMG_0004.png", "IMG_0007.png"]
    m = res["metrics"]
    assert m["views"] == 2 and 12 < m["psnr"] < 60 and m["num_gaussians"] == 3 * 37 * 50
    assert len(Gaussians.load_ply(out / "point_cloud.ply")) == 3 * 37 * 50
    assert sorted(p.name for p in (out / "inputs").iterdir()) == ["IMG_0001.png", "IMG_0004.png", "IMG_0007.png"]
    assert Image.open(out / "inputs" / "IMG_0001.png").size == (300, 75)  # view | initial depth | trained depth
    assert "Input views (CoherentGS)" in (out / "report.html").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stage1 = next(e for e in log if "flow_px_before_alignment" in e)
    assert stage1["step"] == 0 and stage1["flow_px_after_alignment"] < stage1["flow_px_before_alignment"] + 0.5
    e = run_tool("eval", "--config", str(llff), "--data", str(root), "--ckpt", str(out), "--out", str(tmp_path / "ev"))
    assert e.returncode == 0, e.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["psnr"] == pytest.approx(m["psnr"],
                                                                                                         abs=1e-3)
    shot = tmp_path / "view.png"  # the viewer shows the run like any splatting run: Gaussians and cameras
    v = run_tool("view", str(out), "--screenshot", str(shot), "--size", "320x240")
    assert v.returncode == 0, v.stderr[-3000:]
    assert np.asarray(Image.open(shot).convert("L")).std() > 5  # not a blank picture
    more = [a if a != "train.max_steps=20" else "train.max_steps=30" for a in sets]
    r2 = run_tool("train", "--config", str(llff), "--data", str(root), "--views", "3", "--out", str(out), "--resume",
                  *more)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "stage 1" not in r2.stdout + r2.stderr  # resumed after the alignment
    assert json.loads((out / "metrics.json").read_text())["step"] == 30


def test_missing_depth_and_flow_files_stop_before_any_work(scene_root, tmp_path):
    for sets, message in ((["coherent.depth_source=folder", f"coherent.depth_folder={tmp_path / 'none'}"],
                           r"coherent.depth_folder=.*none: folder not found"),
                          (["coherent.depth_source=model", f"coherent.depth_model={tmp_path / 'd.onnx'}"],
                           r"coherent.depth_model=.*d.onnx: file not found"),
                          ([f"coherent.flow_model={tmp_path / 'f.pt'}"], r"coherent.flow_model=.*f.pt: file not found")):
        with pytest.raises(DataError, match=message):
            build(config(scene_root, *sets))
