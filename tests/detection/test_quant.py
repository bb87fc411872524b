"""INT8 post-training quantization (detection/quant.py, `p3d quantize`): BatchNorm folding is exact,
the quantizers put values on the INT8 grid they state, the calibrations behave as defined on known
distributions, and an INT8 file written by the command is evaluated by `p3d eval`."""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.config import DetectionConfig
from detection.models.detector import CenterPointDetector
from detection.models.center_head import CenterHeadOutput
from detection.quant import (QuantLayer, _entropy_threshold, _tgpl, calibrate,
                             load_quantized, prepare, qat_finetune, quant_layers, save_quantized)
from detection.structures import DetectionBatch
from perception3d.config import load_config

REPO = Path(__file__).resolve().parents[2]


def model_and_batches(config: str, n: int = 3, seed: int = 0):
    """A detector of `config` with random weights and random BatchNorm statistics (so that folding
    has something to fold), and `n` single-frame batches of random points in its range."""
    torch.manual_seed(seed)
    cfg = load_config(REPO / "configs" / "detection" / config, DetectionConfig)
    model = CenterPointDetector(cfg.model).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    x0, y0, z0, x1, y1, z1 = cfg.model.pc_range_m
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        pts = np.c_[rng.uniform(x0, x0 + 20, 3000), rng.uniform(-10, 10, 3000), rng.uniform(z0, z1, 3000),
                    rng.uniform(0, 1, 3000)].astype(np.float32)
        batches.append(DetectionBatch(torch.from_numpy(pts), torch.tensor([0, len(pts)]), torch.zeros(0, 7),
                                      torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), ("random",)))
    return model, batches


def head_outputs(model, batch):
    sv = model.voxelize(batch)
    bev, _ = model.backbone3d(sv)
    out = model.head(model.bev_backbone(bev))
    return out.heatmap, out.regression()


@pytest.mark.parametrize("config", ["pointpillars.yaml", "second.yaml"])
def test_batchnorm_folding_is_exact(config):
    model, batches = model_and_batches(config, n=1)
    folded = prepare(copy.deepcopy(model))
    assert not [m for m in folded.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    layers = quant_layers(folded)
    assert len(layers) == (35 if config == "pointpillars.yaml" else 37)
    for layer in layers:
        layer.quantize_input = False
    with torch.no_grad():
        for a, b in zip(head_outputs(model, batches[0]), head_outputs(folded, batches[0])):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())


def test_quantizers_put_values_on_their_grid():
    layer = QuantLayer(torch.nn.Conv2d(3, 4, 3), "c")
    layer.set_range(-1.0, 3.0)
    scale, zero = float(layer.a_scale), int(layer.a_zero)
    assert scale == pytest.approx(4 / 255) and zero == round(1 / scale)
    x = torch.linspace(-2, 4, 1001)
    q = layer.fake_quant(x)
    codes = torch.round(q / scale) + zero
    assert torch.allclose(q, (codes - zero) * scale, atol=1e-6)  # on the grid
    assert codes.min() == 0 and codes.max() == 255  # clipped to UINT8
    inside = (x >= -1) & (x <= 3)
    assert float((q - x)[inside].abs().max()) <= scale / 2 + 1e-6
    assert float(layer.fake_quant(torch.zeros(1))) == 0.0  # zero exactly representable
    w8 = layer.weight_int8()
    assert w8.dtype == torch.int8 and int(w8.abs().max()) == 127  # each channel's largest weight -> +-127
    w = layer.layer.weight.detach()
    layer.quantize_weight()
    err = (layer.layer.weight - w).abs().amax((1, 2, 3))
    assert bool((err <= layer.w_scale / 2 + 1e-7).all())


def test_entropy_threshold_known_answers():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(0, 10, 200_000)
    assert _entropy_threshold(uniform) > 9.0  # nothing to clip: the threshold stays near the maximum
    spiky = np.r_[rng.normal(0, 1, 200_000), [60.0]]  # one outlier far out
    assert _entropy_threshold(spiky) < 10.0  # clipped to the bulk
    # the failure LiDAR-PTQ's sparsity-based calibration avoids: on a scattered BEV map (98% zeros)
    # the threshold of all values lands far below the non-zero values' range
    # (post-ReLU features, heavy-tailed): the threshold of all values lands far inside the range of
    # the non-zero ones, clipping the strong responses that mark objects
    sparse_map = np.r_[np.zeros(980_000), rng.exponential(2.0, 20_000)]
    assert _entropy_threshold(sparse_map[sparse_map > 0]) > 0.5 * sparse_map.max()
    assert _entropy_threshold(sparse_map) < 0.1 * sparse_map.max()


@pytest.mark.parametrize("method", ["minmax", "entropy", "sparse"])  # lidar-ptq's file: the command test
def test_calibration_sets_every_layer_and_roundtrips_through_the_file(method, tmp_path):
    model, batches = model_and_batches("pointpillars.yaml", n=2)
    q = prepare(copy.deepcopy(model))
    facts = calibrate(q, batches, method)
    # layers reading one tensor share one input range: the head's shared features feed the 7
    # branches, the last conv of each backbone stage feeds the next stage and its deblock
    branches = [f"head.{b}.0" for b in ("heatmap", "offset", "z", "dims", "rot", "direction", "iou")]
    assert facts["head.heatmap.0"]["group"] == branches
    assert facts["bev_backbone.blocks.1.0"]["group"] == ["bev_backbone.blocks.1.0", "bev_backbone.deblocks.0.0"]
    assert facts["bev_backbone.blocks.0.3"]["group"] == ["bev_backbone.blocks.0.3"]
    layer = {m.name: m for m in quant_layers(q)}
    assert len({(float(layer[b].a_scale), int(layer[b].a_zero)) for b in branches}) == 1
    first = facts["bev_backbone.blocks.0.0"]  # the scattered pillar map: mostly empty
    assert first["zero_fraction"] > 0.9
    if method != "entropy":
        assert first["hi"] >= 0.25 * first["seen_max"]  # decided by the non-zero pillars
    assert all(float(layer.a_scale) > 0 for layer in quant_layers(q))
    with torch.no_grad():
        ref = head_outputs(q, batches[0])
    path = save_quantized(q, tmp_path / "m.safetensors", {"model": {}}, {"method": method})
    fresh, _ = model_and_batches("pointpillars.yaml", n=0, seed=1)
    meta = load_quantized(path, fresh)
    assert meta["info"] == {"method": method}
    with torch.no_grad():
        for a, b in zip(ref, head_outputs(fresh, batches[0])):
            assert torch.equal(a, b)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("bev_backbone.blocks.0.0.weight_int8").dtype == torch.int8
        assert "bev_backbone.blocks.0.0.layer.weight" not in f.keys()


def test_quantize_command_writes_a_model_eval_reads(tmp_path):
    """`p3d quantize` on the shipped SECOND (tiny settings), then `p3d eval` of the INT8 file; bad input."""
    data = tmp_path / "data"
    tiny = ["--set", f"data.root={data}", "--set", "data.synthetic.frames=5", "--set", "data.synthetic.val_fraction=0.4"]
    out = tmp_path / "second_int8.safetensors"
    r = subprocess.run(["p3d", "quantize", "--config", "configs/quickstart.yaml", "--ckpt", "weights/second.safetensors",
                        "--out", str(out), "--calib-frames", "2", "--steps", "3", *tiny], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["method"] == "lidar-ptq" and info["calib_frames"] == 2 and info["layers"] == 37
    assert info["rounding"]["iters"] == 3 and 0 < info["rounding"]["weights_rounded_otherwise"] < 0.5
    assert out.stat().st_size < 0.6 * (REPO / "weights" / "second.safetensors").stat().st_size * 2
    r = subprocess.run(["p3d", "eval", "--config", "configs/quickstart.yaml", "--ckpt", str(out), "--out",
                        str(tmp_path / "eval"), "--set", "eval.num_pictures=0", *tiny], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["quantization"]["method"] == "lidar-ptq"
    assert result["metrics"]["diag/Car/3d_recall/moderate"] > 50  # the INT8 SECOND still finds the cars
    qat = tmp_path / "second_qat.safetensors"
    r = subprocess.run(["p3d", "quantize", "--config", "configs/quickstart.yaml", "--ckpt", "weights/second.safetensors",
                        "--out", str(qat), "--calib-frames", "2", "--method", "qat", "--steps", "1", *tiny], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["method"] == "qat" and info["qat"]["steps"] == 1 and np.isfinite(info["qat"]["loss_first"])
    for change, message in [
        ({"--method": "fancy"}, "--method 'fancy': expected one of lidar-ptq, sparse, minmax, entropy, qat"),
        ({"--config": "configs/splatting/3dgs_quickstart.yaml"}, "quantization is for detectors"),
        ({"--config": "configs/detection/pointpillars.yaml"}, "trained with another model config"),
    ]:
        opts = {"--config": "configs/quickstart.yaml", "--ckpt": "weights/second.safetensors",
                "--out": str(tmp_path / "x.safetensors"), **change}
        cmd = ["p3d", "quantize", *[a for kv in opts.items() for a in kv], *tiny]
        bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert not (tmp_path / "x.safetensors").exists()


def test_dense_part_runs_on_onnxruntime_int8_kernels(tmp_path):
    """The calibrated dense part exported as QDQ ONNX: onnxruntime turns it into INT8 convolutions
    (QLinearConv in its optimized graph), and its outputs match the simulated INT8 model's."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from detection.quant import OrtDense, export_dense_onnx

    model, batches = model_and_batches("pointpillars.yaml", n=2)
    q = prepare(copy.deepcopy(model))
    with torch.no_grad():
        calibrate(q, batches, "sparse")
    path = export_dense_onnx(q, tmp_path / "dense.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # every convolution but the 7 output layers (whose maps leave the graph in float): 27 of 34,
    # the transposed ones included (written as 1x1 convolution + depth-to-space)
    assert ops.count("QLinearConv") == 27 and "ConvTranspose" not in ops, sorted(set(ops))
    with torch.no_grad():
        sim = head_outputs(q, batches[0])
        q.dense = OrtDense(q)
        bev = q.backbone3d(q.voxelize(batches[0]))[0]
        real = q.dense(bev)
    for a, b in zip(sim, (real.heatmap, real.regression())):
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) < 0.05 * scale  # rounding differs (requantization between layers)
        assert float((a - b).abs().mean()) < 0.005 * scale


def test_tgpl_known_answer():
    """The task-guided global positive loss at a known positive: the class-score difference over
    the 3x3 cells around it plus the L1 difference of the regression maps at it; nothing counts
    away from the positives."""
    from types import SimpleNamespace

    from detection.quant import _positives

    H, W = 8, 10

    def out():
        zeros = {k: torch.zeros(1, c, H, W) for k, c in
                 (("offset", 2), ("z", 1), ("dims", 3), ("rot", 2), ("direction", 1), ("iou", 1))}
        return CenterHeadOutput(heatmap=torch.full((1, 3, H, W), -5.0), **zeros)

    ref, q = out(), out()
    ref.heatmap[0, 0, 3, 4] = 2.0
    q.heatmap[0, 0, 3, 4] = 0.0
    q.heatmap[0, 1, 2, 5] = 1.0  # a neighbour of the positive, another class
    q.offset[0, 0, 3, 4] = 0.5
    q.rot[0, 1, 3, 4] = -0.25
    q.dims[0, 2, 7, 9] = 3.0  # far from the positive: not counted
    q.heatmap[0, 2, 7, 0] = 4.0
    model = SimpleNamespace(head=SimpleNamespace(options=SimpleNamespace(max_detections=5, score_threshold=0.1)))
    frame, cells = _positives(model, ref)
    assert frame.tolist() == [0] and cells.tolist() == [3 * W + 4]
    s = torch.sigmoid
    expected = (s(torch.tensor(0.0)) - s(torch.tensor(2.0))) ** 2 + (s(torch.tensor(1.0)) - s(torch.tensor(-5.0))) ** 2 \
        + 0.5 + 0.25
    assert float(_tgpl(q, ref, frame, cells)) == pytest.approx(float(expected), rel=1e-6)
    assert float(_tgpl(ref, ref, frame, cells)) == 0.0


def test_adaptive_rounding_moves_weights_one_step_at_most():
    """LiDAR-PTQ's adaptive rounding with the TGPL against round-to-nearest on the same calibrated
    ranges: the activation ranges are the same, each weight ends on its grid at most one INT8 step
    from its nearest rounding (down or up), some weights move, and the losses are logged."""
    model, batches = model_and_batches("pointpillars.yaml", n=2)
    nearest = prepare(copy.deepcopy(model))
    calibrate(nearest, batches, "sparse", search="none")  # the ranges do not matter here: skip the search
    learnt = prepare(copy.deepcopy(model))
    facts = calibrate(learnt, batches, "lidar-ptq", rounding_iters=8, search="none")
    moved = 0
    for a, b in zip(quant_layers(nearest), quant_layers(learnt)):
        assert torch.equal(a.a_scale, b.a_scale) and torch.equal(a.a_zero, b.a_zero)
        w = b.layer.weight.detach()
        shape = [1] * w.dim()
        shape[1 if isinstance(b.layer, torch.nn.ConvTranspose2d) else 0] = -1
        assert torch.allclose(w / b.w_scale.reshape(shape), b.weight_int8().float(), atol=1e-3), b.name
        step = (a.weight_int8().int() - b.weight_int8().int()).abs()
        assert int(step.max()) <= 1, a.name
        moved += int(step.sum())
        if not b.name.startswith(("bev_backbone", "head")):  # the pillar encoder keeps its nearest rounding
            assert int(step.max()) == 0, b.name
    info = facts["_rounding"]
    assert moved > 0 and info["iters"] == 8
    assert info["weights_rounded_otherwise"] == pytest.approx(moved / sum(
        m.w_float.numel() for m in quant_layers(learnt) if m.name.startswith(("bev_backbone", "head"))))
    assert all(np.isfinite(info[k]) for k in ("recon_first", "recon_last", "tgpl_first", "tgpl_last"))


def test_qat_finetune_trains_the_int8_model_and_ends_on_the_grid():
    """Two quantization-aware steps: the loss is finite, the weights move and end on their INT8
    grid, the model is back in eval mode."""
    model, batches = model_and_batches("pointpillars.yaml", n=2)
    q = prepare(copy.deepcopy(model))
    calibrate(q, batches, "sparse")
    before = {m.name: m.weight_int8().clone() for m in quant_layers(q)}
    log = qat_finetune(q, batches, lr=1e-2)
    assert log["steps"] == 2 and np.isfinite(log["loss_first"]) and not q.training
    changed = 0
    for m in quant_layers(q):
        w = m.layer.weight.detach()
        shape = [1] * w.dim()
        shape[1 if isinstance(m.layer, torch.nn.ConvTranspose2d) else 0] = -1
        grid = w / m.w_scale.reshape(shape)
        assert torch.allclose(grid, grid.round(), atol=1e-3) and float(grid.abs().max()) <= 127 + 1e-3, m.name
        changed += int((m.weight_int8() != before[m.name]).sum())
    assert changed > 0
