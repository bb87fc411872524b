"""Run one benchmark: `p3d bench NAME [--repeats N] [--quick]` (or `p3d bench ...`).

Each benchmark lives in `p3d/benchmarks/NAME.py` with `run(repeats: int, quick: bool) -> dict`;
the result is printed as the last line, one JSON object (the figures and their commands: docs/benchmarks.md). `--quick` runs it on tiny
inputs with one repeat, in seconds: it checks that the benchmark works end to end (the tests run
every benchmark so); its numbers are not the benchmark's figures, and its JSON says `"quick": true`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from perception3d.errors import Perception3DError

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in (HERE / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    names = available()
    ap = argparse.ArgumentParser(prog="p3d bench", description=__doc__)
    ap.add_argument("name", choices=names)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny inputs, one repeat: checks that the benchmark runs (not its figures)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    mod = importlib.import_module(f"p3d.benchmarks.{args.name}")
    try:
        result = mod.run(repeats=1 if args.quick else args.repeats, quick=args.quick)
    except Perception3DError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.quick:
        result["quick"] = True
    print(json.dumps(result))
    return 0

