"""A run folder owned by one process: `RunFolder(path, resume=...)`.

The command-line tools open the folder they write (`tools/train.py` its run folder, `tools/eval.py`
its output folder) before any work:

* the path must be a folder that can be created and written (checked, with a clear error);
* an exclusive lock on `PATH/.lock` (`fcntl.flock`): a second process writing the same folder
  stops at once with an error naming the first one's pid. The kernel releases the lock when its
  process ends, however it ends, so a killed run never leaves the folder stuck (its `.lock` file
  stays, unlocked; a clean exit removes it, and a folder this process created and left empty);
* for training: a folder that holds an earlier run (checkpoints, `log.jsonl`, `metrics.json`,
  `config.yaml`) is continued only with `resume=True` (`--resume`), never mixed with a new run;
* leftovers of a killed process (the hidden temporary files of `perception3d.io.atomic` and of the
  checkpoint manager) are removed: no other process can be writing them while the lock is held.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from perception3d.errors import DataError

__all__ = ["RunFolder", "RUN_FILES"]

LOCK = ".lock"
# what marks a folder as holding an earlier training run
RUN_FILES = ("config.yaml", "log.jsonl", "metrics.json", "ckpt/latest.pt", "ckpt/step_*.pt")


def _is_temp(name: str) -> bool:
    # perception3d.io.atomic: ".<name>.<pid>.<hex>.tmp<suffix>"; checkpoint links: ".latest.pt.<pid>.tmp"
    return name.startswith(".") and ".tmp" in name


class RunFolder:
    """Exclusive ownership of a run folder by this process (see the module docstring).

    Args:
        path: the folder (created with its parents).
        resume: None for an output folder that may be rewritten (evaluation); False for a new
            training run (refuses a folder holding an earlier run); True to continue one.
        option: the command-line option that named the folder, for messages.

    Use as a context manager, or `open()` / `close()`.

    Raises:
        DataError: (from `open`) the path is a file, cannot be created or written, another
            process holds the folder, or (resume=False) it holds an earlier run.
    """

    def __init__(self, path: str | Path, resume: bool | None = None, option: str = "--out"):
        self.path = Path(path)
        self.resume = resume
        self.option = option
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self) -> str:
        return f"{self.option} {self.path}"

    def open(self) -> "RunFolder":
        path = self.path
        if path.exists() and not path.is_dir():
            raise DataError(f"{self._where()}: exists and is not a folder (expected a run folder)")
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self._where()}: cannot create the folder ({e.strerror or e})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise DataError(f"{self._where()}: the folder is not writable")
        self._lock()
        try:
            if self.resume is False:
                found = [f for f in RUN_FILES if any(True for _ in path.glob(f))]
                if found:
                    raise DataError(f"{self._where()}: holds an earlier run ({', '.join(found)}); continue it with "
                                    "--resume, or choose another --out (or delete the folder)")
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        import fcntl

        lock = self.path / LOCK
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)  # again: a closing owner may have removed it
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DataError(f"{self._where()}: cannot create its lock file {lock} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DataError(f"{self._where()}: another process (pid {holder}) is writing this folder; "
                                    "wait for it to finish or choose another folder") from None
                raise DataError(f"{self._where()}: cannot lock {lock} ({e.strerror})") from None
            # the file we locked must still be the one at the path (not one removed meanwhile)
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _remove_leftovers(self) -> None:
        for dirpath, _, files in os.walk(self.path):
            for name in files:
                if _is_temp(name):
                    Path(dirpath, name).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the lock file and release the lock (a process waiting on the removed file sees that
        it is gone and locks a new one); remove the folder if this process created it and left it
        empty (a run that failed before writing anything)."""
        if self._fd is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created and not any(files for _, _, files in os.walk(self.path)):
            shutil.rmtree(self.path, ignore_errors=True)
