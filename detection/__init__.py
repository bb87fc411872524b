"""3D detection on the perception3d core: voxel detectors, heads, training glue."""
import perception3d  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
