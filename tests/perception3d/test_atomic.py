"""perception3d.io.atomic: a file or a whole folder is either complete or absent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from perception3d.io.atomic import atomic_folder, atomic_write_text


def test_atomic_write_text_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(ZeroDivisionError):
        from perception3d.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text("half")
            1 / 0
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_renames_when_complete_and_removes_on_failure(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with atomic_folder(root) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    with atomic_folder(root) as tmp:
        (tmp / "x").write_text("1")
    assert (root / "x").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_atomic_folder_never_replaces_what_another_process_wrote(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(FileExistsError, match="another process"):
        with atomic_folder(root) as tmp:
            (tmp / "mine").write_text("1")
            root.mkdir()
            (root / "theirs").write_text("2")
    assert [p.name for p in root.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_atomic_folder_sweeps_what_killed_processes_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has ended
    stale = tmp_path / f".data.{dead_pid}.0badcafe.partial"
    live = tmp_path / f".data.{os.getpid()}.12345678.partial"  # a run of this (live) process
    other = tmp_path / f".other.{dead_pid}.0badcafe.partial"  # another folder's
    for p in (stale, live, other):
        p.mkdir()
    with atomic_folder(tmp_path / "data") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and live.exists() and other.exists()
