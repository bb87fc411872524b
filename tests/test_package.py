"""Packaging facts the README promises: the core imports without the extras; every config loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE_MODULES = [
    "perception3d.sparse", "perception3d.ops.voxelize", "perception3d.geometry.iou", "perception3d.geometry.boxes",
    "perception3d.io.kitti", "perception3d.io.pointcloud", "perception3d.synthetic", "perception3d.engine",
    "perception3d.metrics.kitti", "perception3d.metrics.nuscenes", "detection.task", "detection.models.detector",
    "detection.viz", "detection.evaluation",
]


def test_imports_go_one_way():
    """detection and splatting import perception3d; never the reverse, and never each other
    (perception3d/design.md); only the application layer p3d/ sees all three. Checked on the source:
    every import statement of every module."""
    import ast

    rules = {"perception3d": ("detection", "splatting", "p3d", "tools", "tests"),
             "detection": ("splatting", "p3d", "tools", "tests"), "splatting": ("detection", "p3d", "tools", "tests"),
             "p3d": ("tools", "tests")}
    bad = []
    for package, forbidden in rules.items():
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not bad, bad


def test_core_imports_without_the_extras():
    """With open3d and nerfstudio made unimportable, every core module still imports."""
    code = (
        "import sys\n"
        "for m in ('open3d', 'nerfstudio'):\n"
        "    sys.modules[m] = None  # import raises ImportError\n"
        f"import importlib\nfor m in {CORE_MODULES!r}:\n    importlib.import_module(m)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_loads_strictly(path):
    from p3d.tasks import get_task, task_name_of
    from perception3d.config import load_config

    task = get_task(task_name_of(ROOT / path))
    cfg = load_config(ROOT / path, task.config_cls)
    assert cfg.task == task.name
