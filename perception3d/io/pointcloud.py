"""Point-cloud file readers and writers: KITTI `.bin`, PCD (ascii / binary / binary_compressed), PLY.

Readers return plain numpy arrays; every malformed input raises `DataError` naming the file, the
field and what was expected. `read_pcd` and `read_ply` return an ordered `dict` of field name ->
array (`[N]`, or `[N, COUNT]` for PCD fields with COUNT > 1); `read_points` dispatches on the file
extension and returns `float32 [N, 4] = (x, y, z, intensity)` metres.

PCD `binary_compressed` uses LZF (the liblzf format); the codec is implemented here with numba
(`lzf_decompress`, `lzf_compress`), no extra dependency.
"""
from __future__ import annotations

from pathlib import Path

import numba
import numpy as np

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_write_bytes

__all__ = [
    "read_kitti_bin",
    "write_kitti_bin",
    "read_pcd",
    "write_pcd",
    "read_ply",
    "write_ply",
    "read_points",
    "lzf_compress",
    "lzf_decompress",
]

INTENSITY_NAMES = ("intensity", "reflectance", "i", "scalar_intensity", "remission")


# ------------------------------------------------------------------------------------------------
# KITTI .bin
# ------------------------------------------------------------------------------------------------
def read_kitti_bin(path: str | Path, num_features: int = 4) -> np.ndarray:
    """Read a KITTI velodyne scan: raw little-endian float32 records.

    Args:
        path: `.bin` file.
        num_features: floats per point (4 for KITTI: x, y, z, reflectance; 6 for our radar files).

    Returns:
        `float32 [N, num_features]` (x, y, z in metres, then the other features).

    Raises:
        DataError: missing file, size not a multiple of `4 * num_features` bytes, empty, NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point file not found")
    raw = path.read_bytes()
    rec = 4 * num_features
    if len(raw) == 0:
        raise DataError(f"{path}: empty point cloud (0 bytes), expected N x {num_features} float32 values")
    if len(raw) % rec:
        raise DataError(
            f"{path}: size {len(raw)} bytes is not a multiple of {rec} "
            f"({num_features} float32 per point); the file is truncated or not a KITTI .bin"
        )
    pts = np.frombuffer(raw, dtype="<f4").reshape(-1, num_features).astype(np.float32)
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} points contain NaN or inf (first at point {int(np.argmax(bad))})")
    return pts


def write_kitti_bin(path: str | Path, points: np.ndarray) -> None:
    """Write `[N, C]` points as little-endian float32 records (KITTI `.bin`)."""
    atomic_write_bytes(path, np.ascontiguousarray(points, dtype="<f4").tobytes())


# ------------------------------------------------------------------------------------------------
# LZF (liblzf format), used by PCD binary_compressed
# ------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _lzf_decompress(src, out):  # pragma: no cover - numba
    ip = 0
    op = 0
    n_in = src.shape[0]
    n_out = out.shape[0]
    while ip < n_in:
        ctrl = np.int64(src[ip])
        ip += 1
        if ctrl < 32:
            ln = ctrl + 1
            if op + ln > n_out or ip + ln > n_in:
                return -1
            for k in range(ln):
                out[op + k] = src[ip + k]
            op += ln
            ip += ln
        else:
            ln = ctrl >> 5
            if ln == 7:
                if ip >= n_in:
                    return -1
                ln += np.int64(src[ip])
                ip += 1
            if ip >= n_in:
                return -1
            ref = op - ((ctrl & 0x1F) << 8) - 1 - np.int64(src[ip])
            ip += 1
            ln += 2
            if ref < 0 or op + ln > n_out:
                return -1
            for k in range(ln):  # byte-wise: the source may overlap the destination
                out[op + k] = out[ref + k]
            op += ln
    return op


@numba.njit(cache=True)
def _lzf_literals(src, start, end, out, op):  # pragma: no cover - numba
    """Write `src[start:end]` as LZF literal runs (at most 32 bytes each) at `out[op:]`; the new `op`."""
    s = start
    while s < end:
        run = min(32, end - s)
        out[op] = run - 1
        op += 1
        for k in range(run):
            out[op + k] = src[s + k]
        op += run
        s += run
    return op


@numba.njit(cache=True)
def _lzf_compress(src, out):  # pragma: no cover - numba
    n = src.shape[0]
    htab = np.full(1 << 14, -1, np.int64)
    op = 0
    lit_start = 0
    ip = 0
    while ip < n:
        best_len = 0
        ref = -1
        if ip + 2 < n:
            h = ((np.int64(src[ip]) << 16) | (np.int64(src[ip + 1]) << 8) | np.int64(src[ip + 2]))
            h = ((h * 2654435761) >> 10) & ((1 << 14) - 1)
            ref = htab[h]
            htab[h] = ip
            if ref >= 0 and ip - ref - 1 < 8192:
                maxlen = min(264, n - ip)
                ln = 0
                while ln < maxlen and src[ref + ln] == src[ip + ln]:
                    ln += 1
                if ln >= 3:
                    best_len = ln
        if best_len == 0:
            ip += 1
            continue
        op = _lzf_literals(src, lit_start, ip, out, op)
        off = ip - ref - 1
        ln2 = best_len - 2
        if ln2 < 7:
            out[op] = (ln2 << 5) | (off >> 8)
            op += 1
        else:
            out[op] = (7 << 5) | (off >> 8)
            out[op + 1] = ln2 - 7
            op += 2
        out[op] = off & 0xFF
        op += 1
        ip += best_len
        lit_start = ip
    return _lzf_literals(src, lit_start, n, out, op)


def lzf_decompress(data: bytes, uncompressed_size: int) -> bytes:
    """Decompress an LZF block (liblzf format) of known output size.

    Raises:
        DataError: the block is corrupt or does not decompress to `uncompressed_size` bytes.
    """
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(uncompressed_size, dtype=np.uint8)
    n = _lzf_decompress(src, out) if src.size else 0
    if n != uncompressed_size:
        raise DataError(f"LZF block is corrupt: decoded {n} bytes, expected {uncompressed_size}")
    return out.tobytes()


def lzf_compress(data: bytes) -> bytes:
    """Compress bytes with LZF (liblzf format, readable by PCL / Open3D)."""
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(src.size + src.size // 32 + 16, dtype=np.uint8)
    n = _lzf_compress(src, out) if src.size else 0
    return out[:n].tobytes()


# ------------------------------------------------------------------------------------------------
# PCD
# ------------------------------------------------------------------------------------------------
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}
_PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")


def _parse_pcd_header(path: Path, raw: bytes) -> tuple[dict, int]:
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0:
            raise DataError(f"{path}: PCD header has no 'DATA' line (expected keys {' '.join(_PCD_KEYS)})")
        line = raw[pos:end].decode("ascii", errors="replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *vals = line.split()
        key = key.upper()
        if key not in _PCD_KEYS:
            raise DataError(f"{path}: unknown PCD header key {key!r} (expected one of {', '.join(_PCD_KEYS)})")
        header[key] = vals
        if key == "DATA":
            return header, pos


def _pcd_layout(path: Path, header: dict) -> tuple[list[str], list[np.dtype], list[int], int]:
    for key in ("FIELDS", "SIZE", "TYPE", "DATA"):
        if key not in header:
            raise DataError(f"{path}: PCD header is missing the {key} line")
    names = header["FIELDS"]
    n_f = len(names)
    counts = header.get("COUNT", ["1"] * n_f)
    for key, vals in (("SIZE", header["SIZE"]), ("TYPE", header["TYPE"]), ("COUNT", counts)):
        if len(vals) != n_f:
            raise DataError(f"{path}: PCD {key} has {len(vals)} entries, expected {n_f} (one per FIELDS entry)")
    try:
        sizes = [int(s) for s in header["SIZE"]]
        counts = [int(c) for c in counts]
    except ValueError:
        raise DataError(f"{path}: PCD SIZE/COUNT must be integers, got {header['SIZE']} / {counts}") from None
    if min(counts, default=1) < 1:
        raise DataError(f"{path}: PCD COUNT must be >= 1 for every field, got {counts} for FIELDS {names}")
    dup = sorted({nm for nm in names if nm != "_" and names.count(nm) > 1})
    if dup:
        raise DataError(f"{path}: PCD FIELDS {names} name {dup} more than once; expected distinct names "
                        "('_' for padding)")
    dtypes = []
    for name, t, s in zip(names, header["TYPE"], sizes):
        key = (t.upper(), s)
        if key not in _PCD_TYPES:
            raise DataError(f"{path}: PCD field {name!r} has TYPE {t!r} SIZE {s}; expected TYPE F (SIZE 4/8), "
                            f"I or U (SIZE 1/2/4/8)")
        dtypes.append(np.dtype("<" + _PCD_TYPES[key]))
    try:
        n = int(header["POINTS"][0]) if "POINTS" in header else None
        wh = (int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])) if "WIDTH" in header else None
    except (ValueError, IndexError):
        raise DataError(f"{path}: PCD POINTS, WIDTH and HEIGHT must be integers") from None
    if n is None and wh is None:
        raise DataError(f"{path}: PCD header has neither POINTS nor WIDTH / HEIGHT (the number of points)")
    if n is not None and wh is not None and n != wh and n >= 0 and wh >= 0:
        raise DataError(f"{path}: PCD POINTS {n} differs from WIDTH x HEIGHT = {wh}; expected them equal")
    n = n if n is not None else wh
    if n < 0:
        raise DataError(f"{path}: PCD POINTS must be >= 0, got {n}")
    return names, dtypes, counts, n


def read_pcd(path: str | Path, allow_nan: bool = False) -> dict[str, np.ndarray]:
    """Read a PCD file (DATA ascii, binary or binary_compressed).

    SIZE, TYPE and COUNT are honoured; padding fields named `_` are dropped.

    Args:
        path: `.pcd` file.
        allow_nan: keep points whose x/y/z are NaN/inf (organised clouds); rejected by default.

    Returns:
        Ordered dict field name -> array `[N]` (COUNT 1) or `[N, COUNT]`, in the file's dtypes.

    Raises:
        DataError: missing file, malformed header, unknown TYPE, truncated data, NaN points.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: PCD file not found")
    raw = path.read_bytes()
    header, pos = _parse_pcd_header(path, raw)
    names, dtypes, counts, n = _pcd_layout(path, header)
    mode = header["DATA"][0].lower() if header["DATA"] else ""
    out: dict[str, np.ndarray] = {}
    if mode == "ascii":
        total = sum(counts)
        try:
            vals = np.array(raw[pos:].split(), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: non-numeric value in the ascii PCD data") from None
        if vals.size != n * total:
            raise DataError(f"{path}: ascii PCD data has {vals.size} values, expected POINTS {n} x {total} = "
                            f"{n * total}")
        vals = vals[: n * total].reshape(n, total)
        col = 0
        for name, dt, c in zip(names, dtypes, counts):
            block = vals[:, col:col + c].astype(dt)
            col += c
            if name != "_":
                out[name] = block[:, 0] if c == 1 else block
    elif mode == "binary":
        fields = [(f"_pad{i}" if nm == "_" else nm, dt, (c,) if c > 1 else ()) for i, (nm, dt, c)
                  in enumerate(zip(names, dtypes, counts))]
        try:
            rec = np.dtype([(nm, dt, shp) for nm, dt, shp in fields])
        except ValueError as exc:
            raise DataError(f"{path}: PCD FIELDS {names} are not valid (duplicate names?): {exc}") from None
        need = n * rec.itemsize
        if len(raw) - pos != need:
            what = "truncated" if len(raw) - pos < need else "longer than its header says"
            raise DataError(f"{path}: binary PCD data is {what}: {len(raw) - pos} bytes, expected "
                            f"POINTS {n} x {rec.itemsize} = {need}")
        arr = np.frombuffer(raw, dtype=rec, count=n, offset=pos)
        for nm, _, _ in fields:
            if not nm.startswith("_pad"):
                out[nm] = np.array(arr[nm])
    elif mode == "binary_compressed":
        if len(raw) - pos < 8:
            raise DataError(f"{path}: binary_compressed PCD has no size header after DATA")
        csize, usize = np.frombuffer(raw, dtype="<u4", count=2, offset=pos)
        csize, usize = int(csize), int(usize)
        need = n * sum(dt.itemsize * c for dt, c in zip(dtypes, counts))
        if usize != need:
            raise DataError(f"{path}: binary_compressed PCD declares {usize} uncompressed bytes, "
                            f"expected POINTS {n} x point size = {need}")
        if len(raw) - pos - 8 < csize:
            raise DataError(f"{path}: binary_compressed PCD is truncated: {len(raw) - pos - 8} bytes, "
                            f"expected {csize}")
        try:
            data = lzf_decompress(raw[pos + 8:pos + 8 + csize], usize)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        off = 0  # column-major: all values of field 0, then field 1, ...
        for name, dt, c in zip(names, dtypes, counts):
            block = np.frombuffer(data, dtype=dt, count=n * c, offset=off).reshape(n, c)
            off += n * c * dt.itemsize
            if name != "_":
                out[name] = np.array(block[:, 0] if c == 1 else block)
    else:
        raise DataError(f"{path}: PCD DATA {' '.join(header['DATA'])!r}, expected ascii, binary or binary_compressed")
    if not allow_nan:
        _check_xyz_finite(path, out, n)
    return out


def _check_xyz_finite(path: Path, fields: dict[str, np.ndarray], n: int) -> None:
    for k in ("x", "y", "z"):
        if k in fields and fields[k].dtype.kind == "f":
            bad = ~np.isfinite(fields[k])
            if bad.any():
                raise DataError(f"{path}: field {k!r} has {int(bad.sum())} NaN/inf values out of {n} points "
                                f"(first at point {int(np.argmax(bad))})")


def _as_field_dict(fields, names) -> dict[str, np.ndarray]:
    if isinstance(fields, dict):
        out = {k: np.asarray(v) for k, v in fields.items()}
    else:
        arr = np.asarray(fields)
        if arr.ndim != 2:
            raise DataError(f"expected a [N, C] array with field names, got shape {arr.shape}")
        names = list(names or ("x", "y", "z", "intensity")[: arr.shape[1]])
        if len(names) != arr.shape[1]:
            raise DataError(f"{len(names)} field names for {arr.shape[1]} columns")
        out = {k: arr[:, i] for i, k in enumerate(names)}
    lens = {v.shape[0] for v in out.values()}
    if len(lens) != 1:
        raise DataError(f"fields have different lengths: { {k: v.shape[0] for k, v in out.items()} }")
    return out


def write_pcd(path: str | Path, fields: dict[str, np.ndarray] | np.ndarray, data: str = "binary",
              names: list[str] | None = None) -> None:
    """Write a PCD v0.7 file.

    Args:
        path: output `.pcd`.
        fields: dict name -> `[N]` or `[N, COUNT]` array (dtype kept), or a `[N, C]` array with `names`.
        data: "ascii", "binary" or "binary_compressed" (LZF).
        names: field names for an array input (default x, y, z, intensity).
    """
    f = _as_field_dict(fields, names)
    n = next(iter(f.values())).shape[0]
    codes = {"f": "F", "i": "I", "u": "U"}
    heads = {"FIELDS": [], "SIZE": [], "TYPE": [], "COUNT": []}
    cols = []
    for k, v in f.items():
        if v.dtype.kind not in codes:
            v = v.astype(np.float32)
        v = v.astype(v.dtype.newbyteorder("<"))
        cols.append((k, v.reshape(n, -1)))
        heads["FIELDS"].append(k)
        heads["SIZE"].append(str(v.dtype.itemsize))
        heads["TYPE"].append(codes[v.dtype.kind])
        heads["COUNT"].append(str(cols[-1][1].shape[1]))
    hdr = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7"]
    hdr += [f"{k} {' '.join(v)}" for k, v in heads.items()]
    hdr += [f"WIDTH {n}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {n}", f"DATA {data}"]
    head = ("\n".join(hdr) + "\n").encode("ascii")
    if data == "ascii":
        parts = [np.char.mod("%.9g" if v.dtype.kind == "f" else "%d", v) for _, v in cols]
        table = np.concatenate(parts, axis=1) if parts else np.empty((n, 0), str)
        body = ("\n".join(" ".join(r) for r in table) + ("\n" if n else "")).encode("ascii")
    elif data == "binary":
        rec = np.dtype([(f"f{i}", v.dtype, (v.shape[1],)) for i, (_, v) in enumerate(cols)])
        arr = np.empty(n, dtype=rec)
        for i, (_, v) in enumerate(cols):
            arr[f"f{i}"] = v
        body = arr.tobytes()
    elif data == "binary_compressed":
        plain = b"".join(np.ascontiguousarray(v).tobytes() for _, v in cols)  # per field: [N, COUNT]
        comp = lzf_compress(plain)
        body = np.array([len(comp), len(plain)], "<u4").tobytes() + comp
    else:
        raise DataError(f"write_pcd: data must be ascii, binary or binary_compressed, got {data!r}")
    atomic_write_bytes(path, head + body)


# ------------------------------------------------------------------------------------------------
# PLY
# ------------------------------------------------------------------------------------------------
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply(path: str | Path, allow_nan: bool = False) -> dict[str, np.ndarray]:
    """Read the `vertex` element of a PLY file (ascii, binary_little_endian, binary_big_endian).

    Args:
        path: `.ply` file.
        allow_nan: keep vertices whose x/y/z are NaN/inf.

    Returns:
        Ordered dict property name -> `[N]` array (x, y, z and any extra scalar properties).

    Raises:
        DataError: missing file, malformed header, unknown property type, truncated data, no vertex
        element, NaN points.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: PLY file not found")
    raw = path.read_bytes()
    if not raw.startswith(b"ply"):
        raise DataError(f"{path}: not a PLY file (expected the first line 'ply')")
    end = raw.find(b"end_header")
    if end < 0:
        raise DataError(f"{path}: PLY header has no 'end_header' line")
    body = raw.index(b"\n", end) + 1 if b"\n" in raw[end:] else len(raw)
    fmt = None
    elements: list[list] = []  # [name, count, [(prop, dtype or None for list, list types)]]
    for lineno, line in enumerate(raw[:end].decode("ascii", errors="replace").splitlines()[1:], 2):
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            if len(tok) < 2 or tok[1] not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise DataError(f"{path}:{lineno}: PLY format {' '.join(tok[1:])!r}, expected ascii, "
                                f"binary_little_endian or binary_big_endian")
            fmt = tok[1]
        elif tok[0] == "element":
            try:
                elements.append([tok[1], int(tok[2]), []])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{lineno}: expected 'element NAME COUNT', got {line!r}") from None
            if elements[-1][1] < 0:
                raise DataError(f"{path}:{lineno}: element {tok[1]!r} has COUNT {elements[-1][1]}; expected >= 0")
        elif tok[0] == "property":
            if not elements:
                raise DataError(f"{path}:{lineno}: 'property' before any 'element'")
            if len(tok) >= 5 and tok[1] == "list":
                if tok[2] not in _PLY_TYPES or tok[3] not in _PLY_TYPES:
                    raise DataError(f"{path}:{lineno}: unknown PLY list types {tok[2]!r} {tok[3]!r}")
                elements[-1][2].append((tok[4], None, (tok[2], tok[3])))
            elif len(tok) == 3:
                if tok[1] not in _PLY_TYPES:
                    raise DataError(f"{path}:{lineno}: PLY property {tok[2]!r} has unknown type {tok[1]!r} "
                                    f"(expected one of {', '.join(sorted(_PLY_TYPES))})")
                elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]], None))
            else:
                raise DataError(f"{path}:{lineno}: expected 'property TYPE NAME', got {line!r}")
        else:
            raise DataError(f"{path}:{lineno}: unknown PLY header keyword {tok[0]!r}")
    if fmt is None:
        raise DataError(f"{path}: PLY header has no 'format' line")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise DataError(f"{path}: PLY has no 'vertex' element (elements: {names})")
    vi = names.index("vertex")
    n = elements[vi][1]
    props = elements[vi][2]
    if any(p[1] is None for p in props):
        raise DataError(f"{path}: PLY vertex element has a list property; expected scalar properties")
    out: dict[str, np.ndarray] = {}
    if fmt == "ascii":
        lines = raw[body:].split(b"\n")
        skip = sum(e[1] for e in elements[:vi])
        rows = lines[skip:skip + n]
        try:
            vals = np.array(b" ".join(rows).split(), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: non-numeric value in the ascii PLY vertex data") from None
        if vals.size != n * len(props):
            raise DataError(f"{path}: ascii PLY vertex data has {vals.size} values, expected "
                            f"{n} vertices x {len(props)} properties")
        vals = vals.reshape(n, len(props))
        for i, (nm, dt, _) in enumerate(props):
            out[nm] = vals[:, i].astype(dt)
    else:
        bo = "<" if fmt == "binary_little_endian" else ">"
        offset = body
        for e in elements[:vi]:
            if any(p[1] is None for p in e[2]):
                raise DataError(f"{path}: binary PLY element {e[0]!r} with list properties precedes 'vertex'; "
                                f"unsupported")
            offset += e[1] * sum(np.dtype(p[1]).itemsize for p in e[2])
        rec = np.dtype([(nm, bo + dt) for nm, dt, _ in props])
        if len(raw) - offset < n * rec.itemsize:
            raise DataError(f"{path}: binary PLY vertex data is truncated: {max(len(raw) - offset, 0)} bytes, "
                            f"expected {n} vertices x {rec.itemsize} = {n * rec.itemsize}")
        arr = np.frombuffer(raw, dtype=rec, count=n, offset=offset)
        for nm, dt, _ in props:
            out[nm] = arr[nm].astype(np.dtype(dt).newbyteorder("="))
    if not allow_nan:
        _check_xyz_finite(path, out, n)
    return out


def write_ply(path: str | Path, fields: dict[str, np.ndarray] | np.ndarray, binary: bool = True,
              names: list[str] | None = None, big_endian: bool = False) -> None:
    """Write a PLY file with one `vertex` element.

    Args:
        path: output `.ply`.
        fields: dict name -> `[N]` array (dtype kept), or a `[N, C]` array with `names`.
        binary: binary (default little-endian) or ascii.
        names: property names for an array input (default x, y, z, intensity).
        big_endian: with `binary`, write binary_big_endian.
    """
    f = _as_field_dict(fields, names)
    n = next(iter(f.values())).shape[0]
    inv = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint",
           "f4": "float", "f8": "double"}
    cols = []
    for k, v in f.items():
        v = v.reshape(n)
        key = v.dtype.kind + str(v.dtype.itemsize)
        if key not in inv:
            v = v.astype(np.float32)
            key = "f4"
        cols.append((k, v, key))
    fmt = ("binary_big_endian" if big_endian else "binary_little_endian") if binary else "ascii"
    hdr = ["ply", f"format {fmt} 1.0", f"element vertex {n}"]
    hdr += [f"property {inv[key]} {k}" for k, _, key in cols] + ["end_header"]
    head = ("\n".join(hdr) + "\n").encode("ascii")
    if binary:
        bo = ">" if big_endian else "<"
        rec = np.dtype([(f"f{i}", bo + key) for i, (_, _, key) in enumerate(cols)])
        arr = np.empty(n, dtype=rec)
        for i, (_, v, _) in enumerate(cols):
            arr[f"f{i}"] = v
        body = arr.tobytes()
    else:
        parts = [np.char.mod("%.9g" if v.dtype.kind == "f" else "%d", v)[:, None] for _, v, _ in cols]
        table = np.concatenate(parts, axis=1)
        body = ("\n".join(" ".join(r) for r in table) + ("\n" if n else "")).encode("ascii")
    atomic_write_bytes(path, head + body)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def read_points(path: str | Path) -> np.ndarray:
    """Read a point cloud by extension (`.bin`, `.pcd`, `.ply`).

    Returns:
        `float32 [N, 4] = (x, y, z, intensity)` metres; intensity is taken from a field named
        intensity / reflectance / i / scalar_intensity / remission, else zeros.

    Raises:
        DataError: unknown extension, missing x/y/z fields, or any reader error.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".bin":
        return read_kitti_bin(path)
    if ext == ".pcd":
        fields = read_pcd(path)
    elif ext == ".ply":
        fields = read_ply(path)
    else:
        raise DataError(f"{path}: unknown point-cloud extension {ext!r}, expected .bin, .pcd or .ply")
    missing = [k for k in ("x", "y", "z") if k not in fields]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}; found {list(fields)}")
    n = fields["x"].shape[0]
    if n == 0:
        raise DataError(f"{path}: empty point cloud (0 points)")
    inten = next((fields[k] for k in INTENSITY_NAMES if k in fields and fields[k].ndim == 1), np.zeros(n))
    return np.stack([fields["x"], fields["y"], fields["z"], inten], axis=1).astype(np.float32)
