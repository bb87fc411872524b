"""Point-cloud readers/writers, checked against Open3D as an independent reference."""
from __future__ import annotations

import numpy as np
import pytest

from perception3d.errors import DataError
from perception3d.io.pointcloud import (
    lzf_compress,
    lzf_decompress,
    read_kitti_bin,
    read_pcd,
    read_ply,
    read_points,
    write_kitti_bin,
    write_pcd,
    write_ply,
)

o3d = pytest.importorskip("open3d")


def _cloud(n=500, seed=0):
    rng = np.random.default_rng(seed)
    xyz = (rng.normal(size=(n, 3)) * 10).astype(np.float32)
    rgb = rng.random((n, 3))
    return xyz, rgb


def _o3d_cloud(xyz, rgb):
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(xyz.astype(np.float64))
    pc.colors = o3d.utility.Vector3dVector(rgb)
    return pc


# --- LZF -----------------------------------------------------------------------------------------
def test_lzf_round_trip_and_ratio():
    rng = np.random.default_rng(1)
    data = (np.repeat(rng.integers(0, 4, 3000), 7).astype(np.uint8).tobytes() + rng.bytes(5000)
            + b"abc" * 2000)
    comp = lzf_compress(data)
    assert lzf_decompress(comp, len(data)) == data
    assert len(comp) < 0.6 * len(data)  # the repetitive parts compress
    with pytest.raises(DataError):
        lzf_decompress(comp[: len(comp) // 2], len(data))


# --- PCD vs Open3D -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ascii", "binary", "compressed"])
def test_read_pcd_written_by_open3d(tmp_path, mode):
    xyz, rgb = _cloud()
    path = tmp_path / f"o3d_{mode}.pcd"
    o3d.io.write_point_cloud(str(path), _o3d_cloud(xyz, rgb), write_ascii=mode == "ascii",
                             compressed=mode == "compressed")
    assert (b"binary_compressed" in path.read_bytes()[:400]) == (mode == "compressed")
    f = read_pcd(path)
    got = np.stack([f["x"], f["y"], f["z"]], 1)
    np.testing.assert_allclose(got, xyz, atol=1e-6 * 40)
    # Open3D packs colours into a U4 'rgb' field: 0x00RRGGBB
    rgb_u = f["rgb"].astype(np.uint32)
    r = ((rgb_u >> 16) & 255) / 255.0
    ref = np.asarray(o3d.io.read_point_cloud(str(path)).colors)
    np.testing.assert_allclose(r, ref[:, 0], atol=1.5 / 255)


@pytest.mark.parametrize("mode", ["ascii", "binary", "binary_compressed"])
def test_write_pcd_read_by_open3d(tmp_path, mode):
    xyz, _ = _cloud(seed=2)
    inten = np.linspace(0, 1, len(xyz), dtype=np.float32)
    path = tmp_path / f"ours_{mode}.pcd"
    write_pcd(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "intensity": inten}, data=mode)
    ref = np.asarray(o3d.io.read_point_cloud(str(path)).points)
    assert ref.shape == (500, 3)
    np.testing.assert_allclose(ref, xyz, atol=1e-5)
    pts = read_points(path)
    np.testing.assert_allclose(pts[:, 3], inten, atol=1e-7)


def test_pcd_count_padding_and_int_types(tmp_path):
    """COUNT > 1, a '_' padding field and 1/2/8-byte types, binary and compressed layouts."""
    n = 37
    rng = np.random.default_rng(3)
    xyz = rng.random((n, 3)).astype(np.float32)
    normal = rng.random((n, 3)).astype(np.float64)
    ring = rng.integers(0, 64, n).astype(np.uint16)
    label = rng.integers(-5, 5, n).astype(np.int8)
    for data in ("binary", "binary_compressed", "ascii"):
        p = tmp_path / f"f_{data}.pcd"
        write_pcd(p, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "_": np.zeros((n, 3), np.uint8),
                      "normal": normal, "ring": ring, "label": label}, data=data)
        f = read_pcd(p)
        assert list(f) == ["x", "y", "z", "normal", "ring", "label"]
        assert f["normal"].shape == (n, 3) and f["ring"].dtype == np.uint16 and f["label"].dtype == np.int8
        np.testing.assert_allclose(f["normal"], normal, rtol=1e-8)
        np.testing.assert_array_equal(f["ring"], ring)
        np.testing.assert_array_equal(f["label"], label)


# --- PLY vs Open3D --------------------------------------------------------------------------------
@pytest.mark.parametrize("ascii_", [True, False])
def test_read_ply_written_by_open3d(tmp_path, ascii_):
    xyz, rgb = _cloud(seed=4)
    path = tmp_path / "o3d.ply"
    o3d.io.write_point_cloud(str(path), _o3d_cloud(xyz, rgb), write_ascii=ascii_)
    f = read_ply(path)
    np.testing.assert_allclose(np.stack([f["x"], f["y"], f["z"]], 1), xyz, atol=1e-4 if ascii_ else 1e-6)
    assert f["red"].dtype == np.uint8
    np.testing.assert_allclose(f["red"] / 255.0, rgb[:, 0], atol=1.0 / 255)


@pytest.mark.parametrize("binary,big", [(True, False), (True, True), (False, False)])
def test_write_ply_read_by_open3d(tmp_path, binary, big):
    xyz, _ = _cloud(seed=5)
    path = tmp_path / "ours.ply"
    write_ply(path, np.concatenate([xyz, xyz[:, :1] * 0 + 0.5], 1), binary=binary, big_endian=big)
    ref = np.asarray(o3d.io.read_point_cloud(str(path)).points)
    np.testing.assert_allclose(ref, xyz, atol=1e-5)
    pts = read_points(path)
    assert pts.shape == (500, 4) and np.allclose(pts[:, 3], 0.5)


def test_ply_with_face_element_before_vertex_ascii(tmp_path):
    path = tmp_path / "f.ply"
    path.write_text("ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int vertex_indices\n"
                    "element vertex 2\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
                    "3 0 1 1\n1 2 3\n4 5 6\n")
    f = read_ply(path)
    np.testing.assert_array_equal(f["z"], [3, 6])


# --- KITTI bin -----------------------------------------------------------------------------------
def test_kitti_bin_round_trip(tmp_path):
    pts = np.random.default_rng(6).random((100, 4)).astype(np.float32)
    write_kitti_bin(tmp_path / "a.bin", pts)
    np.testing.assert_array_equal(read_kitti_bin(tmp_path / "a.bin"), pts)
    np.testing.assert_array_equal(read_points(tmp_path / "a.bin"), pts)


@pytest.mark.parametrize("name, write", [
    ("cloud.bin", lambda path, xyz: write_kitti_bin(path, np.c_[xyz, np.ones(len(xyz), np.float32)])),
    ("cloud.pcd", write_pcd),
    ("cloud.ply", write_ply),
])
def test_writers_keep_the_old_file_when_the_write_fails(tmp_path, monkeypatch, name, write):
    import perception3d.io.atomic

    path = tmp_path / name
    xyz, _ = _cloud(50)
    write(path, xyz)
    old = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(perception3d.io.atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write(path, xyz[:10])
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left
    monkeypatch.undo()
    write(path, xyz[:10])
    np.testing.assert_array_equal(read_points(path)[:, :3], xyz[:10])


# --- corrupt files -------------------------------------------------------------------------------
def _raises_naming(path, fn, *words):
    with pytest.raises(DataError) as exc:
        fn(path)
    msg = str(exc.value)
    assert path.name in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_kitti_bin_errors(tmp_path):
    p = tmp_path / "trunc.bin"
    p.write_bytes(np.zeros(10, np.float32).tobytes()[:-2])
    _raises_naming(p, read_kitti_bin, "multiple of 16")
    p = tmp_path / "nan.bin"
    a = np.zeros((5, 4), np.float32)
    a[3, 1] = np.nan
    a.tofile(p)
    _raises_naming(p, read_kitti_bin, "NaN", "point 3")
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    _raises_naming(p, read_kitti_bin, "empty")
    _raises_naming(tmp_path / "missing.bin", read_kitti_bin, "not found")


def test_pcd_errors(tmp_path):
    xyz, _ = _cloud(n=20)
    good = tmp_path / "good.pcd"
    write_pcd(good, xyz, data="binary", names=["x", "y", "z"])
    raw = good.read_bytes()
    p = tmp_path / "trunc.pcd"
    p.write_bytes(raw[:-7])
    _raises_naming(p, read_pcd, "truncated")
    p = tmp_path / "badtype.pcd"
    p.write_bytes(raw.replace(b"TYPE F F F", b"TYPE F Q F"))
    _raises_naming(p, read_pcd, "TYPE 'Q'", "'y'")
    p = tmp_path / "badheader.pcd"
    p.write_bytes(raw.replace(b"SIZE 4 4 4", b"SIZE 4 4"))
    _raises_naming(p, read_pcd, "SIZE")
    p = tmp_path / "nodata.pcd"
    p.write_bytes(b"VERSION 0.7\nFIELDS x y z\n")
    _raises_naming(p, read_pcd, "DATA")
    p = tmp_path / "nan.pcd"
    bad = xyz.copy()
    bad[4, 2] = np.nan
    write_pcd(p, bad, data="binary_compressed", names=["x", "y", "z"])
    _raises_naming(p, read_pcd, "'z'", "NaN")
    p = tmp_path / "corrupt_lzf.pcd"
    write_pcd(p, xyz, data="binary_compressed", names=["x", "y", "z"])
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    _raises_naming(p, read_pcd, "truncated")


def test_ply_errors(tmp_path):
    xyz, _ = _cloud(n=20)
    good = tmp_path / "good.ply"
    write_ply(good, xyz, names=["x", "y", "z"])
    raw = good.read_bytes()
    p = tmp_path / "trunc.ply"
    p.write_bytes(raw[:-5])
    _raises_naming(p, read_ply, "truncated")
    p = tmp_path / "badtype.ply"
    p.write_bytes(raw.replace(b"property float y", b"property quad y"))
    _raises_naming(p, read_ply, "'quad'")
    p = tmp_path / "notply.ply"
    p.write_bytes(b"hello\n")
    _raises_naming(p, read_ply, "not a PLY")
    p = tmp_path / "nan.ply"
    bad = xyz.copy()
    bad[0, 0] = np.inf
    write_ply(p, bad, binary=False, names=["x", "y", "z"])
    _raises_naming(p, read_ply, "'x'")
    _raises_naming(tmp_path / "x.xyz", read_points, "extension")


def test_headers_that_would_drop_or_invent_points(tmp_path):
    """Header values that used to read silently wrong: every point of the file, or an error."""
    xyz, _ = _cloud(n=4)
    good = tmp_path / "good.pcd"
    write_pcd(good, xyz, data="binary", names=["x", "y", "z"])
    raw = good.read_bytes()
    p = tmp_path / "longer.pcd"
    p.write_bytes(raw.replace(b"POINTS 4", b"POINTS 3").replace(b"WIDTH 4", b"WIDTH 3"))
    _raises_naming(p, read_pcd, "longer than its header says", "POINTS 3")
    p.write_bytes(raw.replace(b"POINTS 4", b"POINTS 3"))
    _raises_naming(p, read_pcd, "POINTS 3 differs from WIDTH x HEIGHT = 4")
    p.write_bytes(raw.replace(b"COUNT 1 1 1", b"COUNT 1 1 0"))
    _raises_naming(p, read_pcd, "COUNT must be >= 1")
    p = tmp_path / "dup.pcd"
    p.write_bytes(b"VERSION 0.7\nFIELDS x x z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\nPOINTS 1\n"
                  b"DATA ascii\n1 2 3\n")
    _raises_naming(p, read_pcd, "['x'] more than once")
    p.write_bytes(b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\nPOINTS 1\n"
                  b"DATA ascii\n1 2 3\n4 5 6\n")
    _raises_naming(p, read_pcd, "6 values, expected POINTS 1 x 3 = 3")
    p = tmp_path / "neg.ply"
    p.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex -5\nproperty float x\nproperty float y\n"
                  b"property float z\nend_header\n" + np.zeros(30, np.float32).tobytes())
    _raises_naming(p, read_ply, "neg.ply:3", "COUNT -5")
