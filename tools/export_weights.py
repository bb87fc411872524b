"""`python tools/export_weights.py ...` is `p3d export ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
