"""Harness of the bad-input tables (`test_bad_inputs*.py`): one clear error, nothing lost.

A `BadInput` builds one bad input inside a temporary folder and returns the call that meets it:
either a library call, which must raise the toolkit's own error (`Perception3DError`: `DataError`,
`ConfigError`) with a message matching `match` (the file or field, and what was expected), or a
`tools/` entry point (`Tool(...)`), which must exit with code 2, print `error: ...` matching
`match` on stderr and no traceback. In both cases no file that existed before the call may
change or disappear (new files are allowed only where `allow_new` says so).
"""
from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from p3d.cli import COMMANDS
from perception3d.errors import Perception3DError

__all__ = ["BadInput", "Tool", "check_bad_input", "snapshot"]


@dataclass(frozen=True)
class Tool:
    """A `p3d NAME` command line (p3d/cli.py), run in-process through its module's `main(argv)`."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class BadInput:
    """One row of a bad-input table.

    Attributes:
        id: the test id (short, unique within its table).
        make: `make(tmp_path)` writes the bad input under `tmp_path` and returns either a
            zero-argument callable (a library call) or a `Tool`.
        match: regular expression the error message must contain (searched, case-sensitive).
        allow_new: glob patterns (relative to `tmp_path`) of files the call may create.
    """

    id: str
    make: Callable[[Path], Any]
    match: str
    allow_new: tuple[str, ...] = field(default=())


def snapshot(root: Path) -> dict[str, str]:
    """`{relative path: sha1 of the bytes (or 'dir' / 'link -> target')}` of everything under `root`."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link -> {p.readlink()}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _run_tool(tool: Tool, capsys) -> str:
    module = importlib.import_module(COMMANDS[tool.name][0])
    capsys.readouterr()
    try:
        rc = module.main(list(tool.argv))
    except SystemExit as e:  # argparse errors exit 2 themselves
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"p3d {tool.name} {' '.join(tool.argv)}: exit code {rc}, expected 2; stderr:\n{err}"
    assert "Traceback" not in err, err
    return err


def check_bad_input(case: BadInput, tmp_path: Path, capsys, monkeypatch) -> None:
    """Run one row: the clear error it must give, and that nothing that existed changed."""
    monkeypatch.chdir(tmp_path)
    call = case.make(tmp_path)
    before = snapshot(tmp_path)
    if isinstance(call, Tool):
        message = _run_tool(call, capsys)
    else:
        with pytest.raises(Perception3DError) as info:
            call()
        message = str(info.value)
    assert re.search(case.match, message), f"message does not match {case.match!r}:\n{message}"
    after = snapshot(tmp_path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"files changed or removed by a failing call: {changed}"
    new = [k for k in after if k not in before
           and not any(Path(k).match(g) for g in case.allow_new)]
    assert not new or all(after[k] == "dir" for k in new), f"files left behind by a failing call: {new}"
