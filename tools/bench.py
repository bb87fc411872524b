"""Run one benchmark: `python tools/bench.py NAME [--repeats N]`.

Each benchmark lives in `tools/benchmarks/NAME.py` with `run(repeats: int) -> dict`; the result is
printed as the last line, one JSON object (see DESIGN.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from perception3d.errors import ConfigError, DataError  # noqa: E402


def available() -> list[str]:
    return sorted(p.stem for p in (HERE / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def main() -> int:
    names = available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=names)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(f"bench_{args.name}", HERE / "benchmarks" / f"{args.name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        result = mod.run(repeats=args.repeats)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from perception3d.engine.numerics import flush_denormals

    flush_denormals()  # as tools/train.py and tools/eval.py run: every torch thread flushes (see numerics)
    sys.exit(main())
