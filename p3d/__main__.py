"""`python -m p3d ...` is the `p3d` command."""
import sys

from p3d.cli import main

sys.exit(main())
