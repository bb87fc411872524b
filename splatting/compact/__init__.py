"""Compact 3DGS (Lee et al., CVPR 2024): masked, hash-grid-coloured, vector-quantized Gaussians."""
