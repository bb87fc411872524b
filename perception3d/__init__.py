"""perception3d: the shared core for sparse voxels and points (see design.md)."""
import os as _os
import sys as _sys

# Our compiled CPU kernels (numba sparse conv, the C++ rasterizer) alternate with torch ops in
# many short parallel regions. Under OpenMP's default ACTIVE wait policy, idle worker threads
# spin after every region; as soon as anything else wants the cores (a second process of
# torchrun, a data-loader worker, numba's own pool) the spinning threads steal them: on the
# 2-core machine, with a second training process running, the spconv backbone's
# forward+backward took 3.9 s with ACTIVE and 1.7 s with PASSIVE.
# PASSIVE makes idle threads sleep. It must be set before torch loads OpenMP, hence here, in the
# first module of the toolkit to be imported; an explicit user setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
