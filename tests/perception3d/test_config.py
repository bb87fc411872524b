"""Tests for perception3d.config: strict YAML -> frozen dataclass loading."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from perception3d.config import config_to_dict, from_dict, load_config, parse_override, save_config
from perception3d.engine import TrainConfig
from perception3d.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    width: int = 8
    scale: float = 1.0
    name: Optional[str] = None


@dataclass(frozen=True)
class Model:
    kind: Literal["small", "large"] = "small"
    voxel_size_m: tuple[float, ...] = (0.1, 0.1, 0.2)
    pc_range_m: tuple[float, float, float, float, float, float] = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)
    layers: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)
    maybe: Optional[Inner] = None
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Exp:
    task: str
    model: Model = field(default_factory=Model)
    train: TrainConfig = field(default_factory=TrainConfig)
    use_amp: bool = False


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_smoke_defaults_and_types(tmp_path):
    p = write(tmp_path / "a.yaml", "task: t\nmodel:\n  kind: large\n  voxel_size_m: [0.05, 0.05, 0.1]\n"
                                   "  inner: {width: 3, scale: 2}\ntrain: {lr: 1e-3, max_steps: 7}\n")
    cfg = load_config(p, Exp)
    assert cfg.model.kind == "large"
    assert cfg.model.voxel_size_m == (0.05, 0.05, 0.1)
    assert isinstance(cfg.model.voxel_size_m, tuple)
    assert cfg.model.inner == Inner(width=3, scale=2.0, name=None)
    assert isinstance(cfg.model.inner.scale, float)  # int accepted for float, converted
    assert cfg.train.lr == pytest.approx(1e-3)  # PyYAML reads "1e-3" as a string; accepted for float
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == TrainConfig().batch_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task = "x"  # type: ignore[misc]


def test_unknown_key_names_key_file_and_known(tmp_path):
    p = write(tmp_path / "a.yaml", "task: t\nmodel:\n  foo: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Exp)
    msg = str(e.value)
    assert str(p) in msg and "unknown key 'model.foo'" in msg and "voxel_size_m" in msg


@pytest.mark.parametrize("text, key, expected", [
    ("model: {inner: {width: 2.5}}", "model.inner.width", "int"),
    ("model: {inner: {width: true}}", "model.inner.width", "int"),
    ("model: {inner: {scale: abc}}", "model.inner.scale", "float"),
    ("use_amp: 1", "use_amp", "bool"),
    ("model: {voxel_size_m: 0.1}", "model.voxel_size_m", "tuple"),
    ("model: {voxel_size_m: [0.1, x]}", "model.voxel_size_m[1]", "float"),
    ("model: {inner: 3}", "model.inner", "Inner"),
    ("model: {weights: {a: b}}", "model.weights.a", "float"),
])
def test_wrong_type_names_key_expected_and_got(tmp_path, text, key, expected):
    p = write(tmp_path / "a.yaml", "task: t\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Exp)
    msg = str(e.value)
    assert str(p) in msg and f"'{key}'" in msg and expected in msg and "got" in msg


def test_literal_fixed_tuple_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.kind' must be one of 'small', 'large', got 'huge'"):
        load_config(write(tmp_path / "a.yaml", "task: t\nmodel: {kind: huge}\n"), Exp)
    with pytest.raises(ConfigError, match=r"'model.pc_range_m' expects 6 items"):
        load_config(write(tmp_path / "b.yaml", "task: t\nmodel: {pc_range_m: [1, 2, 3]}\n"), Exp)
    with pytest.raises(ConfigError, match=r"c.yaml: missing required key 'task'"):
        load_config(write(tmp_path / "c.yaml", "model: {kind: small}\n"), Exp)


def test_optional_nested_and_null(tmp_path):
    cfg = load_config(write(tmp_path / "a.yaml", "task: t\nmodel: {maybe: {width: 5}, inner: {name: null}}\n"), Exp)
    assert cfg.model.maybe == Inner(width=5)
    assert cfg.model.inner.name is None
    with pytest.raises(ConfigError, match="'model.inner.width'"):
        load_config(write(tmp_path / "b.yaml", "task: t\nmodel: {inner: {width: null}}\n"), Exp)


def test_post_init_validation_is_reported_with_file(tmp_path):
    p = write(tmp_path / "a.yaml", "task: t\ntrain: {max_steps: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Exp)
    assert str(p) in str(e.value) and "max_steps must be >= 1" in str(e.value)


def test_base_merge_relative_paths_and_lists_replace(tmp_path):
    write(tmp_path / "base" / "root.yaml", "task: t\nmodel: {layers: [1, 2, 3], inner: {width: 4, scale: 3.0}}\n"
                                           "train: {lr: 0.5}\n")
    write(tmp_path / "base" / "mid.yaml", "_base_: root.yaml\nmodel: {inner: {width: 6}}\n")
    write(tmp_path / "other.yaml", "train: {batch_size: 16}\n")
    p = write(tmp_path / "exp" / "child.yaml", "_base_: [../base/mid.yaml, ../other.yaml]\nmodel: {layers: [9]}\n"
                                               "train: {lr: 0.25}\n")
    cfg = load_config(p, Exp)
    assert cfg.model.layers == [9]  # lists replace
    assert cfg.model.inner.width == 6 and cfg.model.inner.scale == 3.0  # dicts merge, deep
    assert cfg.train.lr == 0.25 and cfg.train.batch_size == 16  # child wins; second base applied


def test_error_names_the_base_file_the_key_came_from(tmp_path):
    base = write(tmp_path / "root.yaml", "task: t\nmodel: {bogus: 1}\n")
    p = write(tmp_path / "child.yaml", "_base_: root.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Exp)
    assert str(base.resolve()) in str(e.value) and "'model.bogus'" in str(e.value)


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\ntask: t\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", Exp)
    p = write(tmp_path / "c.yaml", "_base_: nothere.yaml\ntask: t\n")
    with pytest.raises(ConfigError, match=r"nothere.yaml: config file not found \(named in _base_ of .*c.yaml\)"):
        load_config(p, Exp)


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", Exp)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "task: [unclosed\n"), Exp)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"), Exp)


def test_overrides_applied_after_bases_and_validated(tmp_path):
    write(tmp_path / "root.yaml", "task: t\ntrain: {lr: 0.5}\n")
    p = write(tmp_path / "child.yaml", "_base_: root.yaml\ntrain: {lr: 0.25}\n")
    cfg = load_config(p, Exp, ["train.lr=0.125", "model.voxel_size_m=[1, 2, 3]", "use_amp=true",
                               "model.maybe.width=3", "model.weights.car=2"])
    assert cfg.train.lr == 0.125 and cfg.model.voxel_size_m == (1.0, 2.0, 3.0) and cfg.use_amp is True
    assert cfg.model.maybe == Inner(width=3) and cfg.model.weights == {"car": 2.0}
    with pytest.raises(ConfigError, match=r"--set train\.lrr=1: unknown key 'train.lrr' \(known: .*lr"):
        load_config(p, Exp, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"'use_amp' is a bool, it has no key 'x'"):
        load_config(p, Exp, ["use_amp.x=1"])
    with pytest.raises(ConfigError, match=r"--set train\.max_steps=lots: key 'train.max_steps' expects int"):
        load_config(p, Exp, ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, Exp, ["train.lr"])


def test_parse_override_uses_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_save_and_reload_round_trip(tmp_path):
    write(tmp_path / "root.yaml", "task: t\nmodel: {maybe: {width: 2, name: n}, weights: {a: 1.5}}\n")
    p = write(tmp_path / "child.yaml", "_base_: root.yaml\ntrain: {betas: [0.8, 0.9], grad_clip: 10}\n")
    cfg = load_config(p, Exp, ["model.kind=large"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    text = out.read_text()
    assert "_base_" not in text and "!!python" not in text  # plain YAML, fully resolved
    assert load_config(out, Exp) == cfg
    assert config_to_dict(cfg)["train"]["betas"] == [0.8, 0.9]
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="<src>: expected a mapping"):
        from_dict(Exp, [1, 2], source="<src>")  # type: ignore[arg-type]
