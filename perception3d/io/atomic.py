"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file (if any) intact and never a half-written one. The one
implementation behind checkpoints, configs, metrics, exported models and rendered files; and
`atomic_folder`, the same for a whole folder (generated datasets).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_folder", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary path beside `path`; on success it is fsynced and renamed onto
    `path`, on an exception removed (`path` untouched). The file gets the umask's usual mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside `path` (`.<name>.<pid>.<hex>.partial`) to fill;
    on success it is renamed onto `path`, on an exception removed.

    `path` must be absent or an empty folder when the rename happens; where another process put a
    folder there meanwhile, `FileExistsError` is raised (the temporary folder removed), so the caller
    can check what is there. The temporary folders that killed processes left beside `path` are
    removed first (those whose process no longer runs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.partial$")
    for old in path.parent.iterdir():
        m = stale.match(old.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, path)  # replaces an empty folder only
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path}: created by another process meanwhile") from None
            raise
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
