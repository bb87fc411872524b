"""`python tools/compare_runs.py ...` is `p3d compare ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
