"""`python tools/make_synthetic.py ...` is `p3d make-synthetic ...` (see p3d/cli.py); `--help` describes it."""
import sys

from p3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-synthetic", *sys.argv[1:]]))
