"""`python tools/train.py ...` is `p3d train ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
