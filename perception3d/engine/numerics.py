"""CPU floating-point mode: flush denormal floats to zero, but only where torch computes.

Arithmetic on denormal floats (magnitudes below 1.2e-38 in float32) takes the CPU's slow path,
many times the normal cost. A trained detector produces such values inside its matrix products:
resuming the fine-voxel DSVT from its step-4000 checkpoint took 2.9 s/step without flushing and
2.3 s/step with it (2 threads). Flushing (the x86 FTZ/DAZ flags, `torch.set_flush_denormal`)
changes only values below 1.2e-38 for torch's kernels.

The flags are per thread, and third-party code cannot always live with them: scipy's `cKDTree`
crashes (segmentation fault) building a tree over points that share a coordinate (e.g. a ground
plane at z = 0) when the calling thread flushes. So the flags are never left on the thread that
runs other libraries' code. What they may touch:

* torch's intra-op worker threads, for the life of the process: :func:`flush_torch_workers`, called
  by the command-line entry points before any torch work, sets the flags, starts torch's thread
  pool (threads inherit the flags when created; nothing else runs on those threads) and restores
  the calling thread;
* the calling (main) thread only inside :func:`denormals_flushed`, which restores the thread's
  previous mode on exit. `perception3d.engine.fit` enters it around each training step's forward,
  backward and optimizer step; data loading, evaluation and everything after training run
  outside it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import torch

__all__ = ["flush_torch_workers", "denormals_flushed", "thread_flushes_denormals"]

log = logging.getLogger(__name__)

# enough elements that an elementwise op is split over every thread (torch's grain is 32768)
_PROBE_ELEMENTS = 1 << 20
_LARGEST_DENORMAL = np.array([0x007FFFFF], dtype=np.uint32).view(np.float32)


def thread_flushes_denormals() -> bool:
    """Whether the calling thread flushes denormal floats now (a one-element numpy product)."""
    return int((_LARGEST_DENORMAL * np.float32(1.0)).view(np.uint32)[0]) == 0


def _denormal_products_left() -> int:
    """Largest-denormal floats times 1 over all torch threads: how many stayed denormal (int compare)."""
    bits = np.full(_PROBE_ELEMENTS, 0x007FFFFF, dtype=np.uint32)
    out = (torch.from_numpy(bits.view(np.float32)) * 1.0).view(torch.int32)
    return int((out != 0).sum())


def flush_torch_workers() -> bool:
    """Make torch's intra-op worker threads flush denormal floats; the calling thread is unchanged.

    Call it first thing in a process, before any parallel torch operation starts the thread pool
    (the command-line tools do). Returns True when every worker flushes: False on a CPU without the
    flags, or when the pool had already started (a warning then says so).
    """
    before = thread_flushes_denormals()
    if not torch.set_flush_denormal(True):
        return False
    try:
        # starts the pool (when it has not started yet) with the flags set: the workers inherit them
        left = _denormal_products_left()
    finally:
        torch.set_flush_denormal(before)
    if left:
        log.warning("flush_torch_workers() was called after torch's thread pool started: %d of %d probe values "
                    "stayed denormal, so torch's worker threads do not flush denormal floats (call it before any "
                    "torch work)", left, _PROBE_ELEMENTS)
    return left == 0


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats on the calling thread inside the block (when `enabled`), then restore
    the thread's previous mode. Enter it only around torch computation (see the module docstring)."""
    if not enabled:
        yield
        return
    before = thread_flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
