"""Run logging on rank 0: a progress bar, TensorBoard scalars and a JSONL file.

Files under the run folder:

* `tb/` - TensorBoard event files (`tensorboard --logdir <out_dir>/tb`): `train/<name>` for the
  losses and `lr`, `eval/<name>` for metrics.
* `log.jsonl` - one JSON object per logged step: `{"step", "split", "time", <scalars>}`; `time` is
  seconds of training since step 0: a resumed run goes on from the time its checkpoint recorded
  (`elapsed_s`), so the work lost after that checkpoint is not counted, and the records written
  after that checkpoint by the interrupted process are dropped (each step is logged once).

Other ranks get a `RunLogger(enabled=False)` that does nothing.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Mapping

from perception3d.io.atomic import atomic_write_text

__all__ = ["RunLogger"]


def _fmt(value: float) -> str:
    if value == 0 or (1e-3 <= abs(value) < 1e4):
        return f"{value:.4f}"
    return f"{value:.3e}"


class RunLogger:
    """Progress bar + TensorBoard + JSONL for one run.

    Args:
        out_dir: run folder.
        total_steps: for the progress bar.
        initial_step: the step this process starts at (resumed runs: the checkpoint's); the log
            drops what an earlier process logged after it. None: not known yet, the caller calls
            :meth:`set_step` once it is (messages wait until then).
        initial_elapsed_s: seconds the run had taken before (resumed runs; see :attr:`elapsed_s`).
        enabled: False on non-zero ranks (then every method is a no-op).
        progress: show a tqdm progress bar (on stderr).
        tensorboard: write TensorBoard events (skipped with a warning if tensorboard is missing).
    """

    def __init__(self, out_dir: str | Path, total_steps: int, initial_step: int | None = 0,
                 initial_elapsed_s: float = 0.0, enabled: bool = True, progress: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._bar = None
        self._tb = None
        self._jsonl = None
        self._pending: list[str] = []  # JSONL lines waiting for set_step (initial_step None)
        self._last_time = time.perf_counter()
        self._t_start = self._last_time - initial_elapsed_s
        self._last_step = initial_step or 0
        self._start_step = initial_step or 0
        self._want_tb = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._want_tb = tensorboard
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step or 0, unit="it", dynamic_ncols=True,
                             file=sys.stderr, desc="train")
        if initial_step is not None:
            self._open_jsonl(initial_step, initial_elapsed_s)

    def _open_jsonl(self, step: int, elapsed_s: float) -> None:
        """Start `log.jsonl` at `step`: drop what was logged after it, append what waited."""
        self._rewind_jsonl(step, elapsed_s)
        self._jsonl = open(self.out_dir / "log.jsonl", "a", buffering=1)
        for line in self._pending:
            self._jsonl.write(line)
        self._pending.clear()

    def _rewind_jsonl(self, step: int, elapsed_s: float) -> None:
        """Drop the records of `log.jsonl` written after `step` (and messages after `elapsed_s`):
        what a process killed after its last checkpoint logged, which the resumed run redoes."""
        path = self.out_dir / "log.jsonl"
        if not path.is_file() or path.stat().st_size == 0:
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", -1) <= step and (
                    "step" in record or record.get("time", 0.0) <= elapsed_s):
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))

    def _open_tensorboard(self) -> None:
        """Open the writer at the first logged step; a resumed run purges events after its start step."""
        self._want_tb = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            warnings.warn(f"TensorBoard logging disabled ({e})", stacklevel=2)
            return
        self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=self._start_step or None)

    @property
    def elapsed_s(self) -> float:
        """Seconds of training so far, those before a resume included (what checkpoints store)."""
        return time.perf_counter() - self._t_start

    def set_step(self, step: int, elapsed_s: float = 0.0) -> None:
        """Move the progress bar, the it/s reference and the clock to `step` (after resuming), which
        the run had reached after `elapsed_s` seconds."""
        self._last_step, self._last_time = step, time.perf_counter()
        self._t_start = self._last_time - elapsed_s
        if self.enabled and self._jsonl is None:
            self._open_jsonl(step, elapsed_s)
        self._start_step = step
        if self._bar is not None:
            self._bar.n = self._bar.last_print_n = step
            self._bar.refresh()

    def step(self, n: int = 1) -> None:
        """Advance the progress bar."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        """Record scalars for `step` (TensorBoard `split/name`, JSONL, progress bar postfix)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        values = {k: float(v) for k, v in scalars.items()}
        if split == "train" and step > self._last_step:
            values.setdefault("it_per_s", (step - self._last_step) / max(now - self._last_time, 1e-9))
            self._last_step, self._last_time = step, now
        if self._want_tb and self._tb is None:
            self._open_tensorboard()
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._jsonl is not None:
            record = {"step": step, "split": split, "time": round(now - self._t_start, 3), **values}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._bar is not None:
            shown = {k: _fmt(v) for k, v in values.items() if k in ("loss", "lr") or split == "eval"}
            if split == "eval":
                self._bar.write(f"[eval] step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
            else:
                self._bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        """Print a line (above the progress bar) and keep it in the JSONL log."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr)
        line = json.dumps({"message": text, "time": round(time.perf_counter() - self._t_start, 3)}) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
        else:
            self._pending.append(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        self._pending.clear()  # set_step never came (the run failed first): the log stays as it was
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
