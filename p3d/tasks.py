"""The one name lookup of the toolkit: a config's `task:` -> its config dataclass and entry points.

Entries are lazy `module:attribute` strings so that `tools/train.py --help` and the other tasks
import nothing heavy. A task module provides:

* a frozen config dataclass with a `task: str` field and a `train: perception3d.engine.TrainConfig`;
* `train(cfg, out_dir: Path, resume: bool, on_start: Callable[[], None] | None) -> dict`
  (JSON-serialisable summary; `on_start` is called once the run is set up, before its first step);
* `evaluate(cfg, ckpt: Path, out_dir: Path) -> dict` (JSON-serialisable metrics).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from perception3d.config import load_config_dict
from perception3d.errors import ConfigError

__all__ = ["TASKS", "Task", "import_string", "get_task", "task_name_of"]

TASKS: dict[str, tuple[str, str, str]] = {
    "detection": ("detection.config:DetectionConfig", "detection.task:train", "detection.task:evaluate"),
    "splatting": ("splatting.config:SplatConfig", "splatting.trainer:train", "splatting.trainer:evaluate"),
}


@dataclass(frozen=True)
class Task:
    """A resolved task: its name, config dataclass and entry points."""

    name: str
    config_cls: type
    train: Callable[..., dict]
    evaluate: Callable[..., dict]


def import_string(target: str) -> Any:
    """Import `package.module:attribute`."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {attr!r} (from TASKS entry {target!r})") from None


def task_name_of(config_path: str | Path, overrides: Sequence[str] = ()) -> str:
    """The `task:` value of a config file (after `_base_` merging and overrides).

    Raises:
        ConfigError: missing file, bad YAML, missing `task`, or a task name not in `TASKS`.
    """
    data, origins = load_config_dict(config_path, overrides)
    known = ", ".join(sorted(TASKS))
    if "task" not in data:
        raise ConfigError(f"{config_path}: missing key 'task' (which experiment this config is for; one of: {known})")
    name = data["task"]
    if name not in TASKS:
        src = origins.get("task", str(config_path))
        raise ConfigError(f"{src}: unknown task {name!r} (known tasks: {known})")
    return name


def get_task(name: str) -> Task:
    """Import the task `name` from `TASKS`."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r} (known tasks: {', '.join(sorted(TASKS))})")
    cfg_target, train_target, eval_target = TASKS[name]
    return Task(name, import_string(cfg_target), import_string(train_target), import_string(eval_target))
