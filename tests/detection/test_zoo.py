"""The model zoo: every shipped weights file loads into the model of its config (and only that
one), the files stay within the repository's budget, and (slow) `tools/eval.py` on the 1000 further
synthetic frames reproduces the Car 3D AP the README's zoo table states."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detection.config import DetectionConfig
from detection.models.detector import CenterPointDetector
from detection.task import load_weights
from perception3d.config import load_config
from perception3d.errors import DataError

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BUDGET_MB = 30


def zoo_rows() -> list[dict]:
    """The README's zoo rows that ship weights: config, weights file and the stated Car 3D AP."""
    section = README.read_text().split("## Model zoo", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if "weights/" not in line or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        config = re.search(r"`(configs/detection/\w+\.yaml)`", line).group(1)
        weights = re.search(r"`(weights/\w+\.safetensors)`", line).group(1)
        car = float(re.search(r"Car \**([\d.]+)", cells[3]).group(1))
        rows.append({"config": config, "weights": weights, "car_ap": car})
    return rows


ROWS = zoo_rows()


def test_zoo_ships_three_models_within_budget():
    assert {Path(r["config"]).stem for r in ROWS} == {"second", "dsvt_pillar", "pointpillars"}
    sizes = [(REPO / r["weights"]).stat().st_size for r in ROWS]
    assert sum(sizes) <= BUDGET_MB * 2**20, sizes


@pytest.mark.parametrize("row", ROWS, ids=lambda r: Path(r["config"]).stem)
def test_shipped_weights_load_into_their_config_only(row):
    cfg = load_config(REPO / row["config"], DetectionConfig)
    model = CenterPointDetector(cfg.model)
    load_weights(REPO / row["weights"], model, cfg)
    # every parameter came from the file (fp16 on disk, fp32 in the model), none left at init
    from safetensors.torch import load_file
    stored = load_file(REPO / row["weights"])
    state = model.state_dict()
    assert set(stored) == set(state)
    for k, v in stored.items():
        torch.testing.assert_close(state[k], v.to(state[k].dtype), rtol=0, atol=0)
    # another zoo model's config is refused, naming what differs
    other = next(r for r in ROWS if r is not row)
    other_cfg = load_config(REPO / other["config"], DetectionConfig)
    with pytest.raises(DataError, match=r"trained with another model config .*model\.\w+"):
        load_weights(REPO / row["weights"], CenterPointDetector(other_cfg.model), other_cfg)


TEST1000 = ["data.root=data_cache/synthetic_kitti_test1000", "data.synthetic.frames=1000", "data.synthetic.seed=1",
            "data.synthetic.val_fraction=1.0", "eval.num_pictures=0", "eval.real_kitti_root=null"]


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=lambda r: Path(r["config"]).stem)
def test_shipped_weights_reproduce_the_zoo_table(row, tmp_path):
    """The README's evaluation command for the zoo (generates the 1000 frames on first use, about
    30 min on 2 cores; each evaluation 3-5 min)."""
    cmd = [sys.executable, "tools/eval.py", "--config", row["config"], "--ckpt", row["weights"],
           *[a for s in TEST1000 for a in ("--set", s)], "--out", str(tmp_path / "eval")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["Car/3d_R40/moderate"] == pytest.approx(row["car_ap"], abs=0.3)
