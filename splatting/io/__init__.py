"""Gaussian-splat file formats: the standard 3DGS `.ply` and the antimatter15 `.splat`.

Both work on plain tensors (`means [N, 3]`, `quats [N, 4]` wxyz, `scales_log [N, 3]`,
`opacities_logit [N]`, `sh0 [N, 1, 3]`, `shN [N, K-1, 3]`), so they do not depend on a model class.
"""
from splatting.io.gaussian_ply import gaussian_ply_property_names, load_gaussian_ply, save_gaussian_ply
from splatting.io.splat import load_splat, save_splat, splat_importance

__all__ = [
    "save_gaussian_ply",
    "load_gaussian_ply",
    "gaussian_ply_property_names",
    "save_splat",
    "load_splat",
    "splat_importance",
]
