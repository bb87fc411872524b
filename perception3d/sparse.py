"""Sparse voxel tensors on top of spconv 2.3.8, with the CPU fixes applied on import.

Importing this module patches ``spconv.pytorch`` (idempotently) so that it is usable and correct
on a CPU-only machine:

(a) **Backward crash.** ``spconv.pytorch.cppcore.get_current_stream`` calls
    ``torch.cuda.current_stream()`` even for CPU tensors (e.g. unconditionally in
    ``ops.indice_conv_backward``). The function is imported by name into several spconv modules
    (``ops``, ``hash``, quantization modules), so the original in ``cppcore`` and every imported
    copy found in ``sys.modules`` are replaced by a version that returns 0 without CUDA.
(b) **Eval mode with bias.** In eval mode spconv passes the bias to its kernel, whose CPU path
    raises ``"cpu don't support act and bias"``. Our CPU kernel adds the bias (and the optional
    fused activation) in torch.
(c) **Silent wrong results with >1 torch thread.** The CPU "native" path of
    ``ops.indice_conv`` / ``ops.indice_conv_backward`` (the only algorithm of the CPU-only build)
    runs, per kernel offset, ``SpconvOps.gather_cpu -> torch.mm -> SpconvOps.scatter_add_cpu``.
    ``scatter_add_cpu`` returns wrong sums when torch runs more than one thread (max error ~0.6
    on a 24^3 / 3000-voxel test). The patched functions compute the same gather / per-offset GEMM /
    scatter in torch from spconv's pair tables, with the pairs of all offsets concatenated: one
    ``index_select`` gather, one ``mm`` per kernel offset, one exact sequential scatter-add (a small numba loop,
    falling back to ``torch.index_add_``; the backward likewise). Exact for any thread count. CUDA tensors still go to spconv's functions.

The patched module is exported as :data:`spconv` (``spconv.pytorch``); other modules should use
``from perception3d.sparse import spconv`` so the fixes are guaranteed to be in place.

:func:`spconv_native_cpu_kernels` temporarily restores spconv's own CPU conv kernels (keeping fix
(a) so backward runs at all); it exists for benchmarks and for the regression test of fix (c).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

import spconv.pytorch as spconv
from spconv.pytorch import cppcore as _cppcore
from spconv.pytorch import ops as _ops
from cumm import tensorview as _tv

from perception3d.errors import DataError

__all__ = [
    "spconv",
    "SparseVoxels",
    "apply_spconv_cpu_fixes",
    "spconv_native_cpu_kernels",
]

_ORIG_GET_CURRENT_STREAM = getattr(_cppcore.get_current_stream, "_p3d_original", _cppcore.get_current_stream)
_ORIG_INDICE_CONV = getattr(_ops.indice_conv, "_p3d_original", _ops.indice_conv)
_ORIG_INDICE_CONV_BACKWARD = getattr(
    _ops.indice_conv_backward, "_p3d_original", _ops.indice_conv_backward
)


# --------------------------------------------------------------------------------------------
# fix (a): get_current_stream
# --------------------------------------------------------------------------------------------
def _safe_get_current_stream() -> int:
    """CUDA stream handle of the current stream, or 0 when CUDA is unavailable."""
    if torch.cuda.is_available():
        return _ORIG_GET_CURRENT_STREAM()
    return 0


_safe_get_current_stream._p3d_original = _ORIG_GET_CURRENT_STREAM  # type: ignore[attr-defined]


def _patch_current_stream() -> None:
    _cppcore.get_current_stream = _safe_get_current_stream
    for name, mod in list(sys.modules.items()):
        if not name.startswith("spconv") or mod is None:
            continue
        fn = getattr(mod, "get_current_stream", None)
        if fn is _ORIG_GET_CURRENT_STREAM:
            setattr(mod, "get_current_stream", _safe_get_current_stream)


# --------------------------------------------------------------------------------------------
# fixes (b) and (c): torch implementation of the native CPU gather-GEMM-scatter path
# --------------------------------------------------------------------------------------------
try:  # numba: a plain sequential row scatter-add, ~5x faster than torch's CPU index_add_ here
    import numba as _numba

    @_numba.njit(cache=True, nogil=True)
    def _nb_scatter_add_rows(out, idx, src):  # pragma: no cover - compiled
        c = src.shape[1]
        for i in range(idx.shape[0]):
            r = idx[i]
            for j in range(c):
                out[r, j] += src[i, j]

except ImportError:  # pragma: no cover
    _nb_scatter_add_rows = None


def _scatter_add_rows_(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[idx[i]] += src[i]`` for all i, exact and deterministic for any torch thread count.

    Args:
        out: [N, C] contiguous CPU tensor, updated in place.
        idx: [M] int32/int64 row indices into ``out``.
        src: [M, C] rows to add.

    Returns:
        ``out``. Uses a sequential numba loop for float32/float64, else ``torch.index_add_``.
    """
    if (
        _nb_scatter_add_rows is not None
        and out.dtype in (torch.float32, torch.float64)
        and src.dtype == out.dtype
        and out.is_contiguous()
        and not out.requires_grad
    ):
        src = src.contiguous()
        _nb_scatter_add_rows(out.numpy(), idx.contiguous().numpy(), src.numpy())
        return out
    return out.index_add_(0, idx, src)


def _offset_pairs(
    indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool, subm: bool
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]], int]:
    """Pairs of all kernel offsets concatenated (offset-major), like spconv's per-offset loop.

    For submanifold convs spconv stores the pair counts of the first half of the kernel only; the
    second half mirrors it (offset k has as many pairs as offset K-1-k). The centre offset of a
    submanifold conv is the identity and is left to the caller.

    Returns:
        in_idx: [M] int32 input rows.
        out_idx: [M] int32 output rows (unique within one offset).
        segments: (k, start, end) row ranges of each offset with pairs.
        center: index of the centre offset, K // 2.
    """
    nums = indice_pair_num.detach().cpu().tolist()
    kv = len(nums)
    center = kv // 2
    pair_in = indice_pairs[int(inverse)]
    pair_out = indice_pairs[int(not inverse)]
    ins, outs, segments = [], [], []
    pos = 0
    for k in range(kv):
        n = nums[k]
        if subm:
            if k == center:
                continue
            if k > center:
                n = nums[kv - k - 1]
        if n <= 0:
            continue
        ins.append(pair_in[k, :n])
        outs.append(pair_out[k, :n])
        segments.append((k, pos, pos + n))
        pos += n
    if not segments:
        e = torch.zeros(0, dtype=indice_pairs.dtype, device=indice_pairs.device)
        return e, e, segments, center
    return torch.cat(ins), torch.cat(outs), segments, center


def _apply_bias_act(out: torch.Tensor, bias: Optional[torch.Tensor], act_alpha, act_type) -> torch.Tensor:
    if bias is not None:
        out += bias.to(out.dtype)
    Act = _tv.gemm.Activation
    if act_type == Act.None_:
        return out
    if act_type == Act.ReLU:
        return out.clamp_(min=0)
    if act_type == Act.Sigmoid:
        return out.sigmoid_()
    if act_type == Act.LeakyReLU:
        alpha = float(act_alpha) if isinstance(act_alpha, (int, float)) else 0.01
        return torch.nn.functional.leaky_relu(out, alpha, inplace=True)
    raise NotImplementedError(f"activation {act_type} is not supported on CPU")


def _torch_indice_conv(
    features: torch.Tensor,
    filters: torch.Tensor,
    indice_pairs: torch.Tensor,
    indice_pair_num: torch.Tensor,
    num_activate_out: int,
    inverse: bool = False,
    subm: bool = False,
    algo=None,
    timer=None,
    bias: Optional[torch.Tensor] = None,
    act_alpha: float = 0.0,
    act_beta: float = 0.0,
    act_type=_tv.gemm.Activation.None_,
) -> torch.Tensor:
    """Drop-in for ``spconv.pytorch.ops.indice_conv``: CPU in torch, CUDA to spconv.

    The CPU path gathers the inputs of all (input, output, offset) pairs at once, multiplies each
    offset's rows by that offset's ``[C_in, C_out]`` weights, and scatter-adds all products into
    the outputs with one ``torch.index_add_`` (exact for any number of threads).

    Args:
        features: [N_in, C_in] float input features.
        filters: [C_out, kz, ky, kx, C_in] weights (spconv's KRSC layout).
        indice_pairs: [2, K, max_pairs] int32 (input row, output row) per kernel offset.
        indice_pair_num: [K] int32 number of valid pairs per offset.
        num_activate_out: number of output rows N_out.
        inverse: swap the roles of the pair rows (inverse conv).
        subm: submanifold conv (centre offset is the identity map).
        bias: optional [C_out] bias added after the conv (eval mode).
        act_alpha, act_type: optional fused activation (eval mode).

    Returns:
        [N_out, C_out] output features.
    """
    if features.is_cuda:
        return _ORIG_INDICE_CONV(features, filters, indice_pairs, indice_pair_num, num_activate_out,
                                 inverse, subm, algo, timer, bias, act_alpha, act_beta, act_type)
    features = features.contiguous()
    c_out = filters.shape[0]
    w = filters.reshape(c_out, -1, filters.shape[-1])  # [Cout, K, Cin]
    in_idx, out_idx, segments, center = _offset_pairs(indice_pairs, indice_pair_num, inverse, subm)
    if subm:
        out = torch.mm(features, w[:, center].t())
    else:
        out = features.new_zeros((int(num_activate_out), c_out))
    if segments:
        x = features.index_select(0, in_idx)  # [M, Cin]: one gather for all offsets
        y = features.new_empty((x.shape[0], c_out))
        for k, a, b in segments:
            torch.mm(x[a:b], w[:, k].t(), out=y[a:b])
        _scatter_add_rows_(out, out_idx, y)  # one exact scatter-add for all offsets
    return _apply_bias_act(out, bias, act_alpha, act_type)


def _torch_indice_conv_backward(
    features: torch.Tensor,
    filters: torch.Tensor,
    out_bp: torch.Tensor,
    indice_pairs: torch.Tensor,
    indice_pair_num: torch.Tensor,
    inverse: bool = False,
    subm: bool = False,
    algo=None,
    timer=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``spconv.pytorch.ops.indice_conv_backward``: returns (d_features, d_filters).

    Shapes as in :func:`_torch_indice_conv`; ``out_bp`` is [N_out, C_out]. Gathers inputs and
    output gradients of all pairs once, two GEMMs per offset, one ``torch.index_add_`` scatter into
    the input gradient (exact for any number of threads).
    """
    if features.is_cuda:
        return _ORIG_INDICE_CONV_BACKWARD(features, filters, out_bp, indice_pairs, indice_pair_num,
                                          inverse, subm, algo, timer)
    features = features.contiguous()
    out_bp = out_bp.contiguous()
    shape = filters.shape
    c_out = shape[0]
    w = filters.reshape(c_out, -1, shape[-1])  # [Cout, K, Cin]
    dw = torch.zeros_like(w)
    in_idx, out_idx, segments, center = _offset_pairs(indice_pairs, indice_pair_num, inverse, subm)
    if subm:
        dw[:, center] = torch.mm(out_bp.t(), features)
        din = torch.mm(out_bp, w[:, center])
    else:
        din = torch.zeros_like(features)
    if segments:
        x = features.index_select(0, in_idx)  # [M, Cin]
        g = out_bp.index_select(0, out_idx)  # [M, Cout]
        dx = features.new_empty(x.shape)
        for k, a, b in segments:
            torch.mm(g[a:b].t(), x[a:b], out=dw[:, k])
            torch.mm(g[a:b], w[:, k], out=dx[a:b])
        _scatter_add_rows_(din, in_idx, dx)  # one exact scatter-add for all offsets
    return din, dw.reshape(shape)


_torch_indice_conv._p3d_original = _ORIG_INDICE_CONV  # type: ignore[attr-defined]
_torch_indice_conv_backward._p3d_original = _ORIG_INDICE_CONV_BACKWARD  # type: ignore[attr-defined]


def apply_spconv_cpu_fixes() -> None:
    """Apply the three spconv CPU fixes (see module docstring). Idempotent; runs on import."""
    _patch_current_stream()
    _ops.indice_conv = _torch_indice_conv
    _ops.indice_conv_backward = _torch_indice_conv_backward


@contextlib.contextmanager
def spconv_native_cpu_kernels() -> Iterator[None]:
    """Temporarily restore spconv's own CPU conv kernels (fixes (b) and (c) off, (a) kept).

    For benchmarks and regression tests only: with more than one torch thread these kernels give
    wrong results.
    """
    _ops.indice_conv = _ORIG_INDICE_CONV
    _ops.indice_conv_backward = _ORIG_INDICE_CONV_BACKWARD
    try:
        yield
    finally:
        apply_spconv_cpu_fixes()


apply_spconv_cpu_fixes()


# --------------------------------------------------------------------------------------------
# SparseVoxels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseVoxels:
    """A batch of sparse voxel features packed in one tensor.

    Attributes:
        feats: [N, C] floating-point features, one row per active voxel.
        coords: [N, 4] int32 voxel coordinates ``(b, z, y, x)``; ``0 <= b < batch_size``,
            ``0 <= z < Z``, ``0 <= y < Y``, ``0 <= x < X``.
        spatial_shape: grid size ``(Z, Y, X)`` in voxels.
        batch_size: number of samples B in the batch.
    """

    feats: torch.Tensor
    coords: torch.Tensor
    spatial_shape: tuple[int, int, int]
    batch_size: int

    def __post_init__(self) -> None:
        f, c = self.feats, self.coords
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point():
            raise DataError(
                f"SparseVoxels.feats: expected a floating-point tensor [N, C], got "
                f"{type(f).__name__} {tuple(getattr(f, 'shape', ()))} {getattr(f, 'dtype', '')}"
            )
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != 4 or c.dtype != torch.int32:
            raise DataError(
                f"SparseVoxels.coords: expected an int32 tensor [N, 4] (b, z, y, x), got "
                f"{type(c).__name__} {tuple(getattr(c, 'shape', ()))} {getattr(c, 'dtype', '')}"
            )
        if c.shape[0] != f.shape[0]:
            raise DataError(
                f"SparseVoxels.coords: expected {f.shape[0]} rows (one per feats row), got {c.shape[0]}"
            )
        if c.device != f.device:
            raise DataError(f"SparseVoxels.coords: expected device {f.device}, got {c.device}")
        try:
            shape = tuple(int(s) for s in self.spatial_shape)
        except (TypeError, ValueError):
            raise DataError(
                f"SparseVoxels.spatial_shape: expected 3 positive ints (Z, Y, X), got {self.spatial_shape!r}"
            ) from None
        if len(shape) != 3 or min(shape) <= 0:
            raise DataError(
                f"SparseVoxels.spatial_shape: expected 3 positive ints (Z, Y, X), got {self.spatial_shape!r}"
            )
        object.__setattr__(self, "spatial_shape", shape)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise DataError(f"SparseVoxels.batch_size: expected a positive int, got {self.batch_size!r}")
        if c.shape[0] > 0:
            upper = torch.tensor((self.batch_size,) + shape, device=c.device, dtype=torch.int32)
            bad = (c < 0) | (c >= upper)
            if bool(bad.any()):
                row = int(bad.any(dim=1).nonzero()[0, 0])
                raise DataError(
                    f"SparseVoxels.coords: row {row} = {c[row].tolist()} outside "
                    f"[0, {self.batch_size}) x [0, {shape[0]}) x [0, {shape[1]}) x [0, {shape[2]})"
                )

    @property
    def num_voxels(self) -> int:
        """Number of active voxels N."""
        return int(self.feats.shape[0])

    @property
    def num_channels(self) -> int:
        """Number of feature channels C."""
        return int(self.feats.shape[1])

    def to_spconv(self) -> "spconv.SparseConvTensor":
        """Wrap as a ``spconv.SparseConvTensor`` (shares memory with ``feats``/``coords``)."""
        return spconv.SparseConvTensor(
            self.feats, self.coords, list(self.spatial_shape), self.batch_size
        )

    @classmethod
    def from_spconv(cls, t: "spconv.SparseConvTensor") -> "SparseVoxels":
        """Build from a ``spconv.SparseConvTensor`` (validates like the constructor)."""
        return cls(
            feats=t.features,
            coords=t.indices.to(torch.int32),
            spatial_shape=tuple(int(s) for s in t.spatial_shape),
            batch_size=int(t.batch_size),
        )

    def dense(self) -> torch.Tensor:
        """Scatter into a dense grid.

        Returns:
            [B, C, Z, Y, X] tensor, zero where no voxel is active. Duplicate coordinates are
            summed.
        """
        Z, Y, X = self.spatial_shape
        B, C = self.batch_size, self.num_channels
        c = self.coords.long()
        lin = ((c[:, 0] * Z + c[:, 1]) * Y + c[:, 2]) * X + c[:, 3]
        out = self.feats.new_zeros((B * Z * Y * X, C))
        out = out.index_add(0, lin, self.feats)
        return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3).contiguous()
