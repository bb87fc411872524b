"""The compact `.splat` format of the antimatter15 web viewer (read and write).

A `.splat` file has no header: N records of 32 bytes, one per Gaussian, little-endian::

    offset  0  position  3 x float32   (x, y, z, scene units)
    offset 12  scale     3 x float32   (linear scale = exp(log scale))
    offset 24  colour    4 x uint8     R, G, B = clip(0.5 + C0 * sh0, 0, 1) * 255,  A = sigmoid(logit) * 255
    offset 28  rotation  4 x uint8     normalised quaternion (w, x, y, z) as clip(q * 128 + 128, 0, 255)

with `C0 = 0.28209479177387814` (the degree-0 SH constant). Only the view-independent colour is
kept: higher-order SH coefficients are dropped.

Choices made here:

- **Order.** Like the viewer's own converter, the writer sorts Gaussians by descending importance
  `exp(scale_0 + scale_1 + scale_2) * sigmoid(opacity)` (volume times opacity), so that a viewer
  streaming the file draws the large opaque Gaussians first. Ties keep the input order. The
  permutation is returned by :func:`save_splat`.
- **Quantisation.** Bytes are *rounded* to the nearest level (the reference converter truncates),
  which halves the error: colour and alpha within 0.5/255, each quaternion component within
  0.5/128 before renormalisation.
- **Reading** inverts the mapping: `sh0 = (rgb / 255 - 0.5) / C0`, quaternions normalised, and the
  opacity logit from the 8-bit alpha clamped to `[0.5, 254.5] / 255` so that alpha 0 or 255 gives a
  finite logit (about -6.24 and +6.24).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_write_bytes
from splatting.io.gaussian_ply import _check_inputs, check_output_path
from splatting.sh import SH_C0

__all__ = ["save_splat", "load_splat", "SPLAT_RECORD", "splat_importance"]

#: numpy dtype of one 32-byte `.splat` record
SPLAT_RECORD = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)), ("rgba", "u1", (4,)),
                         ("rot", "u1", (4,))])

_ALPHA_CLAMP = (0.5, 254.5)  # 8-bit alpha levels the logit is computed from


def splat_importance(scales_log: torch.Tensor, opacities_logit: torch.Tensor) -> torch.Tensor:
    """Log of the `.splat` sort key: `log(exp(sum scales_log) * sigmoid(opacity))`.

    Args:
        scales_log: `[N, 3]` log scales.
        opacities_logit: `[N]` opacity logits.

    Returns:
        `float64 [N]`; larger is more important (written first). Computed in log space so that
        large scales do not overflow.
    """
    s = torch.as_tensor(scales_log).detach().to("cpu", torch.float64)
    o = torch.as_tensor(opacities_logit).detach().to("cpu", torch.float64).reshape(-1)
    return s.sum(dim=1) + torch.nn.functional.logsigmoid(o)


def save_splat(path: str | Path, means, quats, scales_log, opacities_logit, sh0) -> torch.Tensor:
    """Write Gaussians as an antimatter15 `.splat` file, sorted by importance, atomically.

    Args:
        path: output `.splat`; parent folders are created.
        means: `[N, 3]` centres.
        quats: `[N, 4]` rotations `(w, x, y, z)`; normalised before quantisation.
        scales_log: `[N, 3]` natural-log scales (written as `exp`, float32).
        opacities_logit: `[N]` (or `[N, 1]`) opacity logits.
        sh0: `[N, 1, 3]` (or `[N, 3]`) degree-0 SH coefficients.

    Returns:
        `int64 [N]` permutation: record `i` of the file is input Gaussian `order[i]` (descending
        :func:`splat_importance`).

    Raises:
        DataError: wrong shapes, N = 0, NaN/inf inputs, a zero quaternion, or a log scale whose
            `exp` overflows float32 (all naming the argument and the first bad row).
    """
    path = check_output_path(path, ".splat")
    m, q, s, o, c0, _ = _check_inputs(means, quats, scales_log, opacities_logit, sh0)
    n = m.shape[0]
    qn64 = q.astype(np.float64)
    norm = np.linalg.norm(qn64, axis=1)
    if (norm == 0).any():
        raise DataError(f"quats: {int((norm == 0).sum())} quaternions are zero and cannot be normalised "
                        f"(first at row {int(np.argmax(norm == 0))})")
    with np.errstate(over="ignore"):
        lin = np.exp(s.astype(np.float32))
    if not np.isfinite(lin).all():
        bad = ~np.isfinite(lin).all(axis=1)
        raise DataError(f"scales_log: {int(bad.sum())} Gaussians have exp(scale) beyond float32 "
                        f"(first at row {int(np.argmax(bad))}, value {s[np.argmax(bad)].max():.4g})")
    score = splat_importance(torch.from_numpy(s), torch.from_numpy(o)).numpy()
    order = np.argsort(-score, kind="stable")

    rec = np.empty(n, dtype=SPLAT_RECORD)
    rec["position"] = m[order]
    rec["scale"] = lin[order]
    rgb = np.clip(0.5 + SH_C0 * c0.reshape(n, 3).astype(np.float64), 0.0, 1.0)
    alpha = 1.0 / (1.0 + np.exp(-o.reshape(n).astype(np.float64)))
    rgba = np.concatenate([rgb, alpha[:, None]], axis=1)
    rec["rgba"] = np.round(rgba[order] * 255.0).astype(np.uint8)
    qn = qn64 / norm[:, None]
    rec["rot"] = np.clip(np.round(qn[order] * 128.0 + 128.0), 0, 255).astype(np.uint8)
    atomic_write_bytes(path, rec.tobytes())
    return torch.from_numpy(order.astype(np.int64))


def load_splat(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an antimatter15 `.splat` file.

    Args:
        path: `.splat` file.

    Returns:
        dict of float32 CPU tensors, in file order: `means [N, 3]`, `quats [N, 4]` (w, x, y, z,
        unit norm), `scales_log [N, 3]`, `opacities_logit [N]` (finite: alpha clamped to
        [0.5, 254.5] / 255), `sh0 [N, 1, 3]` (from the 8-bit colour). No `shN`.

    Raises:
        DataError: missing or empty file, a PLY / .cgs / checkpoint file named .splat, a size that is
            not a multiple of 32 bytes, NaN/inf
            positions or scales, non-positive scales, or an all-zero quaternion (naming the first bad
            record).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected an antimatter15 .splat file")
    if not path.is_file():
        raise DataError(f"{path}: .splat file not found")
    raw = path.read_bytes()
    if len(raw) == 0:
        raise DataError(f"{path}: empty .splat file (0 bytes), expected N x 32-byte records")
    for magic, kind in ((b"ply\n", "a PLY file (load it with load_gaussian_ply)"), (b"ply\r\n", "a PLY file"),
                        (b"P3D-CGS", "a Compact 3DGS .cgs file"),
                        (b"PK\x03\x04", "a zip archive (a torch checkpoint?)"), (b"\x93NUMPY", "a .npy array")):
        if raw.startswith(magic):  # a .splat has no header; these would be read as garbage Gaussians
            raise DataError(f"{path}: this is {kind}, not an antimatter15 .splat file (headerless 32-byte records)")
    if len(raw) % SPLAT_RECORD.itemsize:
        raise DataError(f"{path}: size {len(raw)} bytes is not a multiple of {SPLAT_RECORD.itemsize} "
                        f"(one .splat record per Gaussian); the file is truncated or not a .splat file")
    rec = np.frombuffer(raw, dtype=SPLAT_RECORD)
    n = rec.shape[0]
    pos = rec["position"].astype(np.float32)
    scale = rec["scale"].astype(np.float32)
    for name, arr in (("position", pos), ("scale", scale)):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: {name} of {int(bad.sum())} of {n} records is NaN/inf "
                            f"(first at record {int(np.argmax(bad))})")
    bad = ~(scale > 0).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: scale of {int(bad.sum())} of {n} records is <= 0, expected linear scales > 0 "
                        f"(first at record {int(np.argmax(bad))})")
    q = (rec["rot"].astype(np.float64) - 128.0) / 128.0
    norm = np.linalg.norm(q, axis=1)
    if (norm == 0).any():
        raise DataError(f"{path}: rotation of {int((norm == 0).sum())} records is the zero quaternion "
                        f"(bytes 128 128 128 128; first at record {int(np.argmax(norm == 0))})")
    rgba = rec["rgba"].astype(np.float64)
    sh0 = (rgba[:, :3] / 255.0 - 0.5) / SH_C0
    a = np.clip(rgba[:, 3], *_ALPHA_CLAMP) / 255.0
    logit = np.log(a) - np.log1p(-a)
    f32 = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    return {
        "means": f32(pos),
        "quats": f32(q / norm[:, None]),
        "scales_log": f32(np.log(scale)),
        "opacities_logit": f32(logit),
        "sh0": f32(sh0).reshape(n, 1, 3),
    }
