"""Entropy coding, Morton ordering and the one-file container of the post-processed Compact 3DGS.

* :func:`huffman_encode` / :func:`huffman_decode`: canonical Huffman coding of integer symbols
  (the R-VQ indices) with the ``bitarray`` library; the code is stored as its canonical tables
  (number of codes per length, symbols in canonical order), a few bytes.
* :func:`morton_order`: the permutation sorting points along the Z-order curve of their positions
  quantized to 21 bits per axis; neighbours in space become neighbours in the file.
* :func:`write_container` / :func:`read_container`: ``MAGIC``, a little-endian uint32 header
  length, a UTF-8 JSON header (metadata and, per blob, its offset and size), then the raw blobs.
  Written to a temporary file and renamed into place.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_path

__all__ = ["MAGIC", "huffman_encode", "huffman_decode", "morton_order", "write_container", "read_container"]

MAGIC = b"P3D-CGS1"


def huffman_encode(symbols: np.ndarray) -> tuple[bytes, dict]:
    """Canonical Huffman coding of a 1-D array of non-negative integers.

    Returns:
        ``(payload, table)``: the packed bits and ``{"count", "symbol", "n", "bits"}``, the
        decoding tables (JSON-serialisable).
    """
    symbols = np.asarray(symbols).ravel()
    values, freq = np.unique(symbols, return_counts=True)
    if len(values) == 0:
        return b"", {"count": [], "symbol": [], "n": 0, "bits": 0}
    if len(values) == 1:  # a one-symbol alphabet: no bits needed
        return b"", {"count": [], "symbol": [int(values[0])], "n": int(len(symbols)), "bits": 0}
    code, count, order = canonical_huffman({int(v): int(f) for v, f in zip(values, freq)})
    bits = bitarray(endian="big")
    bits.encode(code, symbols.tolist())
    return bits.tobytes(), {"count": list(count), "symbol": [int(s) for s in order], "n": int(len(symbols)),
                            "bits": len(bits)}


def huffman_decode(payload: bytes, table: dict) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: the int64 symbols.

    Raises:
        ValueError: a malformed table, or a payload that does not decode to exactly ``n`` symbols
            (callers name the file).
    """
    n, nbits = int(table["n"]), int(table["bits"])
    if n < 0 or nbits < 0 or nbits > 8 * len(payload) or len(payload) != (nbits + 7) // 8:
        raise ValueError(f"Huffman table says {n} symbols in {nbits} bits; the payload has {len(payload)} bytes")
    if n == 0:
        return np.zeros(0, np.int64)
    if not table["count"]:
        return np.full(n, table["symbol"][0], np.int64)
    bits = bitarray(endian="big")
    bits.frombytes(payload)
    del bits[nbits:]
    decoded = canonical_decode(bits, table["count"], table["symbol"])
    out = np.fromiter(decoded, dtype=np.int64, count=n)
    if next(decoded, None) is not None:
        raise ValueError(f"Huffman payload holds more than the {n} symbols its table says")
    return out


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the 21 low bits of ``v`` (uint64)."""
    v = v.astype(np.uint64) & np.uint64(0x1FFFFF)
    for shift, mask in ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
                        (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_order(points: np.ndarray) -> np.ndarray:
    """Permutation sorting ``points [N, 3]`` along the Morton (Z-order) curve of their bounding box."""
    p = np.asarray(points, np.float64)
    lo, hi = p.min(0), p.max(0)
    q = ((p - lo) / np.maximum(hi - lo, 1e-12) * (2**21 - 1)).round().astype(np.uint64)
    code = _spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << np.uint64(1)) | (_spread_bits(q[:, 2]) << np.uint64(2))
    return np.argsort(code, kind="stable")


def write_container(path: str | Path, meta: dict, blobs: dict[str, bytes]) -> int:
    """Write ``meta`` and the named ``blobs`` into one file; returns its size in bytes."""
    entries, offset = {}, 0
    for name, data in blobs.items():
        entries[name] = [offset, len(data)]
        offset += len(data)
    header = json.dumps({"meta": meta, "blobs": entries}, separators=(",", ":")).encode()
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected the path of the compact Gaussian file to write")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        for data in blobs.values():
            f.write(data)
    return path.stat().st_size


def read_container(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """``(meta, blobs)`` of a file written by :func:`write_container`.

    Raises:
        DataError: missing file, wrong magic bytes, a corrupt header, blobs that are not laid out
            one after another from the end of the header, a truncated file or trailing bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a compact Gaussian (.cgs) file")
    if not path.is_file():
        raise DataError(f"{path}: compact Gaussian (.cgs) file not found")
    raw = path.read_bytes()
    if raw[:len(MAGIC)] != MAGIC:
        raise DataError(f"{path}: not a compact Gaussian file (expected the magic bytes {MAGIC!r} at the start)")
    start = len(MAGIC) + 4
    if len(raw) < start:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, shorter than the magic and header length")
    (n,) = struct.unpack("<I", raw[len(MAGIC):start])
    if start + n > len(raw):
        raise DataError(f"{path}: truncated: the header needs {n} bytes after byte {start}, the file has "
                        f"{len(raw) - start}")
    try:
        header = json.loads(raw[start:start + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt header (not JSON: {e})") from None
    entries = header.get("blobs") if isinstance(header, dict) else None
    if not isinstance(entries, dict) or not isinstance(header.get("meta"), dict):
        raise DataError(f"{path}: corrupt header (expected an object with 'meta' and 'blobs' objects)")
    body, offset, blobs = start + n, 0, {}
    for k, entry in entries.items():
        if (not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(v, int) and v >= 0 for v in entry)
                or entry[0] != offset):
            raise DataError(f"{path}: corrupt header (blob {k!r} at {entry!r}; expected [offset, size] with offset "
                            f"{offset}, right after the previous blob)")
        size = entry[1]
        blobs[k] = raw[body + offset: body + offset + size]
        if len(blobs[k]) != size:
            raise DataError(f"{path}: truncated (blob {k!r} has {len(blobs[k])} of {size} bytes)")
        offset += size
    if body + offset != len(raw):
        raise DataError(f"{path}: {len(raw) - body - offset} unexpected bytes after the last blob (the header "
                        f"accounts for {body + offset} of {len(raw)} bytes)")
    return header["meta"], blobs
