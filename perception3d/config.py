"""Frozen-dataclass configs loaded from YAML: strict, typed, and the same for every task.

A config file is plain YAML read with `yaml.safe_load` and checked strictly against a (nested)
frozen dataclass:

* unknown keys, wrong types and missing required keys raise `ConfigError` naming the key, the
  file the key came from, the expected and the given type;
* `_base_: other.yaml` (or a list of paths) is resolved relative to the file that names it and
  merged recursively underneath it: the child wins, mappings merge key by key, lists replace;
  cycles are detected;
* `--set a.b=c` overrides (`overrides=["a.b=c"]`) are applied after the bases; the value is parsed
  with `yaml.safe_load` (so `c` may be `3`, `0.5`, `true`, `null`, `[1, 2]`) and the key path is
  checked against the dataclass;
* `save_config` writes the fully resolved config as plain YAML that `load_config` reads back to an
  equal object.

Supported field types: `int`, `float` (an int is accepted; so is a string such as `1e-3`, which
PyYAML's YAML 1.1 reads as a string), `bool`, `str`, `Optional[X]` / `X | None`, `Literal[...]`,
`tuple[X, ...]`, `tuple[X, Y]`, `list[X]` (from YAML lists), `dict[str, X]`, `Any` and nested
dataclasses. A field's default (or `default_factory`) is used when a key is absent.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", DetectionConfig, ["train.lr=0.002"])
    >>> save_config(cfg, "outputs/quickstart/config.yaml")
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from perception3d.errors import ConfigError
from perception3d.io.atomic import atomic_write_text

__all__ = [
    "config_differences",
    "load_config",
    "load_config_dict",
    "from_dict",
    "config_to_dict",
    "save_config",
    "parse_override",
]

T = TypeVar("T")
BASE_KEY = "_base_"
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Reading YAML with _base_ files
# --------------------------------------------------------------------------------------------

def _read_yaml(path: Path, referenced_from: str | None) -> dict:
    if not path.is_file():
        where = f" (named in _base_ of {referenced_from})" if referenced_from else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, child: dict, origins: dict[str, str], child_src: str, prefix: str = "") -> dict:
    """Merge `child` over `base` (mappings merge recursively, anything else replaces)."""
    out = dict(base)
    for key, value in child.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            origins[path] = child_src
            out[key] = _merge(out[key], value, origins, child_src, path + ".")
        else:
            out[key] = value
            _mark(origins, path, value, child_src)
    return out


def _mark(origins: dict[str, str], path: str, value: Any, src: str) -> None:
    origins[path] = src
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, f"{path}.{k}", v, src)


def _load_with_bases(path: Path, stack: tuple[Path, ...], origins: dict[str, str],
                     referenced_from: str | None = None) -> dict:
    path = path.resolve() if path.exists() else path.absolute()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{stack[-1]}: _base_ cycle: {chain}")
    data = _read_yaml(path, referenced_from)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: key '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_data = _load_with_bases(path.parent / base, (*stack, path), origins, str(path))
        merged = _merge(merged, base_data, origins, str(path.parent / base))
    return _merge(merged, data, origins, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split a `--set` override `a.b=c` into `(["a", "b"], yaml.safe_load("c"))`.

    Raises:
        ConfigError: if there is no `=` or the key is empty.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.001")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {e}") from None
    return key.split("."), parsed


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _check_override_path(cls: type, keys: list[str], text: str) -> None:
    tp: Any = cls
    for i, key in enumerate(keys):
        tp = _strip_optional(tp)
        dotted = ".".join(keys[: i + 1])
        if dataclasses.is_dataclass(tp):
            fields = _field_types(tp)
            if key not in fields:
                raise ConfigError(f"--set {text}: unknown key '{dotted}' (known: {', '.join(fields)})")
            tp = fields[key]
        elif typing.get_origin(tp) is dict or tp is dict or tp is Any:
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        else:
            parent = ".".join(keys[:i])
            raise ConfigError(f"--set {text}: '{parent}' is a {_type_name(tp)}, it has no key '{key}'")


def load_config_dict(path: str | Path, overrides: Sequence[str] = (), cls: type | None = None
                     ) -> tuple[dict, dict[str, str]]:
    """Read a config file, merge its `_base_` files and apply overrides, without type checking.

    Args:
        path: the YAML file.
        overrides: `KEY=VALUE` strings (dotted keys), applied last.
        cls: if given, override key paths are checked against this dataclass.

    Returns:
        `(data, origins)`: the merged plain dict and, for every dotted key, where it was set (a file
        path or `--set KEY=VALUE`).

    Raises:
        ConfigError: missing file, bad YAML, `_base_` cycle or malformed override.
    """
    origins: dict[str, str] = {}
    data = _load_with_bases(Path(path), (), origins)
    for text in overrides:
        keys, value = parse_override(text)
        if cls is not None:
            _check_override_path(cls, keys, text)
        node = data
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
            origins.setdefault(".".join(keys[: i + 1]), f"--set {text}")
        node[keys[-1]] = value
        _mark(origins, ".".join(keys), value, f"--set {text}")
    return data, origins


# --------------------------------------------------------------------------------------------
# Building dataclasses from dicts
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _value_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


class _Ctx:
    def __init__(self, origins: Mapping[str, str], default_src: str):
        self.origins = origins
        self.default_src = default_src

    def src(self, key: str) -> str:
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.default_src

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.src(key)}: {msg}")

    def type_error(self, key: str, tp: Any, value: Any) -> ConfigError:
        return self.error(key, f"key '{key}' expects {_type_name(tp)}, got {_value_name(value)}")


def _convert(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ctx.type_error(key, tp, value)
        return _build(tp, value, key, ctx)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ctx.type_error(key, tp, value)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, ctx)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ctx.type_error(key, tp, value)
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ctx.error(key, f"key '{key}' must be one of {choices}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ctx.type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ctx.type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise ctx.type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ctx.type_error(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise ctx.type_error(key, tp, value)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ctx.type_error(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ctx.error(key, f"key '{key}' expects {len(args)} items ({_type_name(tp)}), "
                                     f"got {len(value)}: {value!r}")
            items = [_convert(a, v, f"{key}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ctx.type_error(key, tp, value)
        ktp, vtp = args if len(args) == 2 else (Any, Any)
        return {_convert(ktp, k, f"{key}", ctx): _convert(vtp, v, f"{key}.{k}", ctx) for k, v in value.items()}
    raise ctx.error(key, f"key '{key}' has a field type the config loader does not support: {_type_name(tp)}")


def _build(cls: type, data: Mapping, prefix: str, ctx: _Ctx) -> Any:
    fields = _field_types(cls)
    pre = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ctx.error(f"{pre}{key}", f"unknown key '{pre}{key}' (known: {', '.join(fields) or 'none'})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{pre}{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(fields[f.name], data[f.name], key, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.error(key, f"missing required key '{key}' ({_type_name(fields[f.name])})")
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as e:
        where = f"'{prefix}'" if prefix else "the config"
        # name where the offending key was set (an override, a _base_ file) when the message names it
        named = [f"{pre}{k}" for k in data if re.search(rf"(?<![\w.]){re.escape(pre + k)}(?![\w])", str(e))]
        raise ctx.error(named[0] if len(named) == 1 else prefix, f"invalid {where} ({cls.__name__}): {e}") from None


def from_dict(cls: type[T], data: Mapping, source: str = "<dict>",
              origins: Mapping[str, str] | None = None) -> T:
    """Build the dataclass `cls` from a plain dict, strictly.

    Args:
        cls: a (frozen) dataclass type.
        data: plain nested dict, as read from YAML.
        source: name used in error messages (usually the file path).
        origins: optional map of dotted keys to where they were set, for better messages.

    Raises:
        ConfigError: unknown key, wrong type or missing required key, naming key and source.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    return _build(cls, data, "", _Ctx(origins or {}, source))


def load_config(path: str | Path, cls: type[T], overrides: Iterable[str] = ()) -> T:
    """Load `path` (with its `_base_` files and `overrides`) into the dataclass `cls`.

    Args:
        path: the YAML config file.
        cls: the config dataclass (e.g. `DetectionConfig`).
        overrides: `KEY=VALUE` strings from `--set`, e.g. `["train.lr=0.001", "model.dropout=0.1"]`.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: naming the file (or the override) and the key, for a missing file, bad YAML,
            `_base_` cycle, unknown key, wrong type or missing required key.
    """
    data, origins = load_config_dict(path, list(overrides), cls)
    return from_dict(cls, data, str(Path(path)), origins)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict:
    """The config as a plain nested dict (tuples become lists), ready for YAML or JSON."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config as plain YAML (atomically); `load_config` reads it back equal."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
    return path


def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """`"key: old -> new"` for every (dotted) key whose value differs between two plain config dicts
    (`config_to_dict` output), sorted by key."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
