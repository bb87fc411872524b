"""Run a `p3d` command with the test-only toy task registered (`tests/toy_task.py`), as the
tools run from the command line: `python tests/run_tool.py train --config toy.yaml --out OUT`.

The toy is a test fixture, not one of the toolkit's tasks (`p3d/tasks.py`); the run-folder and
command-line tests use it because it trains in a second."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p3d import tasks  # noqa: E402
from p3d.cli import main  # noqa: E402

TOY = ("tests.toy_task:ToyConfig", "tests.toy_task:train", "tests.toy_task:evaluate")


def register_toy() -> None:
    tasks.TASKS.setdefault("toy", TOY)


if __name__ == "__main__":
    register_toy()
    sys.exit(main(sys.argv[1:]))
