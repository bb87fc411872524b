"""Bad input on the splatting side: one clear error before any work, nothing lost.

Each row of `CASES` writes one bad input (a transforms.json, a COLMAP text or binary model, an
LLFF `poses_bounds.npy`, an image, a Gaussian .ply / .splat / Compact 3DGS .cgs file, a splatting
config field, a `data.root`, a checkpoint to resume) under the test's temporary folder and meets it
through the library or through `tools/train.py` / `tools/eval.py` (see `tests/bad_inputs.py` for
what every row asserts). The tool rows fail before any training step. Scenes are copies of one
tiny synthetic scene (6 views of 16x12 pixels) generated once for the module.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perception3d.io.pointcloud import write_ply
from splatting.compact.codec import read_container, write_container
from splatting.data import load_colmap, load_scene, write_colmap_binary
from splatting.data import synthetic
from splatting.data.synthetic import write_synthetic_scene
from splatting.io import load_gaussian_ply, load_splat, save_gaussian_ply, save_splat
from tests.bad_inputs import BadInput, Tool, check_bad_input

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "splatting" / "3dgs_quickstart.yaml"
SCENE = dict(seed=0, num_views=6, width=16, height=12, num_points=200, samples_per_side=1)
_SOURCE: list[Path] = []  # the module's synthetic scene


@pytest.fixture(scope="module", autouse=True)
def source(tmp_path_factory):
    root = write_synthetic_scene(tmp_path_factory.mktemp("source") / "scene", **SCENE)
    _SOURCE[:] = [root]
    yield root
    _SOURCE.clear()


# --- builders ---------------------------------------------------------------------------------------
def scene(tmp: Path, fmt: str = "transforms") -> Path:
    """A copy of the module's scene at `tmp/scene`, as one format: "transforms", "colmap" (text),
    "colmap_bin" or "llff" (the others' files removed, so the loader reads that one)."""
    root = tmp / "scene"
    shutil.copytree(_SOURCE[0], root)
    if fmt == "transforms":
        shutil.rmtree(root / "sparse")
    elif fmt in ("colmap", "colmap_bin"):
        (root / "transforms.json").unlink()
        if fmt == "colmap_bin":
            s = load_colmap(root)
            shutil.rmtree(root / "sparse" / "0")
            write_colmap_binary(root / "sparse" / "0", s.frames, s.points, s.points_rgb)
    elif fmt == "llff":
        frames = sorted(load_colmap(root).frames, key=lambda f: f.name)
        shutil.rmtree(root / "sparse")
        (root / "transforms.json").unlink()
        rows = []
        for f in frames:  # OpenCV (right, down, forward) -> LLFF (down, right, backward) columns
            c = f.camtoworld
            pose = np.stack([c[:3, 1], c[:3, 0], -c[:3, 2], c[:3, 3], [f.height, f.width, f.K[0, 0]]], 1)
            rows.append(np.concatenate([pose.ravel(), [0.5, 10.0]]))
        np.save(root / "poses_bounds.npy", np.asarray(rows))
    return root


def edit_json(root: Path, fn) -> Path:
    path = root / "transforms.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))
    return path


def edit_text(path: Path, fn) -> Path:
    path.write_text(fn(path.read_text()))
    return path


def edit_bytes(path: Path, fn) -> Path:
    path.write_bytes(fn(path.read_bytes()))
    return path


def resize(path: Path, size=(32, 24)) -> Path:
    with Image.open(path) as im:
        im.resize(size).save(path)
    return path


def set_matrix(meta: dict, i: int, fn) -> None:
    meta["frames"][i]["transform_matrix"] = fn(np.asarray(meta["frames"][i]["transform_matrix"])).tolist()


def loads(root: Path):
    return lambda: load_scene(root)


def reads(reader, path: Path):
    """The call that meets the bad file (written by the time this is built)."""
    return lambda: reader(path)


def colmap(tmp: Path, name: str, fn):
    """The COLMAP copy of the scene (text, or binary for a `.bin` name), `sparse/0/<name>` edited by `fn`."""
    root = scene(tmp, "colmap_bin" if name.endswith(".bin") else "colmap")
    (edit_bytes if name.endswith(".bin") else edit_text)(root / "sparse" / "0" / name, fn)
    return loads(root)


def llff_edit(tmp: Path, fn):
    """The LLFF copy of the scene, its `poses_bounds.npy` array edited by `fn` (in place, or returning another)."""
    root = scene(tmp, "llff")
    a = np.load(root / "poses_bounds.npy")
    out = fn(a)
    np.save(root / "poses_bounds.npy", a if out is None else out)
    return loads(root)


def llff_published(tmp: Path) -> Path:
    """The LLFF copy of the scene laid out as LLFF scenes are published, without `images/`:
    `images_4/` and `images_8/` (here copies at 1/2 and 1/4 size) beside `poses_bounds.npy`."""
    root = scene(tmp, "llff")
    for name, f in (("images_4", 2), ("images_8", 4)):
        (root / name).mkdir()
        for p in sorted((root / "images").iterdir()):
            with Image.open(p) as im:
                im.resize((im.width // f, im.height // f)).save(root / name / p.name)
    shutil.rmtree(root / "images")
    return root


def zero_rotation(a: np.ndarray) -> None:
    a[2, [0, 1, 2, 5, 6, 7, 10, 11, 12]] = 0.0  # row 2's 3x3 rotation (columns 0-2 of its 3x5 pose)


def yaml_config(tmp: Path, root: Path | None = None, text: str = "", synthetic_null: bool = True) -> Path:
    """A small splatting config (based on the README quickstart, 3 steps) reading `root`."""
    root = root or tmp / "scene"
    path = tmp / "c.yaml"
    path.write_text(f"_base_: {QUICKSTART}\ndata:\n  root: {root}\n" + ("  synthetic: null\n" if synthetic_null else "")
                    + "model: {init_num_points: 200}\ntrain: {max_steps: 3, progress: false, device: cpu}\n"
                    + "eval: {num_renders: 1}\n" + text)
    return path


def train(tmp: Path, *sets: str, root: Path | None = None, synthetic_null: bool = True, text: str = "",
          resume: bool = False) -> Tool:
    argv = ["--config", str(yaml_config(tmp, root, text, synthetic_null)), "--out", str(tmp / "run")]
    argv += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
    return Tool("train", tuple(argv))


def evaluate(tmp: Path, ckpt: Path, *sets: str) -> Tool:
    return Tool("eval", ("--config", str(yaml_config(tmp)), "--ckpt", str(ckpt), "--out", str(tmp / "ev"),
                         *[a for s in sets for a in ("--set", s)]))


def trained(tmp: Path, *sets: str) -> Path:
    """A finished 3-step run on the scene in tmp/run (trained in-process through tools/train.py)."""
    from p3d import train as train_tool

    scene(tmp)
    argv = ["--config", str(yaml_config(tmp)), "--out", str(tmp / "run"), *[a for s in sets for a in ("--set", s)]]
    assert train_tool.main(argv) == 0
    return tmp / "run"


TINY_COMPACT = ("compact={hash_levels: 2, hash_log2_size: 8, mlp_hidden: 8, vq_stages: 2, vq_codebook_size: 8, "
                "vq_start_fraction: 0.5}")

N = 8


def gaussians(n: int = N) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(means=torch.randn(n, 3, generator=g), quats=torch.randn(n, 4, generator=g),
                scales_log=torch.randn(n, 3, generator=g) - 3, opacities_logit=torch.randn(n, generator=g),
                sh0=torch.randn(n, 1, 3, generator=g))


def ply(tmp: Path, fn=None, name: str = "g.ply") -> Path:
    """A degree-1 3DGS .ply of N Gaussians, its bytes passed through `fn`."""
    path = tmp / name
    save_gaussian_ply(path, **gaussians(), shN=0.1 * torch.ones(N, 3, 3))
    return edit_bytes(path, fn) if fn else path


def ply_body(raw: bytes) -> tuple[bytes, np.ndarray]:
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    return raw[:end], np.frombuffer(raw[end:], "<f4").copy().reshape(N, -1)


def ply_nan(raw: bytes) -> bytes:
    header, table = ply_body(raw)
    table[3, -5] = np.nan  # Gaussian 3's scale_2
    return header + table.tobytes()


def ply_without(tmp: Path, prop: str) -> Path:
    from perception3d.io.pointcloud import read_ply

    fields = read_ply(ply(tmp))
    del fields[prop]
    write_ply(tmp / "g.ply", fields)
    return tmp / "g.ply"


def splat(tmp: Path, fn=None) -> Path:
    path = tmp / "g.splat"
    save_splat(path, **gaussians())
    return edit_bytes(path, fn) if fn else path


def splat_nan(raw: bytes) -> bytes:
    rec = bytearray(raw)
    rec[32 * 5:32 * 5 + 4] = struct.pack("<f", float("nan"))  # record 5's x
    return bytes(rec)


@functools.lru_cache(maxsize=None)
def _cgs_bytes(post: bool) -> bytes:
    """A Compact 3DGS file of 200 Gaussians (small hash grid and codebooks)."""
    import tempfile

    from splatting.compact.model import CompactGaussians, CompactModel, CompactOptions

    g = torch.Generator().manual_seed(0)
    opts = CompactOptions(hash_levels=2, hash_log2_size=8, mlp_hidden=8, vq_stages=2, vq_codebook_size=8)
    model = CompactModel(opts, torch.zeros(3), 1.5)
    n = 200
    params = {"means": torch.rand(n, 3, generator=g) * 2 - 1,
              "scales": torch.log(0.02 + 0.03 * torch.rand(n, 3, generator=g)),
              "quats": torch.randn(n, 4, generator=g), "opacities": torch.randn(n, generator=g),
              "mask": torch.full((n,), 2.0)}
    model.start_vq(params)
    with tempfile.TemporaryDirectory() as d:
        CompactGaussians.from_training(params, model).save(Path(d) / "g.cgs", post=post)
        return (Path(d) / "g.cgs").read_bytes()


def cgs(tmp: Path, post: bool = True, raw=None, meta=None, blobs=None) -> Path:
    """The module's .cgs file at tmp/g.cgs: its bytes through `raw`, or its header / blobs edited."""
    path = tmp / "g.cgs"
    path.write_bytes(_cgs_bytes(post))
    if raw is not None:
        return edit_bytes(path, raw)
    if meta is not None or blobs is not None:
        m, b = read_container(path)
        (meta or (lambda _: None))(m)
        (blobs or (lambda _: None))(b)
        write_container(path, m, b)
    return path


def cgs_load(path: Path):
    from splatting.compact.model import CompactGaussians

    return lambda: CompactGaussians.load(path)


def first_index_out_of_range(b: dict) -> None:
    idx = np.frombuffer(b["scale_idx"], np.uint8).copy()
    idx[7] = 200  # the codebooks have 8 entries
    b["scale_idx"] = idx.tobytes()


# --- the table ----------------------------------------------------------------------------------------
TJ = r"scene/transforms\.json"
CASES = [
    # transforms.json: silent wrong results before
    BadInput("tj-pose-last-row", lambda t: loads(edit_json(scene(t), lambda m: set_matrix(
        m, 2, lambda a: np.concatenate([a[:3], [[0.1, 0.0, 0.0, 1.0]]]))).parent),
             TJ + r": frames\[2\] \('images/0002\.png'\)\.transform_matrix has last row \[0\.1, 0\.0, 0\.0, 1\.0\]; "
                  r"expected \[0, 0, 0, 1\]"),
    BadInput("tj-pose-singular", lambda t: loads(edit_json(scene(t), lambda m: set_matrix(
        m, 2, lambda a: np.concatenate([np.concatenate([np.zeros((3, 3)), a[:3, 3:]], 1), a[3:]]))).parent),
             TJ + r": frames\[2\] .*transform_matrix has a rotation part that is not a rotation: singular"),
    BadInput("tj-pose-scaled", lambda t: loads(edit_json(scene(t), lambda m: set_matrix(
        m, 1, lambda a: a @ np.diag([2.0, 2.0, 2.0, 1.0]))).parent),
             TJ + r": frames\[1\] .*not a rotation: scaled or sheared"),
    BadInput("tj-pose-mirrored", lambda t: loads(edit_json(scene(t), lambda m: set_matrix(
        m, 1, lambda a: a @ np.diag([-1.0, 1.0, 1.0, 1.0]))).parent),
             TJ + r": frames\[1\] .*not a rotation: mirrored"),
    BadInput("tj-pose-nan", lambda t: loads(edit_json(scene(t), lambda m: set_matrix(
        m, 4, lambda a: a * np.nan)).parent), TJ + r": frames\[4\] \('images/0004\.png'\)\.transform_matrix: .*NaN"),
    BadInput("tj-image-size-vs-w-h", lambda t: (resize(scene(t) / "images" / "0001.png"), loads(t / "scene"))[1],
             r"images/0001\.png: image is 32x24 px but .*transforms\.json says w x h = 16x12 \(top level\) for "
             r"frames\[1\]"),
    BadInput("tj-mixed-sizes-no-w-h", lambda t: (resize(scene(t) / "images" / "0003.png"), loads(edit_json(
        t / "scene", lambda m: (m.pop("w"), m.pop("h"))).parent))[1],
             TJ + r": frames\[3\] \('images/0003\.png'\) is 32x24 px but frames\[0\] \('images/0000\.png'\) is "
                  r"16x12 px, and both take the top-level cx, cy, fl_x, fl_y"),
    BadInput("tj-same-image-twice", lambda t: loads(edit_json(scene(t), lambda m: m["frames"].append(
        dict(m["frames"][0]))).parent),
             TJ + r": frames\[6\] \('images/0000\.png'\) names the same image as frames\[0\]"),
    BadInput("tj-zero-field-of-view", lambda t: loads(edit_json(scene(t), lambda m: (
        m.pop("fl_x"), m.pop("fl_y"), m.update(camera_angle_x=0.0))).parent),
             TJ + r": camera_angle_x: a field of view of 0\.0 rad; expected radians in \(0, pi\)"),
    BadInput("tj-distortion-too-large", lambda t: (edit_json(scene(t), lambda m: m.update(
        k1=-50.0, camera_model="OPENCV")), train(t))[1],
             r"frame 'images/000\d\.png' \(.*images/000\d\.png\), distortion \(-50\.0, 0\.0, 0\.0, 0\.0\): "
             r"undistortion maps no output pixel inside the input image"),
    BadInput("tj-not-json", lambda t: loads(edit_text(scene(t) / "transforms.json", lambda s: s[:-20]).parent),
             TJ + r":\d+: not valid JSON"),
    # images: a traceback in the middle of training before
    BadInput("image-truncated-png", lambda t: (edit_bytes(scene(t) / "images" / "0002.png", lambda b: b[:len(b) // 2]),
                                               train(t))[1], r"images/0002\.png: not a readable image \(OSError"),
    BadInput("image-not-an-image", lambda t: (edit_bytes(scene(t) / "images" / "0002.png", lambda b: b"GIF89a..."),
                                              train(t))[1], r"images/0002\.png: not a readable image"),
    # COLMAP text
    BadInput("colmap-txt-unknown-camera",
             lambda t: colmap(t, "images.txt", lambda s: s.replace(" 1 0002.png", " 7 0002.png")),
             r"sparse/0/images\.txt: image '0002\.png' refers to camera 7, which is not in cameras\.txt"),
    BadInput("colmap-txt-truncated", lambda t: colmap(t, "images.txt", lambda s: s[:len(s) * 2 // 3]),
             r"sparse/0/images\.txt:\d+: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME"),
    BadInput("colmap-txt-image-twice",
             lambda t: colmap(t, "images.txt", lambda s: s + "7" + s.splitlines()[4][1:] + "\n\n"),
             r"sparse/0/images\.txt: image '0000\.png' is listed twice"),
    BadInput("colmap-txt-track-unknown-image",
             lambda t: colmap(t, "points3D.txt", lambda s: s.rstrip("\n") + " 99 0\n"),
             r"sparse/0/points3D\.txt: point tracks refer to image id\(s\) \[99\] that are not in images\.txt"),
    BadInput("colmap-txt-camera-size-zero",
             lambda t: colmap(t, "cameras.txt", lambda s: s.replace(" 16 12 ", " 0 12 ")),
             r"sparse/0/cameras\.txt: line \d+ \(camera 1\): image size 0x12"),
    BadInput("colmap-image-size", lambda t: (resize(scene(t, "colmap") / "images" / "0004.png"), loads(t / "scene"))[1],
             r"images/0004\.png: image is 32x24 px but camera 1 of .*cameras\.txt says 16x12"),
    # COLMAP binary
    BadInput("colmap-bin-truncated", lambda t: colmap(t, "images.bin", lambda b: b[:len(b) // 2]),
             r"sparse/0/images\.bin: header says 6 images, which needs at least \d+ bytes"),
    BadInput("colmap-bin-huge-count", lambda t: colmap(t, "points3D.bin", lambda b: struct.pack("<Q", 10**12) + b[8:]),
             r"sparse/0/points3D\.bin: header says 1000000000000 points"),
    BadInput("colmap-bin-unknown-camera",
             lambda t: colmap(t, "images.bin", lambda b: b[:68] + struct.pack("<I", 9) + b[72:]),
             r"sparse/0/images\.bin: image '0000\.png' refers to camera 9, which is not in cameras\.bin"),
    # LLFF
    BadInput("llff-transposed", lambda t: llff_edit(t, lambda a: a.T),
             r"poses_bounds\.npy: expected an \[N, 17\] array .* got shape \(17, 6\)"),
    BadInput("llff-singular-pose", lambda t: llff_edit(t, zero_rotation),
             r"poses_bounds\.npy: row 2 \(image 0002\.png\): .*not a rotation: singular"),
    BadInput("llff-bounds", lambda t: llff_edit(t, lambda a: a.__setitem__((3, slice(15, 17)), [5.0, 1.0])),
             r"poses_bounds\.npy: row 3: depth bounds \(near, far\) = \(5, 1\); expected 0 <= near < far"),
    # Gaussian .ply
    BadInput("ply-count-too-low", lambda t: (scene(t), evaluate(t, ply(t, lambda b: b.replace(
        b"element vertex 8", b"element vertex 2"))))[1],
             r"g\.ply: the PLY header announces 'element vertex 2' \(208 bytes of data\) but the file holds 832 bytes "
             r"\(room for 8 Gaussians\); the rest would be dropped silently"),
    BadInput("ply-count-too-high", lambda t: reads(load_gaussian_ply, ply(t, lambda b: b.replace(
        b"element vertex 8", b"element vertex 9"))),
             r"g\.ply: binary PLY vertex data is truncated: 832 bytes, expected 9 vertices"),
    BadInput("ply-count-negative", lambda t: reads(load_gaussian_ply, ply(t, lambda b: b.replace(
        b"element vertex 8", b"element vertex -1"))), r"g\.ply: PLY header: element 'vertex' has a negative count"),
    BadInput("ply-truncated", lambda t: reads(load_gaussian_ply, ply(t, lambda b: b[:-7])),
             r"g\.ply: binary PLY vertex data is truncated: 825 bytes"),
    BadInput("ply-integer-property", lambda t: reads(load_gaussian_ply, ply(t, lambda b: b.replace(
        b"property float opacity", b"property int opacity"))),
             r"g\.ply: vertex property\(ies\) opacity \(int32\) are integers"),
    BadInput("ply-missing-property", lambda t: reads(load_gaussian_ply, ply_without(t, "rot_2")),
             r"g\.ply: not a 3D Gaussian splatting PLY: vertex property\(ies\) rot_2 missing"),
    BadInput("ply-nan", lambda t: reads(load_gaussian_ply, ply(t, ply_nan)),
             r"g\.ply: property 'scale_2' has 1 NaN/inf values out of 8 Gaussians \(first at vertex 3\)"),
    # .splat
    BadInput("splat-truncated", lambda t: reads(load_splat, splat(t, lambda b: b[:-5])),
             r"g\.splat: size 251 bytes is not a multiple of 32"),
    BadInput("splat-is-a-ply", lambda t: reads(load_splat, splat(t, lambda _: ply(t).read_bytes()[:320])),
             r"g\.splat: this is a PLY file"),
    BadInput("splat-nan-position", lambda t: reads(load_splat, splat(t, splat_nan)),
             r"g\.splat: position of 1 of 8 records is NaN/inf \(first at record 5\)"),
    BadInput("splat-write-onto-a-folder", lambda t: (lambda: save_splat(t, **gaussians())),
             r"is a folder; expected the path of the \.splat file to write"),
    # Compact 3DGS .cgs
    BadInput("cgs-truncated", lambda t: (scene(t), evaluate(t, cgs(t, raw=lambda b: b[:len(b) // 2])))[1],
             r"g\.cgs: truncated \(blob '\w+' has \d+ of \d+ bytes\)"),
    BadInput("cgs-trailing-bytes", lambda t: cgs_load(cgs(t, raw=lambda b: b + b"\0" * 16)),
             r"g\.cgs: 16 unexpected bytes after the last blob"),
    BadInput("cgs-count-mismatch", lambda t: cgs_load(cgs(t, post=False, meta=lambda m: m.update(n=m["n"] + 1))),
             r"g\.cgs: corrupt Compact 3DGS file: blob 'means' \(float32 positions\) holds 2400 bytes, "
             r"expected 603 x 4"),
    BadInput("cgs-index-beyond-codebook", lambda t: cgs_load(cgs(t, post=False, blobs=first_index_out_of_range)),
             r"g\.cgs: corrupt Compact 3DGS file: 'scale_idx' holds index 200; the codebooks have 8 entries"),
    BadInput("cgs-corrupt-huffman", lambda t: cgs_load(cgs(t, blobs=lambda b: b.update(rot_idx1=b["rot_idx1"][:-3]))),
             r"g\.cgs: corrupt Compact 3DGS file \(ValueError: Huffman table says 200 symbols"),
    BadInput("cgs-not-a-cgs", lambda t: cgs_load(ply(t, name="g.cgs")), r"g\.cgs: not a compact Gaussian file"),
    # config fields: refused when the config loads, before data.root is touched
    BadInput("cfg-test-every-negative", lambda t: train(t, "data.test_every=-1"), r"data\.test_every=-1: expected"),
    BadInput("llff-published-no-images-dir", lambda t: (llff_published(t), train(t))[1],
             r"scene/images: image folder not found; image folders in .*scene: images_4, images_8 "
             r"\(choose one with data\.images, e\.g\. data\.images=images_8\)"),
    BadInput("cfg-images-on-transforms", lambda t: (scene(t), train(t, "data.images=images_8"))[1],
             r"scene: a transforms\.json scene names its own image files; the image folder 'images_8' applies "
             r"to COLMAP and LLFF scenes only"),
    BadInput("cfg-images-absolute", lambda t: train(t, "data.images=/tmp/x"),
             r"data\.images='/tmp/x': expected a folder name under data\.root \(e\.g\. images_8\) or null"),
    BadInput("cfg-downscale-zero", lambda t: train(t, "data.downscale=0"),
             r"data\.downscale=0: expected a whole number >= 1"),
    BadInput("cfg-background", lambda t: train(t, "data.background=[1.0, 2.0, 1.0]"),
             r"data\.background=\(1\.0, 2\.0, 1\.0\): expected 3 numbers \(RGB\) in \[0, 1\]"),
    BadInput("cfg-sh-degree", lambda t: train(t, "model.sh_degree=4"), r"model\.sh_degree=4: expected 0, 1, 2 or 3"),
    BadInput("cfg-init-opacity", lambda t: train(t, "model.init_opacity=1.0"),
             r"model\.init_opacity=1\.0: expected an opacity strictly between 0 and 1"),
    BadInput("cfg-far-before-near", lambda t: train(t, "model.far_plane=0.001"),
             r"model\.far_plane=0\.001: expected a depth >"),
    BadInput("cfg-negative-lr", lambda t: train(t, "optim.scales_lr=-0.1"),
             r"optim\.scales_lr=-0\.1: expected a finite number >= 0"),
    BadInput("cfg-ssim-lambda", lambda t: train(t, "optim.ssim_lambda=1.5"),
             r"optim\.ssim_lambda=1\.5: expected a weight in \[0, 1\]"),
    BadInput("cfg-refine-every-zero", lambda t: train(t, "strategy.refine_every=0"),
             r"strategy\.refine_every=0: expected"),
    BadInput("cfg-log-every-zero", lambda t: train(t, "train.log_every=0"),
             r"train\.log_every=0: expected a whole number >= 1"),
    BadInput("cfg-lpips-weights-missing", lambda t: (scene(t), train(t, f"eval.lpips_weights={t / 'no.pth'}"))[1],
             r"eval\.lpips_weights=.*no\.pth: LPIPS weight file not found"),
    BadInput("cfg-compact-codebook", lambda t: train(t, "compact={vq_codebook_size: 0}"),
             r"compact\.vq_codebook_size=0: expected a whole number in \[1, 65536\]"),
    BadInput("cfg-compact-no-vq-phase", lambda t: train(t, "compact={vq_start_fraction: 1.0}"),
             r"compact\.vq_start_fraction=1\.0: expected a fraction of the steps in \[0, 1\)"),
    BadInput("cfg-synthetic-no-views", lambda t: train(t, "data.synthetic.num_views=0", synthetic_null=False),
             r"data\.synthetic\.num_views=0: expected a whole number >= 1"),
    BadInput("cfg-synthetic-zero-width", lambda t: train(t, "data.synthetic.width=0", synthetic_null=False),
             r"data\.synthetic\.width=0: expected a whole number >= 1"),
    BadInput("cfg-synthetic-all-held-out", lambda t: train(t, "data.synthetic.num_views=1", synthetic_null=False),
             r"data\.synthetic\.num_views=1: expected more than 1 views: with data\.test_every=8"),
    # data.root and the synthetic scene
    BadInput("root-below-a-file", lambda t: ((t / "f.txt").write_text("x"),
                                             train(t, root=t / "f.txt" / "scene", synthetic_null=False))[1],
             r"data\.root=.*f\.txt/scene: cannot generate the synthetic scene there: .*f\.txt is a file, not a folder"),
    BadInput("root-synthetic-of-other-settings", lambda t: (scene(t), train(t, synthetic_null=False))[1],
             r"data\.root=.*scene: holds a synthetic scene generated with other settings than data\.synthetic "
             r"\(data\.synthetic\.num_views = 6 in the scene, 40 configured; data\.synthetic\.width = 16 in the scene"),
    BadInput("root-missing", lambda t: train(t, root=t / "nowhere"), r"data\.root=.*nowhere: not found"),
    BadInput("synthetic-settings", lambda t: lambda: write_synthetic_scene(t / "new", num_views=3, width=0),
             r"synthetic scene: width=0: expected a whole number >= 1"),
    # held-out views
    BadInput("eval-without-held-out-views", lambda t: (scene(t), evaluate(t, ply(t), "data.test_every=0"))[1],
             r"scene: no held-out views \(data\.test_every=0: 0 holds none out\): nothing to evaluate"),
    # resuming from a checkpoint that does not fit the config
    BadInput("resume-other-sh-degree", lambda t: (trained(t), train(t, "model.sh_degree=1", resume=True))[1],
             r"run/ckpt/step_00000003\.pt: cannot resume this run from it: trained with other settings: "
             r"model\.sh_degree: 3 in the checkpoint, 1 in the config"),
    BadInput("resume-plain-as-compact", lambda t: (trained(t), train(t, TINY_COMPACT, resume=True))[1],
             r"step_00000003\.pt: cannot resume this run from it: a plain 3DGS checkpoint \(SH colours\), but the "
             r"config has a compact section"),
    BadInput("resume-compact-as-plain", lambda t: (trained(t, TINY_COMPACT), train(t, resume=True))[1],
             r"step_00000003\.pt: cannot resume this run from it: a Compact 3DGS checkpoint \(colour field and "
             r"codebooks\), but the config has no compact section"),
    BadInput("resume-other-hash-grid", lambda t: (trained(t, TINY_COMPACT),
                                                  train(t, TINY_COMPACT.replace("hash_levels: 2", "hash_levels: 3"),
                                                        resume=True))[1],
             r"step_00000003\.pt: cannot resume .*compact\.hash_levels: 2 in the checkpoint, 3 in the config"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    check_bad_input(case, tmp_path, capsys, monkeypatch)


def test_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 20


# --- not errors: what the fixes must keep working -------------------------------------------------------
def test_no_held_out_views_trains_and_says_so(tmp_path, capsys, monkeypatch):
    """`data.test_every=0`: the run trains, evaluates nothing and says so (a KeyError at the very end before)."""
    from p3d import train as train_tool

    monkeypatch.chdir(tmp_path)
    scene(tmp_path)
    argv = ["--config", str(yaml_config(tmp_path)), "--out", str(tmp_path / "run"), "--set", "data.test_every=0"]
    assert train_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "no held-out views (data.test_every=0: 0 holds none out): nothing evaluated" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["views"] == 0 and "psnr" not in metrics and metrics["num_gaussians"] > 0
    assert metrics["mb_ply"] > 0 and (tmp_path / "run" / "point_cloud.ply").is_file()


def test_synthetic_scene_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Generation goes through a temporary folder of this process (`.scene.<pid>.*.partial`): a failure
    leaves nothing, and a scene another process finished first is kept (exist_ok)."""
    root = tmp_path / "scene"
    calls = []
    real_render = synthetic.render_view

    def failing(*args, **kw):
        partial = [p.name for p in tmp_path.iterdir()]
        calls.append(partial)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real_render(*args, **kw)

    monkeypatch.setattr(synthetic, "render_view", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic_scene(root, **SCENE)
    assert len(calls[0]) == 1 and re.fullmatch(rf"\.scene\.{os.getpid()}\..+\.partial", calls[0][0])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_view", real_render)

    real_rename, raced = os.rename, []

    def racing(src, dst):  # another process renames its finished scene onto root first
        if Path(dst) == root and not raced:
            raced.append(True)
            shutil.copytree(_SOURCE[0], root)
        return real_rename(src, dst)

    import perception3d.io.atomic as atomic

    monkeypatch.setattr(atomic.os, "rename", racing)
    assert write_synthetic_scene(root, exist_ok=True, **SCENE) == root
    assert raced and sorted(p.name for p in tmp_path.iterdir()) == ["scene"]
    assert json.loads((root / "synthetic.json").read_text())["num_views"] == SCENE["num_views"]


def test_fox_capture_still_loads_with_its_warning():
    """The real capture lists 67 frames and holds 50 images: a warning, not an error (image headers and
    poses are all checked on load)."""
    fox = ROOT.parent / "shared" / "data" / "fox"
    if not (fox / "transforms.json").is_file():
        pytest.skip(f"fox sample not found at {fox}")
    from splatting.data import MissingImagesWarning

    with pytest.warns(MissingImagesWarning, match="17 of 67 listed images are missing"):
        s = load_scene(fox)
    assert len(s.frames) == 50 and {(f.width, f.height) for f in s.frames} == {(1080, 1920)}
