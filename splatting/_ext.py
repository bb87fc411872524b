"""Builds (at first use) and loads the C++ CPU kernels: the rasterizer (``csrc/raster_cpu.cpp``,
``csrc/projection_cpu.cpp``, ``csrc/sh_cpu.cpp``) and the Compact 3DGS kernels
(``csrc/compact_cpu.cpp``), one extension.

``torch.utils.cpp_extension.load`` compiles it with the machine's g++ and ninja (about a minute,
once) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); later imports load the cached library in milliseconds. The
library name carries a hash of the sources, the flags and the CPU model, so an edited source or a
different machine never picks up a stale build. It is compiled with ``-fopenmp`` and uses
``at::parallel_for``: the kernels run on torch's own thread pool (``torch.set_num_threads``).
"""
from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path

__all__ = ["cpu_ext"]

_SRCS = [Path(__file__).resolve().parent / "csrc" / f for f in ("raster_cpu.cpp", "projection_cpu.cpp", "sh_cpu.cpp", "compact_cpu.cpp")]
_FLAGS = ["-O3", "-ffast-math", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_ext = None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_ext():
    """The compiled extension module (built on the first call of the process if not cached)."""
    global _ext
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            import torch
            from torch.utils import cpp_extension

            key = hashlib.sha1(b"".join(p.read_bytes() for p in _SRCS) + " ".join(_FLAGS).encode() + _cpu_model().encode()
                               + torch.__version__.encode()).hexdigest()[:10]
            name = f"p3d_raster_cpu_{key}"
            build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
            if not any(build_dir.glob(f"{name}*.so")):
                print(f"[splatting] compiling the CPU kernels into {build_dir} (first use, about a minute)",
                      file=sys.stderr)
            _ext = cpp_extension.load(name=name, sources=[str(p) for p in _SRCS], extra_cflags=_FLAGS,
                                      extra_ldflags=["-fopenmp"], verbose=False)
    return _ext
