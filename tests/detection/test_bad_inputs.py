"""Bad input on the detection / KITTI side: one clear error before any work, nothing lost.

Each row of `CASES` writes one bad input (a KITTI label, calibration, point or image file, an
ImageSets list, synthetic-generation settings, a detection config field, an `eval.baseline`
folder) under the test's temporary folder and meets it through the library or through
`tools/train.py` / `tools/eval.py` (see `tests/bad_inputs.py` for what every row asserts). The
tool rows fail before any training or evaluation: they would take minutes otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from detection.config import DataConfig, SyntheticDataConfig
from detection.data import DetectionDataset
from detection.task import prepare_data
from perception3d.errors import ConfigError
from perception3d.io.kitti import read_calib, read_label
from perception3d.synthetic import dataset as synthetic
from perception3d.synthetic.dataset import dataset_settings, write_kitti_dataset
from tests.bad_inputs import BadInput, Tool, check_bad_input

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "quickstart.yaml"
PC_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
SEED = 5
_SOURCE: list[Path] = []  # the module's 2-frame synthetic dataset (train: 000000, val: 000001)


@pytest.fixture(scope="module", autouse=True)
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source") / "kitti"
    write_kitti_dataset(root, 2, seed=SEED, val_fraction=0.5)
    _SOURCE[:] = [root]
    yield root
    _SOURCE.clear()


# --- builders ---------------------------------------------------------------------------------------
def kitti(tmp: Path) -> Path:
    """A copy of the 2-frame dataset at `tmp/kitti`."""
    root = tmp / "kitti"
    shutil.copytree(_SOURCE[0], root)
    return root


def frame_file(root: Path, kind: str, fid: str = "000000") -> Path:
    ext = {"velodyne": ".bin", "image_2": ".png", "calib": ".txt", "label_2": ".txt"}[kind]
    return root / "training" / kind / f"{fid}{ext}"


def train_set(root: Path, split: str = "train"):
    return lambda: DetectionDataset(root, split, PC_RANGE)


GOOD_LINE = "Car 0.00 0 1.00 100.00 150.00 200.00 250.00 1.50 1.60 3.90 1.00 1.70 10.00 0.30"


def with_label(text: str):
    def make(tmp):
        root = kitti(tmp)
        frame_file(root, "label_2").write_text(text)
        return train_set(root)
    return make


def with_calib_row(key: str, values: str):
    """Frame 000000's calibration with the row `key` replaced (or removed where `values` is None)."""
    def make(tmp):
        root = kitti(tmp)
        path = frame_file(root, "calib")
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(key + ":")]
        if values is not None:
            lines.append(f"{key}: {values}")
        path.write_text("\n".join(lines) + "\n")
        return train_set(root)
    return make


def with_split(text: str):
    def make(tmp):
        root = kitti(tmp)
        (root / "ImageSets" / "train.txt").write_text(text)
        return train_set(root)
    return make


def corrupt_velodyne(how: str):
    def make(tmp):
        root = kitti(tmp)
        path = frame_file(root, "velodyne")
        raw = path.read_bytes()
        if how == "truncated":
            path.write_bytes(raw[:-6])
            return train_set(root)
        if how == "empty":
            path.write_bytes(b"")
            return train_set(root)
        pts = np.frombuffer(raw, "<f4").copy()
        pts[4 * 7 + 1] = np.nan  # y of point 7
        path.write_bytes(pts.tobytes())
        return lambda: DetectionDataset(root, "train", PC_RANGE)[0]
    return make


def remove_files(tmp):
    root = kitti(tmp)
    (root / "ImageSets" / "train.txt").write_text("000000\n000001\n")
    frame_file(root, "velodyne", "000001").unlink()
    frame_file(root, "calib", "000001").unlink()
    frame_file(root, "label_2", "000000").unlink()
    return train_set(root)


def not_a_png(tmp):
    root = kitti(tmp)
    frame_file(root, "image_2").write_bytes(b"this is not a PNG file\n")
    return train_set(root)


def _one_image_missing(tmp):
    root = kitti(tmp)
    (root / "ImageSets" / "train.txt").write_text("000000\n000001\n")
    frame_file(root, "image_2", "000001").unlink()
    return train_set(root)


def config(tmp: Path, data_root: Path | None = None, synthetic: str = "null", extra: str = "") -> Path:
    """A small YAML config over the quickstart preset, reading `data_root` (default `tmp/kitti`)."""
    path = tmp / "bad.yaml"
    path.write_text(f"_base_: {BASE_CONFIG}\n"
                    f"data: {{root: {data_root or tmp / 'kitti'}, synthetic: {synthetic}}}\n"
                    f"eval: {{num_pictures: 1, real_kitti_root: null}}\n{extra}")
    return path


def train_tool(cfg: Path, tmp: Path, *sets: str) -> Tool:
    argv = ["--config", str(cfg), "--out", str(tmp / "run")]
    for s in sets:
        argv += ["--set", s]
    return Tool("train", tuple(argv))


def train_with(*sets: str, dataset: bool = True):
    """`tools/train.py` on the 2-frame dataset (or none), with `--set` overrides."""
    def make(tmp):
        if dataset:
            kitti(tmp)
        return train_tool(config(tmp), tmp, *sets)
    return make


def generate_with(*sets: str):
    """`tools/train.py` asked to generate a synthetic dataset at `tmp/generated` (absent)."""
    def make(tmp):
        cfg = config(tmp, tmp / "generated", synthetic="{frames: 2, seed: 5, val_fraction: 0.5}")
        return train_tool(cfg, tmp, *sets)
    return make


def generated_root_other_settings(tmp):
    kitti(tmp)  # written by write_kitti_dataset: frames 2, seed 5, val_fraction 0.5 recorded
    cfg = config(tmp, synthetic="{frames: 2, seed: 6, val_fraction: 0.5}")
    return train_tool(cfg, tmp)


def foreign_folder_at_root(tmp):
    (tmp / "kitti").mkdir()
    (tmp / "kitti" / "notes.txt").write_text("my files\n")
    cfg = config(tmp, synthetic="{frames: 2, seed: 5, val_fraction: 0.5}")
    return train_tool(cfg, tmp)


def truncated_picture(tmp):
    root = kitti(tmp)
    path = frame_file(root, "image_2", "000001")  # the val frame drawn after evaluation
    path.write_bytes(path.read_bytes()[:4000])
    return train_tool(config(tmp), tmp)


def broken_real_kitti(tmp):
    kitti(tmp)
    real = tmp / "real"
    (real / "training" / "velodyne").mkdir(parents=True)
    np.zeros((10, 4), np.float32).tofile(real / "training" / "velodyne" / "000008.bin")
    return train_tool(config(tmp), tmp, f"eval.real_kitti_root={real}")


def eval_with_baseline(prepare):
    """`tools/eval.py` on the 2-frame dataset with `eval.baseline` = what `prepare(tmp)` returns.
    The checkpoint is never read: the baseline is checked before the model is built."""
    def make(tmp):
        kitti(tmp)
        (tmp / "model.pt").write_bytes(b"not read")
        baseline = prepare(tmp)
        return Tool("eval", ("--config", str(config(tmp)), "--ckpt", str(tmp / "model.pt"), "--out", str(tmp / "ev"),
                             "--set", f"eval.baseline={baseline}"))
    return make


def _run_folder(tmp):
    pred = tmp / "other_run" / "predictions"
    pred.mkdir(parents=True)
    (pred / "000001.txt").write_text(GOOD_LINE + " 0.9\n")
    return tmp / "other_run"


def _labels_not_results(tmp):
    folder = tmp / "labels"
    folder.mkdir()
    (folder / "000001.txt").write_text(GOOD_LINE + "\n")
    return folder


def _lowercase_results(tmp):
    folder = tmp / "pred"
    folder.mkdir()
    (folder / "000001.txt").write_text(GOOD_LINE.replace("Car", "car") + " 0.9\n")
    return folder


def _write_dataset(**kwargs):
    def make(tmp):
        args = dict(root=tmp / "out", num_frames=2, seed=0)
        args.update(kwargs)
        return lambda: write_kitti_dataset(**args)
    return make


def _write_into_foreign_folder(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("not a dataset\n")
    return lambda: write_kitti_dataset(tmp / "out", 2, seed=0)


def _binary_label(tmp):
    root = kitti(tmp)
    frame_file(root, "label_2").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    return train_set(root)


def _singular(name: str) -> str:
    return {"Tr_velo_to_cam": "0 0 0 0 0 0 0 0 0 0 0 0", "R0_rect": "1 0 0 0 1 0 0 0 0"}[name]


KNOWN = "Car, Van, Truck, Pedestrian, Person_sitting, Cyclist, Tram, Misc, DontCare"
LABEL = r"label_2/000000\.txt:1: "
CALIB = r"calib/000000\.txt: "

CASES = [
    # --- KITTI label files
    BadInput("label_lowercase_class", with_label(GOOD_LINE.replace("Car", "car")),
             LABEL + r"unknown object type 'car' \(did you mean 'Car'\?\); expected one of the KITTI classes " + KNOWN),
    BadInput("label_unknown_class", with_label(GOOD_LINE.replace("Car", "Bus")),
             LABEL + r"unknown object type 'Bus'; expected one of the KITTI classes " + KNOWN),
    BadInput("label_misspelt_class", with_label(GOOD_LINE.replace("Car", "Pedestrain")),
             LABEL + r"unknown object type 'Pedestrain' \(did you mean 'Pedestrian'\?\)"),
    BadInput("label_too_few_fields", with_label(GOOD_LINE.rsplit(" ", 2)[0]),
             LABEL + r"expected 15 fields: type truncated occluded .*got 13 fields"),
    BadInput("label_non_numeric", with_label(GOOD_LINE.replace("1.50", "1,5")), LABEL + r"non-numeric value"),
    BadInput("label_nan", with_label(GOOD_LINE.replace("10.00", "nan")), LABEL + r"NaN or inf value"),
    BadInput("label_negative_size", with_label(GOOD_LINE.replace("1.60", "-1.60")),
             LABEL + r"object size h w l = 1.5 -1.6 3.9; expected sizes > 0"),
    BadInput("label_occlusion_out_of_range", with_label(GOOD_LINE.replace(" 0 1.00 ", " 7 1.00 ")),
             LABEL + r"occluded = 7; expected 0 \(visible\), 1, 2 or 3"),
    BadInput("label_binary_file", _binary_label, r"label_2/000000\.txt: not a text file"),
    # --- calibration files
    BadInput("calib_singular_Tr_velo_to_cam", with_calib_row("Tr_velo_to_cam", _singular("Tr_velo_to_cam")),
             CALIB + r"Tr_velo_to_cam is singular \(rank 0 of 3"),
    BadInput("calib_singular_R0_rect", with_calib_row("R0_rect", _singular("R0_rect")),
             CALIB + r"R0_rect is singular \(rank 2 of 3.*expected a rotation"),
    BadInput("calib_mirrored_R0_rect", with_calib_row("R0_rect", "1 0 0 0 1 0 0 0 -1"),
             CALIB + r"the rotation part of R0_rect is not a rotation: a reflection \(determinant -1\)"),
    BadInput("calib_short_row", with_calib_row("P2", "721.5 0 609.6 44.9 0 721.5 172.9 0.2 0 0 1"),
             CALIB + r"P2 has 11 values, expected 12"),
    BadInput("calib_nan", with_calib_row("R0_rect", "1 0 0 0 nan 0 0 0 1"), CALIB + r".*R0_rect.*NaN"),
    BadInput("calib_missing_matrix", with_calib_row("Tr_velo_to_cam", None), CALIB + r"missing key 'Tr_velo_to_cam'"),
    BadInput("calib_non_numeric", with_calib_row("P2", "a b c d e f g h i j k l"),
             r"calib/000000\.txt:\d+: non-numeric value in 'P2'"),
    # --- point files, images, ImageSets
    BadInput("velodyne_truncated", corrupt_velodyne("truncated"),
             r"velodyne/000000\.bin: size \d+ bytes; expected a non-empty whole number of points of 4 float32"),
    BadInput("velodyne_empty", corrupt_velodyne("empty"), r"velodyne/000000\.bin: size 0 bytes"),
    BadInput("velodyne_nan_point", corrupt_velodyne("nan"), r"velodyne/000000\.bin: 1 points contain NaN or inf"),
    BadInput("frame_files_missing", remove_files,
             r"3 file\(s\) missing for the frames listed in .*ImageSets/train\.txt: velodyne/ lacks 000001\.bin; "
             r"calib/ lacks 000001\.txt; label_2/ lacks 000000\.txt"),
    BadInput("image_missing_for_one_frame", _one_image_missing,
             r"1 file\(s\) missing for the frames listed in .*train\.txt: image_2/ lacks 000001\.png"),
    BadInput("image_not_a_png", not_a_png, r"image_2/000000\.png: not a readable image .*expected a PNG"),
    BadInput("image_truncated_for_pictures", truncated_picture, r"image_2/000001\.png: cannot read image"),
    BadInput("split_frame_twice", with_split("000000\n000000\n"),
             r"ImageSets/train\.txt:2: frame 000000 is listed twice \(first on line 1\)"),
    BadInput("split_two_ids_on_a_line", with_split("000000 000001\n"),
             r"ImageSets/train\.txt:1: expected one frame id per line"),
    BadInput("split_empty", with_split("\n"), r"ImageSets/train\.txt: no frame ids listed"),
    BadInput("real_kitti_root_incomplete", broken_real_kitti,
             r"eval\.real_kitti_root=.*real: .*3 file\(s\) missing .*calib/ lacks 000008\.txt; "
             r"label_2/ lacks 000008\.txt"),
    # --- synthetic generation
    BadInput("synthetic_zero_frames", generate_with("data.synthetic.frames=0"),
             r"data\.synthetic\.frames: expected a number of frames >= 1, got 0"),
    BadInput("synthetic_negative_frames", generate_with("data.synthetic.frames=-3"),
             r"data\.synthetic\.frames: expected a number of frames >= 1, got -3"),
    BadInput("synthetic_val_fraction_above_1", generate_with("data.synthetic.val_fraction=1.5"),
             r"data\.synthetic\.val_fraction: expected a fraction in \[0, 1\].*got 1\.5"),
    BadInput("synthetic_all_frames_held_out", generate_with("data.synthetic.val_fraction=1.0"),
             r"data\.synthetic\.val_fraction=1\.0 with data\.synthetic\.frames=2 leaves no training frames"),
    BadInput("synthetic_no_val_frames", generate_with("data.synthetic.val_fraction=0.1"),
             r"val_fraction=0\.1 with data\.synthetic\.frames=2 leaves the 'val' split \(data\.val_split\) "
             r"empty: round\(2 x 0\.1\) = 0 frames are held out"),
    BadInput("synthetic_negative_seed", generate_with("data.synthetic.seed=-1"),
             r"data\.synthetic\.seed: expected an integer >= 0, got -1"),
    BadInput("synthetic_root_has_other_settings", generated_root_other_settings,
             r"data\.root=.*kitti: holds a synthetic dataset generated with other settings .*synthetic\.json\): "
             r"data\.synthetic\.seed=6 but the folder has 5"),
    BadInput("synthetic_root_is_another_folder", foreign_folder_at_root,
             r"data\.root=.*kitti: the folder exists but holds no KITTI-layout dataset"),
    BadInput("no_dataset_and_no_generator", train_with(dataset=False),
             r"data\.root=.*kitti: no KITTI-layout dataset there .*data\.synthetic is null"),
    BadInput("write_dataset_zero_frames", _write_dataset(num_frames=0), r"num_frames must be an integer >= 1, got 0"),
    BadInput("write_dataset_val_fraction", _write_dataset(val_fraction=1.5),
             r"val_fraction must be a fraction in \[0, 1\], got 1\.5"),
    BadInput("write_dataset_image_set_index", _write_dataset(image_sets={"train": [0, 2]}),
             r"image_sets\['train'\] must be frame indices in 0\.\.1, got \[2\]"),
    BadInput("write_dataset_into_other_folder", _write_into_foreign_folder,
             r"out: the folder was written without a settings record \(synthetic\.json\)"),
    # --- detection config fields (fail when the config is loaded)
    BadInput("distance_bins_decreasing", train_with("eval.distance_bins_m=[0, 40, 20]"),
             r"eval\.distance_bins_m: expected at least 2 finite, strictly increasing .*got \[0\.0, 40\.0, 20\.0\]"),
    BadInput("distance_bins_too_short", train_with("eval.distance_bins_m=[30]"),
             r"eval\.distance_bins_m: expected at least 2 .*got \[30\.0\]"),
    BadInput("picture_score_above_one", train_with("eval.picture_score=30"),
             r"eval\.picture_score: expected a score in \[0, 1\], got 30"),
    BadInput("augment_scale_reversed", train_with("data.augment.scale=[1.05, 0.95]"),
             r"data\.augment\.scale: expected \(low, high\) with low <= high, got \[1\.05, 0\.95\]"),
    BadInput("augment_scale_zero", train_with("data.augment.scale=[0, 1]"),
             r"data\.augment\.scale: expected scale factors > 0"),
    BadInput("augment_rotation_reversed", train_with("data.augment.rotation_rad=[0.5, -0.5]"),
             r"data\.augment\.rotation_rad: expected \(low, high\) with low <= high"),
    BadInput("pc_range_reversed", train_with("model.pc_range_m=[70.4, -40, -3, 0, 40, 1]"),
             r"'model'.*pc_range_m: expected \(x0, y0, z0, x1, y1, z1\) with x1 > x0"),
    BadInput("voxel_size_zero", train_with("model.voxel_size_m=[0.1, 0.0, 0.1]"),
             r"'model'.*voxel_size_m: expected 3 positive sizes"),
    BadInput("pc_range_not_whole_voxels", train_with("model.voxel_size_m=[0.3, 0.1, 0.1]"),
             r"the x extent of pc_range_m \(70\.4 m\) is not a multiple of voxel_size_m\[0\] = 0\.3 m"),
    BadInput("bev_stage_lists_differ", train_with("model.bev_layer_strides=[1]"),
             r"'model'.*bev_layer_strides.*need one entry per BEV stage .*lengths \[2, 1, 2, 2, 2\]"),
    BadInput("nms_iou_above_1", train_with("model.head.nms_iou=1.5"),
             r"'model\.head'.*nms_iou must lie in \(0, 1\]"),
    BadInput("point_features_beyond_kitti", train_with("model.num_point_features=5"),
             r"model\.num_point_features: KITTI points have 4 columns"),
    BadInput("max_voxels_zero", train_with("model.max_voxels_train=0"), r"max_voxels_train must be >= 1, got 0"),
    BadInput("split_name_is_a_path", train_with("data.train_split=../train"),
             r"data\.train_split: expected the name of an ImageSets/<name>\.txt file"),
    # --- eval.baseline (tools/eval.py, before the checkpoint is read)
    BadInput("baseline_missing", eval_with_baseline(lambda tmp: tmp / "nowhere"),
             r"eval\.baseline=.*nowhere: .*nowhere: predictions folder not found"),
    BadInput("baseline_run_folder", eval_with_baseline(_run_folder),
             r"eval\.baseline=.*other_run: .*no predictions for frame 000001 .*looks like a run folder: name its "
             r"predictions/ subfolder"),
    BadInput("baseline_labels_not_results", eval_with_baseline(_labels_not_results),
             r"eval\.baseline=.*labels/000001\.txt: expected detections with a score"),
    BadInput("baseline_lowercase_class", eval_with_baseline(_lowercase_results),
             r"pred/000001\.txt:1: unknown object type 'car' \(did you mean 'Car'\?\)"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    check_bad_input(case, tmp_path, capsys, monkeypatch)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


# --- synthetic generation: atomic, recorded, shared between processes ---------------------------------
def _data_cfg(root: Path, **synthetic) -> DataConfig:
    args = dict(frames=2, seed=SEED, val_fraction=0.5, workers=1)
    args.update(synthetic)
    return DataConfig(root=str(root), synthetic=SyntheticDataConfig(**args))


def test_failing_settings_write_nothing(tmp_path):
    with pytest.raises(ConfigError, match="leaves no training frames"):
        prepare_data(_data_cfg(tmp_path / "gen", val_fraction=1.0), training=True)
    assert list(tmp_path.iterdir()) == []


def test_held_out_test_set_is_fine_for_evaluation(tmp_path, monkeypatch):
    """val_fraction 1.0 (every frame held out) is what tools/eval.py's 1000-frame test set uses."""
    monkeypatch.setattr(synthetic, "_job", _fake_job)
    root = prepare_data(_data_cfg(tmp_path / "test", val_fraction=1.0), training=False)
    assert (root / "ImageSets" / "val.txt").read_text() == "000000\n000001\n"
    assert (root / "ImageSets" / "train.txt").read_text() == ""


def _fake_job(args):
    """Stands in for the (seconds per frame) renderer: an empty frame's files."""
    split_dir, seed, index, cfg = args
    fid = f"{index:06d}"
    for sub in ("velodyne", "calib", "label_2"):
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    np.ones((4, 4), np.float32).tofile(split_dir / "velodyne" / f"{fid}.bin")
    shutil.copy(frame_file(_SOURCE[0], "calib"), split_dir / "calib" / f"{fid}.txt")
    (split_dir / "label_2" / f"{fid}.txt").write_text("")
    return fid


def test_generation_records_settings_and_reuses_the_root(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_job", _fake_job)
    cfg = _data_cfg(tmp_path / "gen")
    root = prepare_data(cfg)
    record = json.loads((root / "synthetic.json").read_text())
    assert {k: record[k] for k in ("frames", "seed", "val_fraction")} == {"frames": 2, "seed": SEED,
                                                                          "val_fraction": 0.5}
    assert "workers" not in record and record["version"] == synthetic.GENERATOR_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary folder left
    stamp = (root / "ImageSets" / "train.txt").stat().st_mtime_ns
    assert prepare_data(_data_cfg(tmp_path / "gen", workers=3)) == root  # workers do not change the bytes
    assert (root / "ImageSets" / "train.txt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"data\.synthetic\.frames=3 but the folder has 2; "
                                          r"data\.synthetic\.val_fraction=0\.25 but the folder has 0\.5"):
        prepare_data(_data_cfg(tmp_path / "gen", frames=3, val_fraction=0.25))
    # a root without a record (a real dataset) is used as it is, whatever data.synthetic says
    (root / "synthetic.json").unlink()
    assert prepare_data(_data_cfg(tmp_path / "gen", frames=7)) == root


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def dies_on_second_frame(args):
        if args[2] == 1:
            raise KeyboardInterrupt
        return _fake_job(args)

    monkeypatch.setattr(synthetic, "_job", dies_on_second_frame)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(_data_cfg(tmp_path / "gen"))
    assert list(tmp_path.iterdir()) == []


def test_a_root_finished_meanwhile_by_another_process(tmp_path, monkeypatch):
    """Generation runs in a folder of this process's own; when another process renamed its
    dataset into place meanwhile, that one is kept where the settings match, else an error."""
    root = tmp_path / "gen"
    other_seed, seen = [SEED], []

    def job(args):
        seen.append(args[0].parent.name)
        if args[2] == 1:  # the other process finishes while this one generates
            (root / "ImageSets").mkdir(parents=True)
            settings = dataset_settings(2, other_seed[0], val_fraction=0.5)
            (root / "synthetic.json").write_text(json.dumps(settings))
        return _fake_job(args)

    monkeypatch.setattr(synthetic, "_job", job)
    assert write_kitti_dataset(root, 2, SEED, val_fraction=0.5) == ["000000", "000001"]
    assert re.fullmatch(rf"\.gen\.{os.getpid()}\.[0-9a-f]+\.partial", seen[0]), seen[0]
    assert not (root / "training").exists()  # the other process's root was kept, ours dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
    shutil.rmtree(root)
    other_seed[0] = SEED + 1
    with pytest.raises(ConfigError, match=r"gen: holds a synthetic dataset written meanwhile \(another "
                                          r"process\) with other settings .*seed: recorded 6, asked for 5"):
        write_kitti_dataset(root, 2, SEED, val_fraction=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


def test_library_readers_name_the_file(tmp_path):
    """The reader functions themselves (used by tools beyond DetectionDataset)."""
    p = tmp_path / "000003.txt"
    p.write_text(GOOD_LINE + "\n" + GOOD_LINE.replace("Car", "DONTCARE") + "\n")
    with pytest.raises(Exception, match=r"000003\.txt:2: unknown object type 'DONTCARE' \(did you mean 'DontCare'"):
        read_label(p)
    p.write_text(GOOD_LINE + "\nDontCare -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10\n")
    assert list(read_label(p).names) == ["Car", "DontCare"]  # DontCare keeps its -1 sizes
    calib = frame_file(_SOURCE[0], "calib")
    assert read_calib(calib).P2.shape == (3, 4)
