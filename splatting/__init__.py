"""Gaussian splatting on the perception3d core: rasterizer, models, data, training (see design.md)."""
import perception3d  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
