"""Run a `tools/` entry point with the test-only toy task registered (`tests/toy_task.py`), as the
tools run from the command line: `python tests/run_tool.py train --config toy.yaml --out OUT`.

The toy is a test fixture, not one of the toolkit's tasks (`tools/_tasks.py`); the run-folder and
command-line tests use it because it trains in a second."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import _tasks  # noqa: E402

TOY = ("tests.toy_task:ToyConfig", "tests.toy_task:train", "tests.toy_task:evaluate")


def register_toy() -> None:
    _tasks.TASKS.setdefault("toy", TOY)


if __name__ == "__main__":
    from perception3d.engine.numerics import flush_torch_workers

    flush_torch_workers()  # as the tools do
    register_toy()
    sys.exit(importlib.import_module(f"tools.{sys.argv[1]}").main(sys.argv[2:]))
