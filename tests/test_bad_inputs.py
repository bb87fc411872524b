"""Bad configs, command lines and run folders through the tools: one clear error (exit code 2, no
traceback), and no existing file changes. The data-format tables are beside their packages
(`tests/detection/test_bad_inputs.py`, `tests/splatting/test_bad_inputs.py`); the harness is
`tests/bad_inputs.py`."""
from __future__ import annotations

from pathlib import Path

import pytest

from perception3d.engine.run import RunFolder
from tests.bad_inputs import BadInput, Tool, check_bad_input

REPO = Path(__file__).resolve().parents[1]

TOY = "task: toy\ndata: {num_samples: 24}\ntrain: {max_steps: 2, batch_size: 8, ckpt_every: 1, device: cpu, progress: false}\n"
_held: list[RunFolder] = []  # locks held by the test process itself (another owner of a folder)


def config(tmp: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def train(tmp: Path, text: str, *argv: str, out: str = "run") -> Tool:
    return Tool("train", ("--config", str(config(tmp, text)), "--out", str(tmp / out), *argv))


def trained_run(tmp: Path) -> Path:
    """A finished toy run in tmp/run (trained in-process through tools/train.py)."""
    from p3d import train as train_tool

    assert train_tool.main(["--config", str(config(tmp, TOY, "toy.yaml")), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _foreign_safetensors(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    return path


def locked(tmp: Path, name: str) -> Path:
    folder = RunFolder(tmp / name).open()
    _held.append(folder)
    return tmp / name


@pytest.fixture(autouse=True, scope="module")
def _release_locks():
    yield
    for folder in _held:
        folder.close()


CASES = [
    # configs
    BadInput("yaml-syntax", lambda t: train(t, "task: toy\ntrain: {max_steps: 2\n"), r"c\.yaml: not valid YAML"),
    BadInput("yaml-top-level-list", lambda t: train(t, "- task\n- toy\n"), r"c\.yaml: the top level must be a mapping"),
    BadInput("unknown-key", lambda t: train(t, TOY + "model: {widht: 3}\n"), r"c\.yaml: unknown key 'model\.widht'"),
    BadInput("views-not-splatting", lambda t: train(t, TOY, "--views", "3"),
             r"--views 3: only splatting runs train on a number of views; .*c\.yaml is a toy config"),
    BadInput("wrong-type", lambda t: train(t, TOY.replace("max_steps: 2", "max_steps: ten")),
             r"c\.yaml.*train\.max_steps.*int"),
    BadInput("missing-base", lambda t: train(t, "_base_: nowhere.yaml\n" + TOY),
             r"nowhere\.yaml: config file not found \(named in _base_ of .*c\.yaml\)"),
    BadInput("base-cycle", lambda t: (config(t, "_base_: c.yaml\n", "b.yaml"), train(t, "_base_: b.yaml\n" + TOY))[1],
             r"_base_ cycle"),
    BadInput("unknown-task", lambda t: train(t, "task: segmentation\n"), r"unknown task 'segmentation'.*detection"),
    BadInput("missing-task", lambda t: train(t, "train: {lr: 0.1}\n"), r"c\.yaml: missing key 'task'"),
    BadInput("set-without-equals", lambda t: train(t, TOY, "--set", "train.lr"), r"train\.lr.*KEY=VALUE|="),
    BadInput("set-unknown-key", lambda t: train(t, TOY, "--set", "train.lrr=0.1"), r"unknown key 'train\.lrr'"),
    BadInput("set-wrong-type", lambda t: train(t, TOY, "--set", "train.lr=fast"), r"train\.lr.*float"),
    BadInput("max-steps-zero", lambda t: train(t, TOY, "--set", "train.max_steps=0"), r"train\.max_steps must be >= 1"),
    BadInput("lr-negative", lambda t: train(t, TOY, "--set", "train.lr=-1"), r"train\.lr must be a positive number"),
    BadInput("lr-nan", lambda t: train(t, TOY, "--set", "train.lr=.nan"), r"train\.lr must be a positive number"),
    BadInput("batch-larger-than-data", lambda t: train(t, TOY, "--set", "train.batch_size=100"),
             r"train\.batch_size=100 is larger than the training set \(24 samples\)"),
    BadInput("warmup-beyond-run", lambda t: train(t, TOY, "--set", "train.warmup_steps=5"),
             r"train\.warmup_steps=5 exceeds train\.max_steps=2"),
    BadInput("min-lr-ratio", lambda t: train(t, TOY, "--set", "train.min_lr_ratio=2"), r"train\.min_lr_ratio must be in"),
    BadInput("grad-clip-zero", lambda t: train(t, TOY, "--set", "train.grad_clip=0"), r"train\.grad_clip must be > 0"),
    BadInput("optimizer-name", lambda t: train(t, TOY, "--set", "train.optimizer=rmsprop"),
             r"train\.optimizer.*'adamw'"),
    BadInput("config-is-a-folder", lambda t: Tool("train", ("--config", str(t))), r"--config .*: file not found"),
    # run folders
    BadInput("out-is-a-file", lambda t: (config(t, "x", "f.txt"), train(t, TOY, out="f.txt"))[1],
             r"--out .*f\.txt: exists and is not a folder"),
    BadInput("out-below-a-file", lambda t: (config(t, "x", "f.txt"), train(t, TOY, out="f.txt/run"))[1],
             r"--out .*f\.txt/run: cannot create the folder"),
    # a read-only place: /sys refuses new folders even to root (file permissions do not stop root)
    BadInput("out-read-only", lambda t: train(t, TOY, out="/sys/p3d_run"),
             r"--out .*/sys/p3d_run: cannot create the folder \(Operation not permitted\)"),
    BadInput("detection-data-root-read-only", lambda t: Tool("train", (
        "--config", str(REPO / "configs" / "quickstart.yaml"), "--out", str(t / "run"),
        "--set", "data.root=/sys/p3d_kitti", "--set", "data.synthetic.frames=2", "--set", "data.synthetic.val_fraction=0.5")),
             r"data\.root=/sys/p3d_kitti: cannot generate the synthetic dataset there \(Operation not permitted"),
    BadInput("splatting-data-root-read-only", lambda t: Tool("train", (
        "--config", str(REPO / "configs" / "splatting" / "3dgs_quickstart.yaml"), "--out", str(t / "run"),
        "--set", "data.root=/sys/p3d_views")),
             r"data\.root=/sys/p3d_views: cannot generate the synthetic scene there \(Operation not permitted"),
    BadInput("out-holds-an-earlier-run", lambda t: (trained_run(t), train(t, TOY))[1],
             r"--out .*run: holds an earlier run \(config\.yaml, log\.jsonl, ckpt/latest\.pt.*--resume"),
    BadInput("resume-with-another-model", lambda t: (trained_run(t), train(t, TOY, "--resume", "--set", "model.hidden=32"))[1],
             r"ckpt/step_00000002\.pt: checkpoint weights do not match ToyMLP.*shape mismatches: net\.0\.weight"),
    BadInput("out-owned-by-another-process", lambda t: (locked(t, "run"), train(t, TOY))[1],
             r"--out .*run: another process \(pid \d+\) is writing this folder"),
    BadInput("eval-ckpt-corrupt", lambda t: (config(t, "not a checkpoint", "c.pt"),
                                             Tool("eval", ("--config", str(config(t, TOY)), "--ckpt", str(t / "c.pt"),
                                                           "--out", str(t / "ev"))))[1],
             r"c\.pt: cannot read checkpoint \(truncated or corrupt file\?\)"),
    BadInput("eval-ckpt-folder-without-checkpoint", lambda t: Tool("eval", ("--config", str(config(t, TOY)), "--ckpt", str(t))),
             r"folder has no ckpt/latest\.pt"),
    BadInput("eval-ckpt-missing", lambda t: Tool("eval", ("--config", str(config(t, TOY)), "--ckpt", str(t / "no.pt"))),
             r"no\.pt: no such checkpoint file or run folder"),
    BadInput("eval-config-missing", lambda t: Tool("eval", ("--config", str(t / "no.yaml"), "--ckpt", str(t))),
             r"no\.yaml: file not found"),
    BadInput("eval-another-model", lambda t: (trained_run(t), Tool("eval", (
        "--config", str(config(t, TOY + "model: {hidden: 8}\n", "other.yaml")), "--ckpt", str(t / "run"),
        "--out", str(t / "ev"))))[1], r"checkpoint weights do not match ToyMLP"),
    BadInput("eval-out-owned-by-another-process", lambda t: (trained_run(t), locked(t, "ev"), Tool("eval", (
        "--config", str(t / "run" / "config.yaml"), "--ckpt", str(t / "run"), "--out", str(t / "ev"))))[-1],
             r"--out .*ev: another process \(pid \d+\) is writing this folder"),
    BadInput("eval-out-is-a-file", lambda t: (trained_run(t), Tool("eval", (
        "--config", str(t / "run" / "config.yaml"), "--ckpt", str(t / "run"), "--out", str(t / "toy.yaml"))))[1],
             r"--out .*toy\.yaml: exists and is not a folder"),
    BadInput("max-steps-zero-names-the-set", lambda t: train(t, TOY, "--set", "train.max_steps=0"),
             r"error: --set train\.max_steps=0: invalid 'train'"),
    BadInput("make-synthetic-frames-zero", lambda t: Tool("make-synthetic", ("--out", str(t / "k"), "--frames", "0")),
             r"--frames must be >= 1"),
    BadInput("make-synthetic-into-a-foreign-folder", lambda t: (config(t, "x", "k/notes.txt"), Tool(
        "make-synthetic", ("--out", str(t / "k"), "--frames", "1")))[1], r"k: the folder .*not a dataset"),
    BadInput("eval-weights-corrupt", lambda t: (config(t, "not safetensors", "w.safetensors"), Tool("eval", (
        "--config", str(config(t, TOY)), "--ckpt", str(t / "w.safetensors"), "--out", str(t / "ev"))))[1],
             r"w\.safetensors: cannot read the weights \(truncated or not a safetensors file\?\)"),
    BadInput("eval-weights-of-another-program", lambda t: (_foreign_safetensors(t / "w.safetensors"), Tool("eval", (
        "--config", str(config(t, TOY)), "--ckpt", str(t / "w.safetensors"), "--out", str(t / "ev"))))[1],
             r"w\.safetensors: not perception3d weights \(metadata format None"),
    BadInput("export-weights-not-safetensors", lambda t: (trained_run(t), Tool("export", (
        str(t / "run"), "--out", str(t / "w.pt"))))[1], r"w\.pt: expected a \.safetensors file name"),
    BadInput("export-weights-no-checkpoint", lambda t: Tool("export", (str(t), "--out", str(t / "w.safetensors"))),
             r"is a folder without a ckpt/latest\.pt"),
    BadInput("bench-repeats-zero", lambda t: Tool("bench", ("voxelize", "--repeats", "0")), r"--repeats must be >= 1"),
    BadInput("bench-unknown-name", lambda t: Tool("bench", ("rasterise",)), r"invalid choice: 'rasterise'"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    if "read-only" in case.id and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux's read-only /sys")
    check_bad_input(case, tmp_path, capsys, monkeypatch)
