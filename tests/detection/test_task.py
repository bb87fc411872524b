"""The detection experiment end to end: samples, augmentation, evaluation plumbing, train/eval CLI."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.data import AugmentConfig, DetectionDataset, _augment, frame_targets
from detection.evaluation import _MISSED_COLUMNS, evaluate_detections, write_missed
from detection.predictions import read_predictions, write_predictions
from detection.task import evaluate_model, predict
from perception3d.errors import DataError
from perception3d.io.kitti import read_label
from perception3d.geometry.boxes import points_in_boxes_count
from perception3d.structures import Boxes3D, Detections3D
from perception3d.synthetic.dataset import write_kitti_dataset

ROOT = Path(__file__).resolve().parents[2]
PC_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "kitti"
    write_kitti_dataset(root, num_frames=4, seed=3, image_sets={"train": [0, 1, 2], "val": [3]})
    return root


def test_augmentation_keeps_every_point_in_its_box(synthetic_root):
    sample = DetectionDataset(synthetic_root, "train", PC_RANGE)[0]
    pts, boxes = sample.points, sample.gt_boxes
    before = points_in_boxes_count(torch.from_numpy(pts), torch.from_numpy(boxes))
    assert before.sum() > 100  # the frame has objects with points on them
    cfg = AugmentConfig(flip_y=True, rotation_rad=(-0.785, 0.785), scale=(0.95, 1.05))
    for seed in range(4):
        p2, b2 = _augment(pts, boxes, np.random.default_rng(seed), cfg)
        after = points_in_boxes_count(torch.from_numpy(p2), torch.from_numpy(b2))
        # boundary points may flip in or out through float rounding; nothing else may change
        assert (after - before).abs().max() <= 2
        assert np.all(np.abs(b2[:, 6]) <= np.pi + 1e-6)
        np.testing.assert_allclose(np.linalg.norm(b2[:, :2], axis=1) / np.linalg.norm(boxes[:, :2], axis=1),
                                   b2[:, 3] / boxes[:, 3], rtol=1e-4)  # one global scale for all


class _GroundTruthModel(torch.nn.Module):
    """Returns each frame's ground truth as detections (score 1): evaluation must give AP 100."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        out = []
        for b in range(batch.batch_size):
            a, e = batch.gt_offsets[b].item(), batch.gt_offsets[b + 1].item()
            out.append(Detections3D(Boxes3D(batch.gt_boxes[a:e]), torch.ones(e - a), batch.gt_labels[a:e]))
        return out


def _valid_moderate_cars(ds: DetectionDataset) -> int:
    """Cars valid at moderate by the devkit's rules: 2D box taller than 25 px, occlusion <= 1,
    truncation <= 0.30."""
    n = 0
    for i in range(len(ds)):
        lab = ds.kitti.labels(i)
        h = lab.bbox2d[:, 3] - lab.bbox2d[:, 1]
        n += int(((lab.names == "Car") & (h > 25) & (lab.occluded <= 1) & (lab.truncated <= 0.30)).sum())
    return n


def test_evaluate_model_on_ground_truth(synthetic_root):
    """Every object found exactly, every score 1: the official curve has one threshold per valid
    object (n <= 40), precision 1 at positions 0..n-1: R40 = (n - 1) / 40 (the devkit's few-objects
    result, not 100). The highest recall is 100, and so is nuScenes' AP."""
    val = DetectionDataset(synthetic_root, "train", PC_RANGE)
    ev, dets = evaluate_model(_GroundTruthModel(), val)
    metrics, n = ev.metrics, _valid_moderate_cars(val)
    assert len(dets) == 3 and 2 <= n <= 40
    for metric in ("3d", "bev"):
        assert metrics[f"Car/{metric}_R40/moderate"] == pytest.approx(100 * (n - 1) / 40)
    assert metrics["diag/Car/3d_recall/moderate"] == pytest.approx(100.0)
    assert metrics["nuscenes/Car/AP"] == pytest.approx(100.0)
    assert metrics["nuscenes/mATE"] < 0.01 and metrics["nuscenes/mASE"] < 0.01


def test_write_missed_lists_a_dropped_car(synthetic_root, tmp_path):
    ds = DetectionDataset(synthetic_root, "train", PC_RANGE)
    dets = predict(_GroundTruthModel(), ds)
    ev = evaluate_detections(ds.kitti, dets, ds.classes, interval_draws=10)
    assert write_missed(ds.kitti, ev, tmp_path / "none.csv") == 0
    assert (tmp_path / "none.csv").read_text().splitlines() == [",".join(_MISSED_COLUMNS)]
    frame = ds.kitti[0]
    boxes, labels, _ = frame_targets(frame, ds.classes)
    lab = ds.kitti.labels(0)
    valid = [k for k in range(len(lab)) if lab.names[k] == "Car" and lab.bbox2d[k, 3] - lab.bbox2d[k, 1] > 25
             and lab.occluded[k] <= 1 and lab.truncated[k] <= 0.30]
    car = torch.from_numpy(frame.boxes_lidar[valid[0]]).float()
    d = dets[0]
    keep = (d.boxes.tensor[:, :3] - car[:3]).norm(dim=1) > 1e-3  # drop the box of that car
    assert int((~keep).sum()) == 1
    dets[0] = Detections3D(Boxes3D(d.boxes.tensor[keep]), d.scores[keep], d.labels[keep])
    ev = evaluate_detections(ds.kitti, dets, ds.classes, interval_draws=10)
    assert write_missed(ds.kitti, ev, tmp_path / "missed.csv") == 1
    rows = list(csv.DictReader((tmp_path / "missed.csv").open()))
    assert len(rows) == 1 and rows[0]["frame_id"] == str(ds.kitti.ids[0]) and rows[0]["class"] == "Car"
    assert [float(rows[0][k]) for k in ("x", "y", "z", "dx", "dy", "dz")] == pytest.approx(car[:6].tolist(), abs=1e-3)
    assert float(rows[0]["best_3d_iou"]) == 0.0 and rows[0]["best_score"] == ""  # no other car overlaps it
    # LiDAR points inside the box, counted here in the box's own frame
    pts = frame.points_lidar[:, :3].astype(np.float64) - car[:3].double().numpy()
    c, s = math.cos(car[6]), math.sin(car[6])
    local = np.stack([c * pts[:, 0] + s * pts[:, 1], -s * pts[:, 0] + c * pts[:, 1], pts[:, 2]], 1)
    inside = (np.abs(local) <= car[3:6].double().numpy() / 2).all(axis=1)
    assert int(rows[0]["lidar_points"]) == int(inside.sum()) > 0


class _Shifted(_GroundTruthModel):
    """Every box moved by `offset` (LiDAR frame)."""

    def __init__(self, offset):
        super().__init__()
        self.offset = torch.tensor(offset)

    def forward(self, batch):
        return [Detections3D(Boxes3D(d.boxes.tensor + self.offset), d.scores, d.labels)
                for d in super().forward(batch)]


def test_evaluate_model_drops_to_zero_when_boxes_move(synthetic_root):
    ev, _ = evaluate_model(_Shifted([5.0, 0, 0, 0, 0, 0, 0]), DetectionDataset(synthetic_root, "train", PC_RANGE))
    metrics = ev.metrics
    assert metrics["Car/3d_R40/moderate"] == 0.0 and metrics["diag/Car/3d_recall/moderate"] == 0.0
    assert metrics["Car/bev_R40/moderate"] == 0.0
    # 5 m is beyond the largest centre-distance threshold (4 m); only a shifted box that lands
    # near a *different* object (cars parked in a row) can still match
    assert metrics["nuscenes/mAP"] < 50.0


def test_evaluate_model_oracle_finds_the_wrong_part(synthetic_root):
    """Every box 0.6 m too high: 3D IoU about 0.4 for a car, so 3D AP 0 and BEV AP as for exact
    boxes; making the vertical position exact (`z`, `z_height`) gives back the exact boxes' AP."""
    ds = DetectionDataset(synthetic_root, "train", PC_RANGE)
    exact = evaluate_model(_GroundTruthModel(), ds)[0].metrics["Car/3d_R40/moderate"]
    metrics = evaluate_model(_Shifted([0, 0, 0.6, 0, 0, 0, 0]), ds)[0].metrics
    assert exact > 0 and metrics["Car/3d_R40/moderate"] == 0.0 and metrics["Car/bev_R40/moderate"] == exact
    assert metrics["diag/Car/3d_R40_oracle/z"] == pytest.approx(exact)
    assert metrics["diag/Car/3d_R40_oracle/z_height"] == pytest.approx(exact)
    assert metrics["diag/Car/3d_R40_oracle/xy"] == metrics["diag/Car/3d_R40_oracle/size"] == 0.0


def test_predictions_round_trip_and_paired_baseline(synthetic_root, tmp_path):
    ds = DetectionDataset(synthetic_root, "train", PC_RANGE)
    ev, dets = evaluate_model(_GroundTruthModel(), ds)
    write_predictions(ds.kitti, ev.labels, tmp_path / "gt_pred")
    back = read_predictions(ds.kitti, tmp_path / "gt_pred", ds.classes)
    for a, b in zip(ev.labels, back):  # the labels evaluated are exactly what the files hold
        for field in ("names", "alpha", "bbox2d", "dims_hwl", "loc_cam", "rotation_y", "score"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # the file is KITTI's result format: 16 fields, a 2D box inside the image
    lab = read_label(tmp_path / "gt_pred" / f"{ds.kitti.ids[0]}.txt")
    assert lab.score is not None and len(lab) == len(dets[0].scores)
    assert (lab.bbox2d[:, 2] >= lab.bbox2d[:, 0]).all() and (lab.bbox2d[:, 2:] > 0).any()
    # paired comparison against these files: itself 0; boxes moved 5 m: minus the whole AP on every draw
    same = evaluate_model(_GroundTruthModel(), ds, baseline=back)[0].metrics
    assert same["diag/Car/3d_R40_minus_baseline/moderate"] == 0.0
    worse = evaluate_model(_Shifted([5.0, 0, 0, 0, 0, 0, 0]), ds, baseline=back)[0].metrics
    exact = same["Car/3d_R40/moderate"]
    assert worse["diag/Car/3d_R40_minus_baseline/moderate"] == pytest.approx(-exact)
    assert worse["diag/Car/3d_R40_minus_baseline/moderate_high"] <= 0.0
    # bad folders: one clear error naming the file
    (tmp_path / "gt_pred" / f"{ds.kitti.ids[1]}.txt").unlink()
    with pytest.raises(DataError, match=f"{ds.kitti.ids[1]}.txt: no predictions"):
        read_predictions(ds.kitti, tmp_path / "gt_pred", ds.classes)
    with pytest.raises(DataError, match="with a score"):
        read_predictions(ds.kitti, synthetic_root / "training" / "label_2", ds.classes)  # labels, not results


def test_train_then_eval_cli(synthetic_root, tmp_path):
    """tools/train.py on a tiny config writes metrics and pictures; tools/eval.py reproduces the metrics."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
_base_: {ROOT / 'configs' / 'quickstart.yaml'}
data: {{root: {synthetic_root}, synthetic: null}}
model:
  voxel_size_m: [0.2, 0.2, 0.1]
  backbone3d_channels: [8, 16, 16, 16]
  backbone3d_out_channels: 16
  bev_layer_nums: [1, 1]
  bev_num_filters: [16, 16]
  bev_num_upsample_filters: [16, 16]
  head: {{shared_channels: 16, head_channels: 16}}
train: {{max_steps: 2, batch_size: 1, ckpt_every: 2, progress: false}}
eval: {{num_pictures: 1, real_kitti_root: null}}
""")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(cfg), "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["train"]["step"] == 2 and result["val_frames"] == 1
    assert (out / "config.yaml").is_file()
    (picture,) = result["pictures"]
    with Image.open(picture) as im:
        assert im.format == "PNG" and im.width > 800
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--config", str(cfg),
                          "--ckpt", str(out), "--out", str(tmp_path / "ev")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["metrics"] == pytest.approx(result["metrics"])
    # both wrote the held-out frame's detections as a KITTI result file; against its own, no difference
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["000003.txt"]
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--config", str(cfg), "--ckpt", str(out),
                          "--set", f"eval.baseline={out / 'predictions'}", "--out", str(tmp_path / "ev2")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    paired = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert paired["metrics"]["diag/Car/3d_R40_minus_baseline/moderate"] == 0.0
    assert paired["baseline"] == str(out / "predictions") and "baseline" not in again
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--config", str(cfg), "--ckpt", str(out),
                          "--set", f"eval.baseline={tmp_path / 'nowhere'}", "--out", str(tmp_path / "ev3")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 2 and "nowhere: predictions folder not found" in run.stderr
