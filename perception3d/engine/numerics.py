"""Process-wide CPU floating-point setup: flush denormal floats to zero on every torch thread.

Arithmetic on denormal floats (magnitudes below 1.2e-38 in float32) takes the CPU's slow path,
many times the normal cost. A trained detector produces such values inside its matrix products
(probably tiny gradients of confident predictions times small weights): on the same batches of
two frames, the fine-voxel DSVT's training step took 1.25-1.3 s from its step-4000 checkpoint
against 1.0 s from fresh weights (2 threads), and 1.0 s again with denormals flushed; through
`tools/train.py` (batch 4) 2.9 against 2.3 s/step. Flushing changes only values below 1.2e-38.

`torch.set_flush_denormal` sets the flags (FTZ/DAZ) of the calling thread only. Threads inherit
them when created, so the flags reach torch's OpenMP workers only when set before the first
parallel torch operation starts the pool: call :func:`flush_denormals` first thing in a process
(`tools/train.py`, `tools/eval.py` and `tools/bench.py` do).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["flush_denormals"]

log = logging.getLogger(__name__)

# enough elements that an elementwise op is split over every thread (torch's grain is 32768)
_PROBE_ELEMENTS = 1 << 20
_LARGEST_DENORMAL_BITS = 0x007FFFFF


def flush_denormals() -> bool:
    """Flush denormal floats to zero; True when every torch thread does (see the module docstring).

    Returns False on a CPU without the flags, or when torch's thread pool had already started, in
    which case only the calling thread flushes (and a warning says so).
    """
    if not torch.set_flush_denormal(True):
        return False
    # probe: largest denormal times 1 over all threads; a thread without the flags keeps it
    bits = np.full(_PROBE_ELEMENTS, _LARGEST_DENORMAL_BITS, dtype=np.uint32)
    out = (torch.from_numpy(bits.view(np.float32)) * 1.0).view(torch.int32)
    left = int((out != 0).sum())
    if left:
        log.warning("flush_denormals() was called after torch's thread pool started: %d of %d probe values "
                    "stayed denormal, so only the calling thread flushes them (call it before any torch work)",
                    left, _PROBE_ELEMENTS)
    return left == 0
