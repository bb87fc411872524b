"""The standard 3D Gaussian splatting `.ply` file (read and write).

This is the layout written by the reference 3DGS trainer and by gsplat / nerfstudio exports, and
opened by the common viewers (SuperSplat, the antimatter15 web viewer, nerfstudio's viewer): a
`binary_little_endian` PLY with one `vertex` element of float32 properties, in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 ... f_rest_{3*(K-1)-1}
    opacity  scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3

with `K = (sh_degree + 1) ** 2` spherical-harmonic coefficients per colour channel:

- `nx ny nz` are zeros (kept for viewers that expect them; ignored on reading).
- `f_dc_*` are the degree-0 SH coefficients of R, G, B (`sh0 [N, 1, 3]`).
- `f_rest_*` are the higher-order coefficients **channel-major**: all `K - 1` coefficients of R,
  then those of G, then of B, i.e. `shN [N, K-1, 3]` transposed to `[N, 3, K-1]` and flattened.
- `opacity` is the logit of the opacity; `scale_*` are natural-log scales (scene units);
  `rot_*` is the quaternion `(w, x, y, z)`, not necessarily normalised.

The reader finds properties by name, so property order, missing normals, extra properties,
`double` properties, ASCII and big-endian files are all accepted (parsing is
:func:`perception3d.io.pointcloud.read_ply`). The SH degree is inferred from the number of
`f_rest_*` properties (0, 9, 24 or 45 for degrees 0-3).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_path
from perception3d.io.pointcloud import read_ply

__all__ = ["save_gaussian_ply", "load_gaussian_ply", "gaussian_ply_property_names"]

#: number of f_rest properties (3 * (K - 1)) -> SH degree
_REST_TO_DEGREE = {3 * ((d + 1) ** 2 - 1): d for d in range(4)}
_REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3")
_REST_RE = re.compile(r"^f_rest_(\d+)$")


_TYPE_SIZES = {"char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
               "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_output_path(path: str | Path, what: str) -> Path:
    """`path` as a Path, or a DataError when a file cannot be written there (a folder, or under a file)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected the path of the {what} file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{path}: cannot write the {what} file: {parent} is a file, not a folder")
            break
    return path


def _check_extent(path: Path) -> None:
    """The element counts of the header against the data the file holds.

    `read_ply` reads as many vertices as the header announces and stops there; a header that
    announces fewer Gaussians than the file holds would silently drop the rest, one that announces a
    negative count would read everything. Here a negative count, or data beyond what the header's
    counts (and property sizes, for binary files) account for, is a DataError; data that falls short
    is left to `read_ply`'s truncation error.
    """
    raw = path.read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        return  # read_ply names the problem
    body = raw.index(b"\n", end) + 1 if b"\n" in raw[end:] else len(raw)
    fmt, elements = None, []  # [name, count, record size or None (list properties)]
    for line in raw[:end].decode("ascii", errors="replace").splitlines()[1:]:
        tok = line.split()
        if len(tok) >= 2 and tok[0] == "format":
            fmt = tok[1]
        elif len(tok) >= 3 and tok[0] == "element":
            try:
                elements.append([tok[1], int(tok[2]), 0])
            except ValueError:
                return  # read_ply names the line
            if elements[-1][1] < 0:
                raise DataError(f"{path}: PLY header: element {tok[1]!r} has a negative count {tok[2]}")
        elif len(tok) >= 3 and tok[0] == "property" and elements:
            size = _TYPE_SIZES.get(tok[1]) if tok[1] != "list" else None
            elements[-1][2] = None if size is None or elements[-1][2] is None else elements[-1][2] + size
    counts = ", ".join(f"'element {n} {c}'" for n, c, _ in elements)
    if fmt == "ascii":
        rows = len([ln for ln in raw[body:].split(b"\n") if ln.strip()])
        total = sum(c for _, c, _ in elements)
        if rows > total:  # fewer: read_ply names the missing values
            raise DataError(f"{path}: the PLY header announces {counts} ({total} data lines) but the file holds "
                            f"{rows} data lines; the rest would be dropped silently (a wrong count?)")
    elif fmt in ("binary_little_endian", "binary_big_endian") and all(r is not None for _, _, r in elements):
        expected = sum(c * r for _, c, r in elements)
        have = len(raw) - body
        if have > expected:  # fewer: read_ply names the truncation
            vertex = next((e for e in elements if e[0] == "vertex"), None)
            room = (f" (room for {have // vertex[2]} Gaussians)" if vertex is not None and len(elements) == 1
                    and vertex[2] and have % vertex[2] == 0 else "")
            raise DataError(f"{path}: the PLY header announces {counts} ({expected} bytes of data) but the file "
                            f"holds {have} bytes{room}; the rest would be dropped silently (a wrong vertex count "
                            "or property list?)")


def gaussian_ply_property_names(sh_degree: int) -> list[str]:
    """The vertex property names, in file order, of a 3DGS `.ply` of the given SH degree (0-3)."""
    if sh_degree not in (0, 1, 2, 3):
        raise DataError(f"sh_degree: expected 0, 1, 2 or 3, got {sh_degree!r}")
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _as_array(name: str, x, shapes: list[tuple[int | None, ...]], n: int | None) -> np.ndarray:
    """Validate one per-Gaussian input and return it as a float32 numpy array.

    Args:
        name: argument name, used in error messages.
        x: tensor or array-like.
        shapes: accepted shapes; `None` in a shape means "any size" (the Gaussian count N in the
            first position). The first accepted shape is the canonical one the result is reshaped to.
        n: the Gaussian count the first dimension must equal (None: not checked).

    Raises:
        DataError: wrong shape, a first dimension other than `n`, or NaN/inf values.
    """
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(x, dtype=np.float32)

    def fits(shape):
        return len(shape) == arr.ndim and all(s is None or s == a for s, a in zip(shape, arr.shape))

    if not any(fits(s) for s in shapes):
        want = " or ".join("[" + ", ".join("N" if s is None else str(s) for s in shp) + "]" for shp in shapes)
        raise DataError(f"{name}: expected shape {want}, got {list(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{name}: has {arr.shape[0]} rows, expected N = {n} (the number of means)")
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1) if arr.size else np.zeros(0, bool)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} Gaussians have NaN or inf values "
                        f"(first at row {int(np.argmax(bad))})")
    if fits(shapes[0]):
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(arr.reshape(arr.shape[0], *shapes[0][1:]))


def _check_inputs(means, quats, scales_log, opacities_logit, sh0, shN=None):
    """Validate the common Gaussian arguments; returns float32 numpy arrays in canonical shapes."""
    m = _as_array("means", means, [(None, 3)], None)
    n = m.shape[0]
    if n == 0:
        raise DataError("means: no Gaussians (N = 0); refusing to write an empty scene")
    q = _as_array("quats", quats, [(None, 4)], n)
    s = _as_array("scales_log", scales_log, [(None, 3)], n)
    o = _as_array("opacities_logit", opacities_logit, [(None,), (None, 1)], n)
    c0 = _as_array("sh0", sh0, [(None, 1, 3), (None, 3)], n)
    if shN is None:
        cn = np.zeros((n, 0, 3), np.float32)
    else:
        cn = _as_array("shN", shN, [(None, None, 3)], n)
        if cn.shape[1] not in (0, 3, 8, 15):
            raise DataError(f"shN: expected [N, K-1, 3] with K-1 in (0, 3, 8, 15) for SH degree 0-3, "
                            f"got {list(cn.shape)}")
    return m, q, s, o, c0, cn


def save_gaussian_ply(path: str | Path, means, quats, scales_log, opacities_logit, sh0, shN=None) -> None:
    """Write Gaussians as a standard 3DGS `.ply` (binary little-endian float32), atomically.

    Args:
        path: output `.ply`; parent folders are created.
        means: `[N, 3]` centres (scene units).
        quats: `[N, 4]` rotations `(w, x, y, z)`, written as given (not normalised).
        scales_log: `[N, 3]` natural-log scales.
        opacities_logit: `[N]` (or `[N, 1]`) opacity logits.
        sh0: `[N, 1, 3]` (or `[N, 3]`) degree-0 SH coefficients (RGB).
        shN: `[N, K-1, 3]` higher-order SH coefficients, `K - 1` in 0, 3, 8, 15; None = degree 0.

    Tensors may live on any device and may require grad; they are detached and copied to CPU.

    Raises:
        DataError: a wrong shape (naming the argument), mismatched Gaussian counts, N = 0, or
            NaN/inf values (naming the argument and the first bad row). Nothing is written then.
    """
    path = check_output_path(path, "Gaussian .ply")
    m, q, s, o, c0, cn = _check_inputs(means, quats, scales_log, opacities_logit, sh0, shN)
    n, km1 = m.shape[0], cn.shape[1]
    degree = {0: 0, 3: 1, 8: 2, 15: 3}[km1]
    names = gaussian_ply_property_names(degree)
    rest = cn.transpose(0, 2, 1).reshape(n, 3 * km1)  # channel-major: R..., G..., B...
    table = np.concatenate([m, np.zeros((n, 3), np.float32), c0.reshape(n, 3), rest, o.reshape(n, 1), s, q],
                           axis=1).astype("<f4")
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
                       + [f"property float {nm}" for nm in names] + ["end_header"]) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(table.tobytes())


def load_gaussian_ply(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a 3DGS `.ply` file.

    Properties are found by name; normals and any extra properties are ignored; float or double
    properties, ASCII and binary (either endianness) PLY files are accepted.

    Args:
        path: `.ply` file.

    Returns:
        dict of float32 CPU tensors: `means [N, 3]`, `quats [N, 4]` (w, x, y, z, as stored),
        `scales_log [N, 3]`, `opacities_logit [N]`, `sh0 [N, 1, 3]`, `shN [N, K-1, 3]`
        (`K - 1 = 0` for SH degree 0).

    Raises:
        DataError: missing file, malformed or truncated PLY (expected vs actual byte count), a header
            whose counts do not account for all the data (trailing bytes or lines), missing required
            properties (all named), integer-typed parameters, an `f_rest_*` count that is not 0, 9, 24
            or 45 or is not numbered contiguously from 0, no Gaussians, or NaN/inf values (naming the
            property).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a 3D Gaussian splatting .ply file")
    if path.is_file():
        _check_extent(path)  # before read_ply, which reads only as many vertices as the header announces
    fields = read_ply(path, allow_nan=True)
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise DataError(f"{path}: not a 3D Gaussian splatting PLY: vertex property(ies) {', '.join(missing)} "
                        f"missing (found {', '.join(fields) or 'none'})")
    rest_idx = sorted(int(mt.group(1)) for k in fields if (mt := _REST_RE.match(k)))
    if len(rest_idx) not in _REST_TO_DEGREE:
        raise DataError(f"{path}: {len(rest_idx)} f_rest_* properties; expected 3 * ((d+1)^2 - 1) = 0, 9, 24 "
                        f"or 45 for SH degree d = 0..3")
    if rest_idx != list(range(len(rest_idx))):
        gaps = sorted(set(range(len(rest_idx))) - set(rest_idx))
        raise DataError(f"{path}: f_rest_* properties must be numbered 0..{len(rest_idx) - 1}; "
                        f"missing f_rest_{gaps[0]}")
    n = fields["x"].shape[0]
    if n == 0:
        raise DataError(f"{path}: the vertex element has 0 Gaussians")
    used = [*_REQUIRED, *(f"f_rest_{i}" for i in rest_idx)]
    wrong = [f"{k} ({fields[k].dtype})" for k in used if fields[k].dtype.kind != "f"]
    if wrong:  # integer parameters are not what any 3DGS writer stores: quantized, or another layout
        raise DataError(f"{path}: vertex property(ies) {', '.join(wrong[:6])}{', ...' if len(wrong) > 6 else ''} "
                        "are integers; a 3D Gaussian splatting PLY stores float (or double) parameters")
    for k in used:
        bad = ~np.isfinite(fields[k])
        if bad.any():
            raise DataError(f"{path}: property {k!r} has {int(bad.sum())} NaN/inf values out of {n} Gaussians "
                            f"(first at vertex {int(np.argmax(bad))})")

    def cols(*names):
        return torch.from_numpy(np.stack([fields[k] for k in names], axis=1).astype(np.float32))

    km1 = len(rest_idx) // 3
    rest = cols(*(f"f_rest_{i}" for i in rest_idx)) if km1 else torch.zeros(n, 0)
    return {
        "means": cols("x", "y", "z"),
        "quats": cols("rot_0", "rot_1", "rot_2", "rot_3"),
        "scales_log": cols("scale_0", "scale_1", "scale_2"),
        "opacities_logit": cols("opacity")[:, 0].contiguous(),
        "sh0": cols("f_dc_0", "f_dc_1", "f_dc_2").reshape(n, 1, 3),
        "shN": rest.reshape(n, 3, km1).transpose(1, 2).contiguous(),
    }
