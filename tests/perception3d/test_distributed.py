"""DDP through torchrun (2 CPU processes, gloo) matches one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perception3d.engine import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "perception3d" / "_ddp_toy.py"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_ranks_match_single_process(tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(SCRIPT), str(ddp_out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([sys.executable, str(SCRIPT), str(single_out)])
    assert r.returncode == 0, r.stderr[-3000:]

    w0 = torch.load(ddp_out / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(ddp_out / "weights_rank1.pt", weights_only=True)
    ws = torch.load(single_out / "weights_rank0.pt", weights_only=True)
    init = torch.nn.Linear(4, 16)  # sanity: training moved the weights
    assert (ws["net.0.weight"] - init.weight).abs().max() > 1e-3
    for k in ws:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
        assert (w0[k] - ws[k]).abs().max().item() < 1e-5, f"DDP and single process differ on {k}"

    res0 = json.loads((ddp_out / "result_rank0.json").read_text())
    res1 = json.loads((ddp_out / "result_rank1.json").read_text())
    assert res0["world_size"] == 2 and res0["step"] == 6
    assert res0["eval"] == res1["eval"] and "val_mse" in res0["eval"]  # metrics broadcast from rank 0
    assert res0["train"] == res1["train"]  # scalars all-reduced
    single = json.loads((single_out / "result_rank0.json").read_text())
    assert abs(single["train"]["loss"] - res0["train"]["loss"]) < 1e-5  # mean over ranks == global mean

    # only rank 0 writes: each logged step appears once; the checkpoint holds both ranks' RNG states
    steps = [json.loads(l)["step"] for l in (ddp_out / "log.jsonl").read_text().splitlines()
             if json.loads(l).get("split") == "train"]
    assert steps == [2, 4, 6]
    state = read_checkpoint(ddp_out / "ckpt" / "latest.pt")
    assert state["step"] == 6 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
