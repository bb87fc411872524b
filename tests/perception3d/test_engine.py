"""Tests for perception3d.engine: loop, exact resume, atomic checkpoints, logging, CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perception3d.engine import (CheckpointManager, LRFactor, ShardedBatchSampler, TrainConfig, fit, load_checkpoint,
                                 move_to_device, read_checkpoint, resolve_latest, sample_seed)
from tests.toy_task import ToyConfig, ToyDataConfig, ToyDataset, ToyMLP, ToyModelConfig, collate
from perception3d.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


class Crash(RuntimeError):
    pass


def toy_cfg(**train) -> ToyConfig:
    base = dict(seed=3, max_steps=12, batch_size=8, lr=0.02, schedule="cosine", warmup_steps=3, log_every=2,
                ckpt_every=3, eval_every=4, keep_last_ckpts=5, device="cpu", progress=False, weight_decay=0.01)
    base.update(train)
    # 40 samples / batch 8 -> 5 steps per epoch, so step 7 is mid-epoch
    return ToyConfig(data=ToyDataConfig(num_samples=40, augment_noise=0.2),
                     model=ToyModelConfig(hidden=16, dropout=0.3), train=TrainConfig(**base))


def run(cfg: ToyConfig, out: Path, resume: bool = False, on_step_end=None) -> tuple[ToyMLP, dict]:
    torch.manual_seed(cfg.train.seed)
    d = cfg.data
    train_set = ToyDataset(d.num_samples, d.in_dim, d.noise, d.augment_noise, d.seed)
    val_set = ToyDataset(d.val_samples, d.in_dim, d.noise, 0.0, d.seed + 1)
    model = ToyMLP(d.in_dim, cfg.model.hidden, cfg.model.dropout)

    def evaluate_fn(m, step):
        torch.rand(3)  # an evaluation that consumes RNG must not change training
        with torch.no_grad():
            return {"val_mse": float(((m.net(val_set.x) - val_set.y) ** 2).mean())}

    result = fit(model, train_set, collate, cfg.train, out, evaluate_fn=evaluate_fn, resume=resume,
                 on_step_end=on_step_end)
    return model, result


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.state_dict().values(), b.state_dict().values()))


def crash_at(step_to_crash: int):
    def hook(step, scalars):
        if step == step_to_crash:
            raise Crash(f"simulated interruption at step {step}")
    return hook


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------

def test_exact_resume_after_interruption(tmp_path):
    cfg = toy_cfg()
    ref, ref_result = run(cfg, tmp_path / "ref")
    assert ref_result["step"] == 12 and "val_mse" in ref_result["eval"]

    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", on_step_end=crash_at(7))  # mid-epoch; last checkpoint at step 6
    assert resolve_latest(tmp_path / "cut" / "ckpt").name == "step_00000006.pt"
    resumed, result = run(cfg, tmp_path / "cut", resume=True)
    assert result["step"] == 12
    assert max_diff(ref, resumed) < 1e-6

    # the comparison can fail: a different seed (dropout, data order, augmentation) ends elsewhere
    other, _ = run(toy_cfg(seed=4), tmp_path / "other")
    assert max_diff(ref, other) > 1e-3
    messages = [json.loads(l).get("message", "") for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert any("resumed from" in m and "step 6" in m for m in messages)


def test_bf16_precision_runs_the_forward_under_autocast(tmp_path):
    """train.precision=bf16: the same run within bf16 rounding of fp32, and not identical to it."""
    fp32, _ = run(toy_cfg(), tmp_path / "fp32")
    bf16, res = run(toy_cfg(precision="bf16"), tmp_path / "bf16")
    assert res["step"] == 12
    assert 0 < max_diff(fp32, bf16) < 0.05


def test_rng_restore_matters(tmp_path):
    """Resuming without the RNG states (dropout masks) would not reproduce the run: the test has teeth."""
    cfg = toy_cfg(max_steps=8, eval_every=0)
    ref, _ = run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", on_step_end=crash_at(4))
    ckpt = resolve_latest(tmp_path / "cut" / "ckpt")
    state = torch.load(ckpt, weights_only=True)
    state["rng"] = [dict(state["rng"][0], torch=torch.manual_seed(999).get_state())]
    torch.save(state, ckpt)
    broken, _ = run(cfg, tmp_path / "cut", resume=True)
    assert max_diff(ref, broken) > 1e-6


def test_resumed_log_time_goes_on_from_the_checkpoint(tmp_path):
    cfg = toy_cfg(max_steps=8, eval_every=0)
    with pytest.raises(Crash):
        run(cfg, tmp_path, on_step_end=crash_at(5))
    ckpt = resolve_latest(tmp_path / "ckpt")  # step 3
    state = torch.load(ckpt, weights_only=True)
    assert 0 < state["extra"]["elapsed_s"] < 60
    state["extra"]["elapsed_s"] = 1000.0  # as if the first 3 steps had taken 1000 s
    torch.save(state, ckpt)
    run(cfg, tmp_path, resume=True)
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    cut = next(i for i, r in enumerate(records) if "resumed from" in r.get("message", ""))
    before = [r["time"] for r in records[:cut] if "step" in r]
    after = [r["time"] for r in records[cut + 1:] if "step" in r]
    assert [r["step"] for r in records[cut + 1:] if "step" in r] == [4, 6, 8, 8]  # train steps, final eval
    assert before and max(before) < 60
    assert all(1000 <= t < 1060 for t in after) and after == sorted(after)
    assert 1000 <= torch.load(resolve_latest(tmp_path / "ckpt"), weights_only=True)["extra"]["elapsed_s"] < 1060


def test_resume_follows_the_new_config_schedule(tmp_path):
    cfg = toy_cfg(max_steps=4, schedule="constant", warmup_steps=0, lr=0.01, log_every=1, eval_every=0)
    run(cfg, tmp_path)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=6, lr=0.02, weight_decay=0.5))
    seen = {}
    model, result = run(longer, tmp_path, resume=True, on_step_end=lambda step, s: seen.update({step: s["lr"]}))
    assert result["step"] == 6 and sorted(seen) == [5, 6]
    assert seen[5] == pytest.approx(0.02) and seen[6] == pytest.approx(0.02)
    state = read_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.5


def test_workers_see_the_same_samples(tmp_path):
    cfg = toy_cfg(max_steps=6, eval_every=0, ckpt_every=6)
    a, _ = run(cfg, tmp_path / "a")
    b, _ = run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=1)), tmp_path / "b")
    assert max_diff(a, b) < 1e-7


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = toy_cfg(max_steps=6, ckpt_every=2, eval_every=0)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: write half of it, then die
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError("disk went away mid-write")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="mid-write"):
        run(cfg, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "ckpt"
    latest = resolve_latest(ckpt_dir)
    assert latest is not None and latest.name == "step_00000002.pt"
    assert os.path.samefile(ckpt_dir / "latest.pt", latest)
    assert read_checkpoint(ckpt_dir / "latest.pt")["step"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest.pt", "step_00000002.pt"]  # no temp left over
    _, result = run(cfg, tmp_path, resume=True)  # and training goes on from there
    assert result["step"] == 6


def test_atomic_path_keeps_old_file_on_error_and_honours_umask(tmp_path):
    from perception3d.io.atomic import atomic_path, atomic_write_text

    target = tmp_path / "out" / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    old_mask = os.umask(0o027)
    try:
        atomic_write_text(target, "new")
    finally:
        os.umask(old_mask)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640  # not mkstemp's 0600


def test_keep_last_and_latest(tmp_path):
    cfg = toy_cfg(max_steps=5, ckpt_every=1, keep_last_ckpts=2, eval_every=0)
    model, result = run(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest.pt", "step_00000004.pt", "step_00000005.pt"]
    state = read_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert state["step"] == 5 and result["checkpoint"].endswith("step_00000005.pt")
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "config", "step"}
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    fresh = ToyMLP(4, 16, 0.3)
    load_checkpoint(tmp_path, fresh)  # a run folder resolves to its latest checkpoint
    assert max_diff(model, fresh) == 0.0


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nothere.pt", ToyMLP(4))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(DataError, match=r"bad\.pt: cannot read checkpoint"):
        load_checkpoint(bad, ToyMLP(4))
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, {"model": ToyMLP(4, hidden=16).state_dict(), "step": 1})
    with pytest.raises(DataError, match=r"shape mismatches: net\.0\.weight: checkpoint \(16, 4\) vs model \(8, 4\)"):
        load_checkpoint(mgr.latest(), ToyMLP(4, hidden=8))
    other = torch.nn.Sequential(torch.nn.Linear(4, 16))
    with pytest.raises(DataError) as e:
        load_checkpoint(mgr.latest(), other)
    assert "missing keys: 0.weight, 0.bias" in str(e.value) and "unexpected keys: net.0.weight" in str(e.value)
    assert "step_00000001.pt" in str(e.value)


# --------------------------------------------------------------------------------------------
# logging, schedule, data order, contract errors
# --------------------------------------------------------------------------------------------

def test_logs_tensorboard_and_lr_schedule(tmp_path):
    cfg = toy_cfg(max_steps=8, log_every=2, eval_every=4, schedule="cosine", warmup_steps=2)
    run(cfg, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["step"] for r in evals] == [4, 8]
    assert all({"loss", "lr", "mae"} <= set(r) for r in train)
    f = LRFactor("cosine", 8, 2)
    assert train[0]["lr"] == pytest.approx(0.02 * (f(0) + f(1)) / 2)  # lr averaged over the window
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_lr_factor_shapes():
    cos = LRFactor("cosine", 100, warmup_steps=10, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(100) == pytest.approx(0.1) and cos(55) == pytest.approx(0.55)
    one = LRFactor("onecycle", 100, warmup_steps=40, div_factor=10, final_div_factor=100)
    assert one(0) == pytest.approx(0.1) and one(40) == pytest.approx(1.0) and one(100) == pytest.approx(1e-3)
    assert LRFactor("constant", 10, 0)(7) == 1.0


def test_sharding_matches_single_process_and_resume_skip():
    single = list(ShardedBatchSampler(20, 8, seed=1, epoch=2))
    r0 = list(ShardedBatchSampler(20, 8, seed=1, epoch=2, rank=0, world_size=2))
    r1 = list(ShardedBatchSampler(20, 8, seed=1, epoch=2, rank=1, world_size=2))
    assert len(single) == 2  # 20 // 8, last partial batch dropped
    assert [a + b for a, b in zip(r0, r1)] == single
    assert list(ShardedBatchSampler(20, 8, seed=1, epoch=2, skip_batches=1)) == single[1:]
    assert [i for i, _ in single[0]] != [i for i, _ in list(ShardedBatchSampler(20, 8, seed=1, epoch=3))[0]]
    i, s = single[0][0]
    assert s == sample_seed(1, 2, i) != sample_seed(1, 3, i)
    with pytest.raises(ConfigError, match="divisible"):
        ShardedBatchSampler(20, 7, seed=0, epoch=0, world_size=2)


def test_contract_errors(tmp_path):
    cfg = toy_cfg(max_steps=2, eval_every=0, warmup_steps=0)
    ds = ToyDataset(16, 4, 0.0, 0.0, 0)

    class NoDict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, batch):
            return self.lin(batch["x"]).mean()

    with pytest.raises(TypeError, match="must return a dict with a scalar 'loss'"):
        fit(NoDict(), ds, collate, cfg.train, tmp_path / "a")

    class NaNLoss(NoDict):
        def forward(self, batch):
            return {"loss": self.lin(batch["x"]).mean() * float("nan")}

    model = NaNLoss()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1"):
        fit(model, ds, collate, cfg.train, tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="batch_size=32 is larger than the training set"):
        fit(ToyMLP(4), ds, collate, dataclasses.replace(cfg.train, batch_size=32), tmp_path / "c")


def test_move_to_device_nested():
    @dataclasses.dataclass(frozen=True)
    class Box:
        t: torch.Tensor
        name: str

    batch = {"a": [torch.zeros(2), (torch.ones(1), 3)], "b": Box(torch.zeros(1), "x")}
    out = move_to_device(batch, torch.device("meta"))
    assert out["a"][0].device.type == "meta" and out["a"][1][0].device.type == "meta" and out["a"][1][1] == 3
    assert out["b"].t.device.type == "meta" and out["b"].name == "x"


# --------------------------------------------------------------------------------------------
# denormal floats
# --------------------------------------------------------------------------------------------

# In a fresh process on two torch threads, as the command-line tools start: largest-denormal floats
# (made from their bits) times 1, and how many products stay denormal (integer compare: the flags
# change float compares), outside and inside `denormals_flushed`; then a toy training through
# `fit` (which flushes around its steps) and scipy's cKDTree on points sharing a coordinate, which
# crashes (segmentation fault) when the calling thread flushes. "late" starts the pool first.
DENORMAL_PROBE = """
import sys, numpy as np, torch
torch.set_num_threads(2)
x = torch.from_numpy(np.full(1 << 21, 0x007FFFFF, dtype=np.uint32).view(np.float32))
if sys.argv[1] == "late":
    torch.ones(1 << 21).mul(2.0)
from perception3d.engine import denormals_flushed, flush_torch_workers
from perception3d.engine.numerics import thread_flushes_denormals
ok = flush_torch_workers()
left = lambda: int(((x * 1.0).view(torch.int32) != 0).sum())
outside = left()
with denormals_flushed():
    inside, flushing = left(), thread_flushes_denormals()
after = thread_flushes_denormals()

import tempfile
from tests.toy_task import ToyConfig, train
from perception3d.config import from_dict
cfg = from_dict(ToyConfig, {"task": "toy", "train": {"max_steps": 2, "batch_size": 8, "device": "cpu",
                                                   "progress": False}})
with tempfile.TemporaryDirectory() as out:
    train(cfg, out)
from scipy.spatial import cKDTree
p = np.random.default_rng(0).uniform(-1, 1, (1000, 3))
p[:600, 2] = 0.0  # a ground plane
cKDTree(p).query(p, k=4)
print(ok, outside, inside, flushing, after, thread_flushes_denormals())
"""


@pytest.mark.parametrize("when", ["early", "late"])
def test_denormals_flushed_only_on_torch_workers_and_inside_the_scope(when):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("flushing denormals (FTZ/DAZ) is an x86 feature")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", DENORMAL_PROBE, when], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr}"  # -11: cKDTree crashed
    ok, outside, inside, flushing, after, end = out.stdout.split()
    n = 1 << 21
    # the calling thread never keeps the flags: not after setup, the scope, or a training through fit
    assert (flushing, after, end) == ("True", "False", "False")
    if when == "early":  # the worker flushes; the calling thread only inside the scope
        assert ok == "True" and 0 < int(outside) < n and inside == "0"
    else:  # the worker started without the flags: its share stays denormal even inside the scope
        assert ok == "False" and int(outside) == n and 0 < int(inside) < n
        assert "called after torch's thread pool started" in out.stderr


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

TOY_YAML = """task: toy
data: {num_samples: 24, augment_noise: 0.1}
train: {max_steps: 4, batch_size: 8, lr: 0.01, log_every: 2, ckpt_every: 2, device: cpu, progress: false}
"""


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    # tests/run_tool.py: the tool's main with the test-only toy task registered
    return subprocess.run([sys.executable, str(REPO / "tests" / "run_tool.py"), script.removesuffix(".py"), *args],
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_train_resume_eval(tmp_path):
    (tmp_path / "toy.yaml").write_text(TOY_YAML)
    r = cli("train.py", "--config", "toy.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "outputs" / "toy"
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
    assert (out / "config.yaml").is_file() and resolve_latest(out / "ckpt").name == "step_00000004.pt"

    r = cli("train.py", "--config", "toy.yaml", "--resume", "--set", "train.max_steps=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 6
    assert "resumed from" in r.stderr and "train.max_steps: 4 -> 6" in r.stderr
    assert "max_steps: 6" in (out / "config.yaml").read_text()

    r = cli("eval.py", "--config", "outputs/toy/config.yaml", "--ckpt", "outputs/toy", "--out", "ev", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 6 and metrics["val_mse"] >= 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics


def test_cli_errors(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    try:
        from p3d import eval as eval_tool
        from p3d import train as train_tool
    finally:
        sys.path.remove(str(REPO))
    with pytest.raises(SystemExit):
        train_tool.main(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: file not found" in capsys.readouterr().err

    (tmp_path / "u.yaml").write_text("task: segmentation\n")
    assert train_tool.main(["--config", str(tmp_path / "u.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'segmentation'" in err and "detection" in err and "toy" in err

    (tmp_path / "k.yaml").write_text("task: toy\nmodel: {widht: 3}\n")
    assert train_tool.main(["--config", str(tmp_path / "k.yaml")]) == 2
    err = capsys.readouterr().err
    assert "k.yaml: unknown key 'model.widht'" in err

    (tmp_path / "n.yaml").write_text("train: {lr: 0.1}\n")
    (tmp_path / "c.pt").write_bytes(b"")
    assert eval_tool.main(["--config", str(tmp_path / "n.yaml"), "--ckpt", str(tmp_path / "c.pt")]) == 2
    assert "n.yaml: missing key 'task'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_tool.main(["--config", str(tmp_path / "k.yaml"), "--ckpt", str(tmp_path / "none.pt")])
    assert "none.pt: no such checkpoint" in capsys.readouterr().err
