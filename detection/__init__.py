"""3D detection on the perception3d core: voxel detectors, heads, training glue."""
