"""Run one benchmark: `python tools/bench.py NAME [--repeats N] [--quick]`.

Each benchmark lives in `tools/benchmarks/NAME.py` with `run(repeats: int, quick: bool) -> dict`;
the result is printed as the last line, one JSON object (the figures and their commands: docs/benchmarks.md). `--quick` runs it on tiny
inputs with one repeat, in seconds: it checks that the benchmark works end to end (the tests run
every benchmark so); its numbers are not the benchmark's figures, and its JSON says `"quick": true`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from perception3d.errors import Perception3DError  # noqa: E402


def available() -> list[str]:
    return sorted(p.stem for p in (HERE / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    names = available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=names)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny inputs, one repeat: checks that the benchmark runs (not its figures)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    spec = importlib.util.spec_from_file_location(f"bench_{args.name}", HERE / "benchmarks" / f"{args.name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        result = mod.run(repeats=1 if args.quick else args.repeats, quick=args.quick)
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.quick:
        result["quick"] = True
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from perception3d.engine.numerics import flush_torch_workers

    flush_torch_workers()  # as tools/train.py and tools/eval.py run (see perception3d/engine/numerics.py)
    sys.exit(main())
