"""`python tools/eval.py ...` is `p3d eval ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
