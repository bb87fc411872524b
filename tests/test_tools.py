"""CI runs what users run: the README's main-job commands, `tools/eval.py` on what they wrote, every
`tools/bench.py NAME --quick`, and the run-folder guarantees of `tools/train.py`, each as a
subprocess from the repository root, exactly as typed, with tiny settings added through `--set`.

A crash, a traceback, a non-zero exit or a missing output fails the test.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KITTI = REPO.parent / "shared" / "data" / "kitti"
from p3d.bench import available as available_benchmarks

# tiny settings for the README's two training commands (each half: a generated dataset, a few steps)
TINY = {
    "configs/quickstart.yaml": [
        "data.synthetic.frames=5", "data.synthetic.val_fraction=0.4", "train.max_steps=3", "train.batch_size=2",
        "train.ckpt_every=2", "train.progress=false", "eval.num_pictures=1"],
    "configs/splatting/3dgs_quickstart.yaml": [
        "data.synthetic.num_views=8", "data.synthetic.width=40", "data.synthetic.height=30",
        "data.synthetic.num_points=300", "train.max_steps=30", "strategy.refine_start_iter=10",
        "strategy.refine_stop_iter=25", "strategy.refine_every=10", "train.progress=false", "eval.num_renders=2"],
}


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    assert "Traceback" not in r.stderr, f"{shlex.join(cmd)}\n{r.stderr}"
    return r


def ok(cmd: list[str], timeout: float = 600) -> dict:
    """Run `cmd`; it must exit 0 and print one JSON object as its last line, which is returned."""
    r = run(cmd, timeout)
    assert r.returncode == 0, f"{shlex.join(cmd)} exited {r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def main_job_commands() -> list[list[str]]:
    """The commands of the README's main job (its first bash block that trains), after the install."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) if "p3d train" in b)
    commands = [shlex.split(c) for c in block.strip().split("&&")]
    assert commands[0] == ["bash", "scripts/install.sh"], commands[0]
    return commands[1:]


def test_readme_main_job_trains_both_halves_and_evaluates_shipped_weights():
    cmds = main_job_commands()
    trainings = [c for c in cmds if c[:2] == ["p3d", "train"]]
    assert [c[:3] for c in trainings] == [["p3d", "train", "--config"]] * 2
    assert [c[3] for c in trainings] == list(TINY)
    evals = [c for c in cmds if c[:2] == ["p3d", "eval"]]
    assert len(evals) == 1 and len(cmds) == 3, cmds


def test_readme_main_job_shipped_second_detects(tmp_path):
    """The main job's evaluation of the shipped SECOND weights, on a few frames of the same
    generator: the trained model finds the cars (a briefly trained one does not), and draws them."""
    cmd = next(c for c in main_job_commands() if c[:2] == ["p3d", "eval"])
    args = cmd[2:]
    ckpt = args[args.index("--ckpt") + 1]
    out = tmp_path / "shipped"
    args[args.index("--out") + 1] = str(out)
    tiny = [f"data.root={tmp_path / 'data'}", "data.synthetic.frames=6", "data.synthetic.val_fraction=1.0",
            "eval.num_pictures=1"]
    result = ok([*cmd[:2], *args, *[a for s in tiny for a in ("--set", s)]])
    m = result["metrics"]
    assert result["checkpoint"] == ckpt and result["val_frames"] == 6
    assert m["diag/Car/3d_recall/moderate"] >= 85, m["diag/Car/3d_recall/moderate"]
    assert m["nuscenes/Car/AP"] >= 80, m["nuscenes/Car/AP"]
    assert all(Path(p).is_file() for p in result["pictures"])
    if KITTI.is_dir():
        assert any("real_kitti_000008" in p for p in result["pictures"])


@pytest.mark.parametrize("config", list(TINY), ids=["detection", "splatting"])
def test_readme_main_job_then_eval(config, tmp_path):
    cmd = next(c for c in main_job_commands() if c[:2] == ["p3d", "train"] and c[3] == config)
    out, data = tmp_path / "run", tmp_path / "data"
    tiny = [a for s in [*TINY[config], f"data.root={data}"] for a in ("--set", s)]
    summary = ok([*cmd, *tiny, "--out", str(out)])

    assert (out / "config.yaml").is_file() and (out / "log.jsonl").is_file()
    assert (out / "ckpt" / "latest.pt").is_file()
    assert not (out / ".lock").exists(), "the run folder's lock file outlived the run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    steps = [json.loads(line).get("step") for line in (out / "log.jsonl").read_text().splitlines()]
    if "splatting" in config:
        m = metrics["metrics"]
        assert m["views"] >= 1 and 5 < m["psnr"] < 60 and m["num_gaussians"] > 0
        assert (out / "point_cloud.ply").stat().st_size > 1000
        assert list((out / "renders").rglob("*.png"))
        assert steps[-1] == 30
    else:
        m = metrics["metrics"]
        assert metrics["val_frames"] == 2
        assert 0 <= m["Car/bev_R40/moderate"] <= 100 and 0 <= m["nuscenes/mAP"] <= 100
        assert all(Path(p).is_file() for p in metrics["pictures"]) and metrics["pictures"]
        assert len(list((out / "predictions").glob("*.txt"))) == 2
        if KITTI.is_dir():  # the real KITTI frame is drawn too
            assert any("real_kitti_000008" in p for p in metrics["pictures"])
        assert metrics["train"]["step"] == 3

    # tools/eval.py on what the run wrote, with the config it saved
    ev = tmp_path / "eval"
    result = ok([sys.executable, "tools/eval.py", "--config", str(out / "config.yaml"), "--ckpt", str(out),
                 "--out", str(ev)])
    written = json.loads((ev / "metrics.json").read_text())
    assert written == json.loads(json.dumps(result))
    if "splatting" in config:
        # the checkpoint holds the final Gaussians: the same held-out PSNR as the run's own evaluation
        assert written["metrics"]["psnr"] == pytest.approx(metrics["metrics"]["psnr"], abs=1e-3)
    else:
        assert written["metrics"]["Car/3d_R40/moderate"] == metrics["metrics"]["Car/3d_R40/moderate"]
        # tools/compare_runs.py on the two evaluations of the same model: the same numbers, drawn
        pic = tmp_path / "compare.png"
        table = ok([sys.executable, "tools/compare_runs.py", "--out", str(pic), f"train={out}", f"eval={ev}"])
        assert [r["ap"] for r in table["runs"]] == [m["Car/3d_R40/moderate"]] * 2
        assert pic.stat().st_size > 1000
        # tools/export_weights.py: the weights alone as .safetensors (fp32: the same numbers; fp16:
        # what the zoo ships), evaluated with the config; another model's config is refused
        weights = tmp_path / "w32.safetensors"
        info = ok([sys.executable, "tools/export_weights.py", str(out), "--out", str(weights), "--fp32"])
        assert info["weights"] == str(weights) and info["tensors"] > 50
        again = ok([sys.executable, "tools/eval.py", "--config", str(out / "config.yaml"), "--ckpt", str(weights),
                    "--out", str(tmp_path / "eval_w")])
        assert again["metrics"]["Car/3d_R40/moderate"] == m["Car/3d_R40/moderate"]
        half = ok([sys.executable, "tools/export_weights.py", str(out), "--out", str(tmp_path / "w16.safetensors")])
        assert half["mb"] < 0.55 * info["mb"]
        # p3d view on the evaluation folder: its predictions over the frame they were made on
        shot = ok(["p3d", "view", str(ev), "--screenshot", str(tmp_path / "view.png"), "--size", "320x240"])
        assert shot["width"] == 320 and Path(shot["screenshot"]).stat().st_size > 1000
        r = run([sys.executable, "tools/eval.py", "--config", "configs/detection/dsvt_pillar.yaml", "--ckpt",
                 str(weights), "--set", f"data.root={data}", "--set", "data.synthetic=null",
                 "--out", str(tmp_path / "eval_x")])
        assert r.returncode == 2 and "trained with another model config" in r.stderr
        assert "model.backbone: 'second' -> 'dsvt'" in r.stderr


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command (its Install block)."""
    block = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0].strip()
    assert block.endswith("python3 -m pytest") and block.startswith("bash scripts/install.sh"), block
    assert block in (REPO / ".ci" / "run").read_text().splitlines()


def test_p3d_command_line():
    """`p3d` lists its commands; each has an accurate --help; tools/*.py are the same commands."""
    from p3d.cli import COMMANDS

    listing = run(["p3d", "--help"])
    assert listing.returncode == 0 and all(f"  {name} " in listing.stdout for name in COMMANDS), listing.stdout
    wrappers = {"train": "train", "eval": "eval", "bench": "bench", "view": "view", "export_weights": "export",
                "make_synthetic": "make-synthetic", "compare_runs": "compare", "quantize": "quantize"}
    assert sorted(p.stem for p in (REPO / "tools").glob("*.py")) == sorted(wrappers)
    assert sorted(wrappers.values()) == sorted(COMMANDS)
    for tool, name in wrappers.items():
        h = run(["p3d", name, "--help"])
        assert h.returncode == 0 and h.stdout.startswith(f"usage: p3d {name} "), h.stdout[:200]
        assert run([sys.executable, f"tools/{tool}.py", "--help"]).stdout == h.stdout
        assert "sys.path" not in (REPO / "tools" / f"{tool}.py").read_text()
    r = run(["p3d", "frobnicate"])
    assert r.returncode == 2 and r.stderr.startswith("error: unknown command 'frobnicate'")


def test_make_synthetic(tmp_path):
    out = tmp_path / "kitti"
    r = run([sys.executable, "tools/make_synthetic.py", "--out", str(out), "--frames", "2", "--seed", "3",
             "--val-fraction", "0.5"])
    assert r.returncode == 0, r.stderr
    assert "wrote 2 frames" in r.stdout
    for sub, ext in (("velodyne", "bin"), ("calib", "txt"), ("label_2", "txt"), ("image_2", "png")):
        assert len(list((out / "training" / sub).glob(f"*.{ext}"))) == 2, sub
    assert (out / "ImageSets" / "train.txt").read_text().split() == ["000000"]
    assert (out / "ImageSets" / "val.txt").read_text().split() == ["000001"]


@pytest.mark.parametrize("name", available_benchmarks())
def test_bench_quick(name):
    cmd = [sys.executable, "tools/bench.py", name, "--quick"]
    if name == "gsplat_parity":
        import torch

        if not torch.cuda.is_available():  # a clear error, not a crash
            r = run(cmd)
            assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr, r.stderr
            return
    result = ok(cmd)
    assert result["quick"] is True
    rows = result.get("results", [result])  # ptq: one row per model
    timings = {f"{i}/{k}": v for i, row in enumerate(rows) for k, v in row.items()
               if k.startswith(("ms_", "fps_")) and v is not None}
    assert timings and all(v > 0 for v in timings.values()), result
    checks = {  # each benchmark's own agreement check, on the quick inputs
        "sparse_conv": lambda r: r["max_abs_err_vs_dense"] < 1e-4,
        "voxelize": lambda r: r["same_voxels"] and r["voxels_ours"] > 0,
        "dsvt": lambda r: r["onnx_max_abs_err"] < 1e-4,
        "raster": lambda r: r["max_abs_err"] < 1e-3 and r["max_rel_err_grads"] < 1e-3,
        "compact3dgs": lambda r: r["psnr_vanilla"] > 10 and r["psnr_compact"] > 10 and r["mb_compact_post"] > 0,
        "train_step": lambda r: r["gaussians"] == 2000,
        "coherentgs": lambda r: r["views"] == 3 and r["gaussians_coherentgs"] == 3 * 22 * 30 and r["s_train"] > 0
        and 8 < r["psnr_coherentgs"] < 60 and 5 < r["psnr_vanilla"] < 60 and 0 < r["ssim_coherentgs"] <= 1,
        "detection_train_step": lambda r: r["voxels_dsvt"] > 0 and r["voxels_second"] > 0,
        "ptq": lambda r: [row["model"] for row in r["results"]] == ["pointpillars", "second"] and all(
            row["ptq_seconds"] > 0 and row["qat_seconds"] > 0 and row["qat_steps"] == 2
            and 0 <= row["ap_int8_entropy"] <= row["ap_int8"] <= 100 and 0 <= row["ap_int8_qat"] <= 100
            and len(row["ablation"]) == 6 and row["ablation"][0]["ap"] == row["ap_int8_minmax"]
            and row["ablation"][-1]["ap"] == row["ap_int8"] for row in r["results"]),
    }
    assert checks[name](result), result


# --------------------------------------------------------------------------------------------
# run folders: one owner, no mixing, no leftovers, exact logs after a resume
# --------------------------------------------------------------------------------------------

TOY = """task: toy
data: {num_samples: 24}
train: {max_steps: %d, batch_size: 8, lr: 0.01, log_every: 1, ckpt_every: 2, device: cpu, progress: false}
"""


def toy_train(cfg: Path, out: Path, *extra: str, **kw):
    cmd = [sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_two_processes_never_share_a_run_folder_and_a_kill_leaves_no_stale_lock(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(TOY % 100_000)
    out = tmp_path / "run"
    first = toy_train(cfg, out)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt" / "latest.pt").exists():  # the first run is training
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = run([sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out), "--resume"])
        assert second.returncode == 2
        assert f"another process (pid {first.pid}) is writing this folder" in second.stderr, second.stderr
        ev = run([sys.executable, "tests/run_tool.py", "eval", "--config", str(cfg), "--ckpt", str(out), "--out", str(out)])
        assert ev.returncode == 2 and "another process" in ev.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # killed mid-run: its lock went with it, and a leftover temporary checkpoint is cleaned up
    leftover = out / "ckpt" / ".step_00000099.pt.12345.0badcafe.tmp.pt"
    leftover.write_bytes(b"partial")
    cfg.write_text(TOY % 6)
    r = run([sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert not leftover.exists() and not (out / ".lock").exists()


def test_resume_logs_each_step_once(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(TOY % 6)
    out = tmp_path / "run"
    ok([sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out)])
    # as if the process had been killed after logging steps 5-6 but before their checkpoint
    ckpt = out / "ckpt"
    (ckpt / "latest.pt").unlink()
    (ckpt / "step_00000006.pt").unlink()
    (ckpt / "latest.pt").symlink_to("step_00000004.pt")
    (out / "metrics.json").unlink(missing_ok=True)
    ok([sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out), "--resume"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r.get("split") == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    # killed before its first checkpoint: the resumed run starts at 0 and logs each step once
    shutil.rmtree(ckpt)
    ok([sys.executable, "tests/run_tool.py", "train", "--config", str(cfg), "--out", str(out), "--resume"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2, 3, 4, 5, 6]
    assert any("no checkpoint" in r.get("message", "") for r in records)
