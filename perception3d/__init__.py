"""perception3d: the shared core for sparse voxels and points (see design.md)."""
__version__ = "0.1.0"
