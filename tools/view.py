"""`python tools/view.py ...` is `p3d view ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["view", *sys.argv[1:]]))
