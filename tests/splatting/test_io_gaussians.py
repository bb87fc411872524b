"""3DGS `.ply` and antimatter15 `.splat` readers/writers.

The `.ply` writer is checked against Open3D (whose tensor PLY reader knows the 3DGS layout, including
the channel-major `f_rest_*` order) and against a header parsed by hand; the `.splat` writer
against bytes decoded here with `struct`.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from perception3d.io.pointcloud import write_ply
from splatting.io import (
    gaussian_ply_property_names,
    load_gaussian_ply,
    load_splat,
    save_gaussian_ply,
    save_splat,
    splat_importance,
)

C0 = 0.28209479177387814
KEYS = ("means", "quats", "scales_log", "opacities_logit", "sh0", "shN")


def _gaussians(n=200, degree=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g) * 5,
        "quats": torch.randn(n, 4, generator=g),  # deliberately not normalised
        "scales_log": torch.randn(n, 3, generator=g) - 3,
        "opacities_logit": torch.randn(n, generator=g) * 3,
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, k - 1, 3, generator=g) * 0.3,
    }


def _parse_header(raw: bytes):
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    props = [ln.split() for ln in lines if ln.startswith("property")]
    count = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[2])
    return lines, props, count, end


# ------------------------------------------------------------------------------------------------
# .ply
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_round_trip_is_bit_exact(tmp_path, degree):
    g = _gaussians(n=123, degree=degree, seed=degree)
    path = tmp_path / "scene" / "point_cloud.ply"  # parent folder is created
    save_gaussian_ply(path, **g)
    out = load_gaussian_ply(path)
    assert set(out) == set(KEYS)
    for k in KEYS:
        assert out[k].dtype == torch.float32
        assert out[k].shape == g[k].shape, k
        assert torch.equal(out[k], g[k]), k
    n_props = 3 + 3 + 3 + 3 * ((degree + 1) ** 2 - 1) + 1 + 3 + 4
    _, _, _, body = _parse_header(path.read_bytes())
    assert path.stat().st_size == body + 123 * n_props * 4
    assert [p.name for p in tmp_path.joinpath("scene").iterdir()] == ["point_cloud.ply"]  # no temp files left


def test_ply_header_and_channel_major_rest_parsed_by_hand(tmp_path):
    g = _gaussians(n=50, degree=3, seed=7)
    path = tmp_path / "g.ply"
    save_gaussian_ply(path, **g)
    raw = path.read_bytes()
    lines, props, count, body = _parse_header(raw)
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 50"]
    names = [p[2] for p in props]
    assert all(p[1] == "float" for p in props)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert names[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == gaussian_ply_property_names(3)
    table = np.frombuffer(raw, dtype="<f4", offset=body).reshape(count, len(names))
    col = {nm: table[:, i] for i, nm in enumerate(names)}
    np.testing.assert_array_equal(col["nx"], 0.0)
    shN = g["shN"].numpy()
    # channel-major: f_rest_0..14 are R's 15 coefficients, f_rest_15..29 G's, f_rest_30..44 B's
    np.testing.assert_array_equal(col["f_rest_0"], shN[:, 0, 0])
    np.testing.assert_array_equal(col["f_rest_1"], shN[:, 1, 0])
    np.testing.assert_array_equal(col["f_rest_15"], shN[:, 0, 1])
    np.testing.assert_array_equal(col["f_rest_44"], shN[:, 14, 2])
    np.testing.assert_array_equal(col["f_dc_2"], g["sh0"][:, 0, 2].numpy())
    np.testing.assert_array_equal(col["opacity"], g["opacities_logit"].numpy())
    np.testing.assert_array_equal(col["rot_0"], g["quats"][:, 0].numpy())  # w first
    np.testing.assert_array_equal(col["scale_1"], g["scales_log"][:, 1].numpy())


def test_ply_read_by_open3d(tmp_path):
    o3d = pytest.importorskip("open3d")
    g = _gaussians(n=80, degree=2, seed=3)
    path = tmp_path / "g.ply"
    save_gaussian_ply(path, **g)
    pc = o3d.t.io.read_point_cloud(str(path))
    np.testing.assert_array_equal(pc.point.positions.numpy(), g["means"].numpy())
    # Open3D recognises the 3DGS layout and de-interleaves f_rest into [N, K-1, 3]
    np.testing.assert_array_equal(pc.point["f_rest"].numpy(), g["shN"].numpy())
    np.testing.assert_array_equal(pc.point["f_dc"].numpy(), g["sh0"][:, 0].numpy())
    np.testing.assert_array_equal(pc.point["opacity"].numpy()[:, 0], g["opacities_logit"].numpy())
    # Open3D converts the log scales to linear scales on reading
    np.testing.assert_allclose(pc.point["scale"].numpy(), np.exp(g["scales_log"].numpy()), rtol=1e-6)
    np.testing.assert_array_equal(pc.point["rot"].numpy(), g["quats"].numpy())


@pytest.mark.parametrize("binary", [True, False])
def test_ply_reader_accepts_other_order_extra_props_no_normals(tmp_path, binary):
    g = _gaussians(n=30, degree=1, seed=4)
    n = 30
    cols = {
        "rot_3": g["quats"][:, 3], "opacity": g["opacities_logit"],
        "red": np.arange(n, dtype=np.uint8),  # extra property, ignored
        "z": g["means"][:, 2], "y": g["means"][:, 1], "x": g["means"][:, 0],
    }
    rest = g["shN"].transpose(1, 2).reshape(n, 9)
    for i in reversed(range(9)):  # f_rest in reverse order: found by name
        cols[f"f_rest_{i}"] = rest[:, i]
    for i in range(3):
        cols[f"f_dc_{i}"] = g["sh0"][:, 0, i]
        cols[f"scale_{i}"] = g["scales_log"][:, i].double()  # double properties accepted
    for i in range(3):
        cols[f"rot_{i}"] = g["quats"][:, i]
    path = tmp_path / "other.ply"
    write_ply(path, {k: np.asarray(v) for k, v in cols.items()}, binary=binary)
    out = load_gaussian_ply(path)
    for k in KEYS:
        assert torch.equal(out[k], g[k]), k


def _write_header_ply(path, names, n, body_bytes=None):
    hdr = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
                    + [f"property float {nm}" for nm in names] + ["end_header"]) + "\n"
    body = np.arange(n * len(names), dtype="<f4").tobytes() if body_bytes is None else body_bytes
    path.write_bytes(hdr.encode() + body)
    return path


def test_ply_missing_properties_named(tmp_path):
    names = [nm for nm in gaussian_ply_property_names(0) if nm not in ("opacity", "rot_2")]
    path = _write_header_ply(tmp_path / "missing.ply", names, 4)
    with pytest.raises(DataError, match=r"missing\.ply.*opacity, rot_2 missing"):
        load_gaussian_ply(path)


def test_ply_wrong_rest_count_and_gap(tmp_path):
    names = gaussian_ply_property_names(0) + [f"f_rest_{i}" for i in range(10)]
    path = _write_header_ply(tmp_path / "rest10.ply", names, 4)
    with pytest.raises(DataError, match=r"rest10\.ply: 10 f_rest_\* properties; expected .*0, 9, 24 or 45"):
        load_gaussian_ply(path)
    names = gaussian_ply_property_names(0) + [f"f_rest_{i}" for i in range(10) if i != 4]
    path = _write_header_ply(tmp_path / "gap.ply", names, 4)
    with pytest.raises(DataError, match=r"gap\.ply: f_rest_\* properties must be numbered 0\.\.8; missing f_rest_4"):
        load_gaussian_ply(path)


def test_ply_truncated_body(tmp_path):
    g = _gaussians(n=10, degree=1)
    path = tmp_path / "t.ply"
    save_gaussian_ply(path, **g)
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    # 10 vertices x (17 + 9) floats x 4 bytes = 1040 expected, 1035 present
    with pytest.raises(DataError, match=r"t\.ply.*truncated: 1035 bytes, expected 10 vertices x 104 = 1040"):
        load_gaussian_ply(path)


def test_ply_nan_in_file_and_empty(tmp_path):
    names = gaussian_ply_property_names(0)
    body = np.zeros((3, len(names)), "<f4")
    body[2, names.index("scale_1")] = np.inf
    path = _write_header_ply(tmp_path / "nan.ply", names, 3, body.tobytes())
    with pytest.raises(DataError, match=r"nan\.ply: property 'scale_1' has 1 NaN/inf .*first at vertex 2"):
        load_gaussian_ply(path)
    path = _write_header_ply(tmp_path / "empty.ply", names, 0)
    with pytest.raises(DataError, match="0 Gaussians"):
        load_gaussian_ply(path)
    with pytest.raises(DataError, match="not found"):
        load_gaussian_ply(tmp_path / "nope.ply")


def test_ply_save_rejects_bad_input_and_keeps_old_file(tmp_path):
    g = _gaussians(n=20, degree=1)
    path = tmp_path / "keep.ply"
    save_gaussian_ply(path, **g)
    before = path.read_bytes()
    bad = dict(g, scales_log=g["scales_log"].clone())
    bad["scales_log"][7, 2] = float("nan")
    with pytest.raises(DataError, match=r"scales_log: 1 Gaussians have NaN or inf values \(first at row 7\)"):
        save_gaussian_ply(path, **bad)
    assert path.read_bytes() == before
    with pytest.raises(DataError, match=r"quats: expected shape \[N, 4\], got \[20, 3\]"):
        save_gaussian_ply(path, **dict(g, quats=g["quats"][:, :3]))
    with pytest.raises(DataError, match=r"sh0: has 19 rows, expected N = 20"):
        save_gaussian_ply(path, **dict(g, sh0=g["sh0"][:19]))
    with pytest.raises(DataError, match=r"shN: .*K-1 in \(0, 3, 8, 15\)"):
        save_gaussian_ply(path, **dict(g, shN=torch.zeros(20, 5, 3)))
    with pytest.raises(DataError, match="N = 0"):
        save_gaussian_ply(path, **{k: v[:0] for k, v in g.items()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.ply"]


def test_ply_accepts_alternative_shapes_and_grad_tensors(tmp_path):
    g = _gaussians(n=6, degree=0)
    path = tmp_path / "alt.ply"
    means = g["means"].clone().requires_grad_(True)
    save_gaussian_ply(path, means, g["quats"], g["scales_log"], g["opacities_logit"][:, None],
                      g["sh0"][:, 0], None)
    out = load_gaussian_ply(path)
    assert torch.equal(out["means"], g["means"]) and torch.equal(out["sh0"], g["sh0"])
    assert out["shN"].shape == (6, 0, 3)


# ------------------------------------------------------------------------------------------------
# .splat
# ------------------------------------------------------------------------------------------------
def test_splat_round_trip_within_quantisation(tmp_path):
    n = 500
    g = _gaussians(n=n, degree=0, seed=11)
    path = tmp_path / "scene.splat"
    order = save_splat(path, g["means"], g["quats"], g["scales_log"], g["opacities_logit"], g["sh0"])
    assert path.stat().st_size == 32 * n
    assert sorted(order.tolist()) == list(range(n))
    out = load_splat(path)
    assert set(out) == {"means", "quats", "scales_log", "opacities_logit", "sh0"}
    ref = {k: v[order] for k, v in g.items()}
    assert torch.equal(out["means"], ref["means"])  # float32 positions: exact
    raw = np.frombuffer(path.read_bytes(), dtype="<f4").reshape(n, 8)
    np.testing.assert_array_equal(raw[:, 3:6], np.exp(ref["scales_log"].numpy()))  # exp(log scale), float32
    torch.testing.assert_close(out["scales_log"], ref["scales_log"], rtol=0, atol=2e-6)
    # colour: RGB after the SH0 mapping within half a level (rounding)
    rgb_ref = (0.5 + C0 * ref["sh0"]).clamp(0, 1)
    rgb_out = 0.5 + C0 * out["sh0"]
    assert (rgb_out - rgb_ref).abs().max() <= 0.5 / 255 + 1e-6
    a_ref = torch.sigmoid(ref["opacities_logit"]).clamp(0.5 / 255, 254.5 / 255)
    assert (torch.sigmoid(out["opacities_logit"]) - a_ref).abs().max() <= 0.5 / 255 + 1e-6
    # quaternions: unit norm, within 1/128 per component up to sign
    qn = ref["quats"] / ref["quats"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(out["quats"].norm(dim=1), torch.ones(n), rtol=0, atol=1e-6)
    err = torch.minimum((out["quats"] - qn).abs().amax(1), (out["quats"] + qn).abs().amax(1))
    assert err.max() <= 1 / 128


def test_splat_bytes_decoded_by_hand(tmp_path):
    path = tmp_path / "one.splat"
    sh0 = torch.tensor([[[(0.2 - 0.5) / C0, 0.0, 10.0]]])  # R = 0.2, G = 0.5, B clipped to 1
    save_splat(path, torch.tensor([[1.0, -2.0, 3.5]]), torch.tensor([[0.0, 0.0, 2.0, 0.0]]),
               torch.log(torch.tensor([[0.5, 1.0, 2.0]])), torch.tensor([0.0]), sh0)
    rec = struct.unpack("<3f3f4B4B", path.read_bytes())
    assert rec[:3] == (1.0, -2.0, 3.5)
    np.testing.assert_allclose(rec[3:6], (0.5, 1.0, 2.0), rtol=1e-6)
    assert rec[6:10] == (51, 128, 255, 128)  # 0.2*255 = 51, 0.5*255 = 127.5 -> 128, 1 -> 255, sigmoid(0) -> 128
    assert rec[10:14] == (128, 128, 255, 128)  # unit (0, 0, 1, 0): 1*128+128 = 256 clipped to 255


def test_splat_sorted_by_size_times_opacity(tmp_path):
    # importance exp(sum log s) * sigmoid(o): a = 1 * 0.5, b = e^3 * 0.119, c = e^-3 * 0.999, d = 1 * 0.5 (tie with a)
    scales_log = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    opac = torch.tensor([0.0, -2.0, 7.0, 0.0])
    means = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    path = tmp_path / "s.splat"
    order = save_splat(path, means, torch.tensor([[1.0, 0, 0, 0]] * 4), scales_log, opac, torch.zeros(4, 1, 3))
    assert order.tolist() == [1, 0, 3, 2]  # b (2.39), a (0.5), d (0.5, stable), c (0.0497)
    assert torch.equal(load_splat(path)["means"], means[[1, 0, 3, 2]])
    imp = splat_importance(scales_log, opac)
    assert math.isclose(float(imp[1]), 3.0 + math.log(1 / (1 + math.exp(2.0))), rel_tol=1e-12)
    # random scene: file order has non-increasing importance
    g = _gaussians(n=300, degree=0, seed=5)
    order = save_splat(path, g["means"], g["quats"], g["scales_log"], g["opacities_logit"], g["sh0"])
    imp = splat_importance(g["scales_log"], g["opacities_logit"])[order]
    assert (imp[1:] <= imp[:-1]).all()
    assert imp[0] > imp[-1] + 1.0


def test_splat_extreme_alpha_stays_finite(tmp_path):
    path = tmp_path / "a.splat"
    save_splat(path, torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.zeros(2, 3),
               torch.tensor([40.0, -40.0]), torch.zeros(2, 1, 3))
    logit = load_splat(path)["opacities_logit"]
    assert torch.isfinite(logit).all()
    lim = math.log(254.5 / 0.5)
    torch.testing.assert_close(logit, torch.tensor([lim, -lim]), rtol=0, atol=1e-5)


def test_splat_errors(tmp_path):
    path = tmp_path / "bad.splat"
    path.write_bytes(b"\0" * 33)
    with pytest.raises(DataError, match=r"bad\.splat: size 33 bytes is not a multiple of 32"):
        load_splat(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_splat(path)
    with pytest.raises(DataError, match="not found"):
        load_splat(tmp_path / "none.splat")
    rec = struct.pack("<3f3f4B4B", 0, 0, 0, 1, 1, 1, 0, 0, 0, 255, 128, 128, 128, 128)
    path.write_bytes(rec * 2)
    with pytest.raises(DataError, match=r"zero quaternion .*first at record 0"):
        load_splat(path)
    rec_neg = struct.pack("<3f3f4B4B", 0, 0, 0, 1, -1, 1, 0, 0, 0, 255, 255, 128, 128, 128)
    path.write_bytes(rec_neg)
    with pytest.raises(DataError, match=r"scale of 1 of 1 records is <= 0"):
        load_splat(path)
    ok = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    with pytest.raises(DataError, match=r"quats: 1 quaternions are zero .*row 1"):
        save_splat(path, torch.zeros(2, 3), ok, torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 1, 3))
    with pytest.raises(DataError, match=r"scales_log: .*beyond float32 \(first at row 0"):
        save_splat(path, torch.zeros(1, 3), ok[:1], torch.tensor([[100.0, 0, 0]]), torch.zeros(1),
                   torch.zeros(1, 1, 3))
    with pytest.raises(DataError, match=r"opacities_logit: 1 Gaussians have NaN"):
        save_splat(path, torch.zeros(1, 3), ok[:1], torch.zeros(1, 3), torch.tensor([float("nan")]),
                   torch.zeros(1, 1, 3))
