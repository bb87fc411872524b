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
    on a 24^3 / 3000-voxel test). The patched functions turn spconv's pair tables into kernel
    maps (output row x offset -> input row, cached on the pair tensor) and run the multi-threaded
    numba kernels of :mod:`perception3d.ops.kernel_map`: each output row is summed by one thread
    in a fixed order, so results are exact and identical for any thread count. CUDA tensors
    still go to spconv's functions.

The patched module is exported as :data:`spconv` (``spconv.pytorch``); other modules should use
``from perception3d.sparse import spconv`` so the fixes are guaranteed to be in place.

:func:`spconv_native_cpu_kernels` temporarily restores spconv's own CPU conv kernels (keeping fix
(a) so backward runs at all); it exists for benchmarks and for the regression test of fix (c).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

import spconv.pytorch as spconv
from spconv.pytorch import cppcore as _cppcore
from spconv.pytorch import ops as _ops
from cumm import tensorview as _tv

from perception3d.errors import DataError
from perception3d.ops import kernel_map as _km

__all__ = [
    "spconv",
    "SparseVoxels",
    "apply_spconv_cpu_fixes",
    "spconv_native_cpu_kernels",
]

# spconv's SparseConvTensor uses torch.fx's ProxyableClassMeta, which makes torch >= 2.6 log a
# deprecation warning about is_fx_tracing() on the first tensor built; it is not actionable here.
logging.getLogger("torch.fx._symbolic_trace").addFilter(lambda r: "is_fx_tracing will return" not in r.getMessage())

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
# fixes (b) and (c): kernel-map convolution on CPU (perception3d.ops.kernel_map)
# --------------------------------------------------------------------------------------------
def _kernel_maps(
    indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool, subm: bool,
    num_in: int, num_out: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """spconv's per-offset pair lists as kernel maps: ``(nbr [N_out, K], nbr_t [N_in, K])``.

    ``indice_pairs`` is ``[2, K, max_pairs]`` (input row, output row) per offset with
    ``indice_pair_num[k]`` valid pairs; ``inverse`` swaps the roles of the two rows. For submanifold
    convs spconv fills the pair counts of the first half of the kernel only (offset k > K/2 has as
    many pairs as its mirror K-1-k) and leaves out the centre offset, which is the identity.

    The maps are cached on the ``indice_pairs`` tensor itself: the layers sharing an
    ``indice_key`` and the backward pass reuse them, and they are freed with the pairs.
    """
    key = (bool(inverse), bool(subm), int(num_in), int(num_out))
    cache = getattr(indice_pairs, "_p3d_kernel_maps", None)
    if cache is not None and key in cache:
        return cache[key]
    maps = _build_kernel_maps(indice_pairs, indice_pair_num, inverse, subm, num_in, num_out)
    try:
        if cache is None:
            cache = indice_pairs._p3d_kernel_maps = {}
        cache[key] = maps
    except AttributeError:  # pragma: no cover - tensors normally accept attributes
        pass
    return maps


def _build_kernel_maps(indice_pairs, indice_pair_num, inverse, subm, num_in, num_out):
    nums = indice_pair_num.detach().cpu().tolist()
    kv = len(nums)
    center = kv // 2
    pair_in = indice_pairs[int(inverse)]
    pair_out = indice_pairs[int(not inverse)]
    ins, outs, offs = [], [], []
    for k in range(kv):
        n = nums[kv - k - 1] if subm and k > center else nums[k]
        if subm and k == center:
            ident = torch.arange(num_out, dtype=torch.int32)
            ins.append(ident)
            outs.append(ident)
            offs.append(torch.full((num_out,), k, dtype=torch.int32))
        elif n > 0:
            ins.append(pair_in[k, :n])
            outs.append(pair_out[k, :n])
            offs.append(torch.full((n,), k, dtype=torch.int32))
    if not ins:
        return (torch.full((num_out, kv), -1, dtype=torch.int32), torch.full((num_in, kv), -1, dtype=torch.int32))
    i, o, k = torch.cat(ins), torch.cat(outs), torch.cat(offs)
    return _km.kernel_map(i, o, k, num_out, kv), _km.transpose_kernel_map(i, o, k, num_in, kv)


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
    """Drop-in for ``spconv.pytorch.ops.indice_conv``: CPU through the kernel map, CUDA to spconv.

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
        [N_out, C_out] output features; exact and identical for any number of threads.
    """
    if features.is_cuda:
        return _ORIG_INDICE_CONV(features, filters, indice_pairs, indice_pair_num, num_activate_out,
                                 inverse, subm, algo, timer, bias, act_alpha, act_beta, act_type)
    c_out = filters.shape[0]
    w = filters.reshape(c_out, -1, filters.shape[-1]).permute(1, 2, 0)  # [K, Cin, Cout]
    nbr, _ = _kernel_maps(indice_pairs, indice_pair_num, inverse, subm, features.shape[0], int(num_activate_out))
    out = _km.conv_forward(features, w.to(features.dtype), nbr, features.new_zeros((int(num_activate_out), c_out)))
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

    Shapes as in :func:`_torch_indice_conv`; ``out_bp`` is [N_out, C_out]. The input gradient is
    the forward kernel on the transposed map with transposed weights; the weight gradient sums
    outer products per offset.
    """
    if features.is_cuda:
        return _ORIG_INDICE_CONV_BACKWARD(features, filters, out_bp, indice_pairs, indice_pair_num,
                                          inverse, subm, algo, timer)
    shape = filters.shape
    c_out = shape[0]
    w = filters.reshape(c_out, -1, shape[-1])  # [Cout, K, Cin]
    nbr, nbr_t = _kernel_maps(indice_pairs, indice_pair_num, inverse, subm, features.shape[0], out_bp.shape[0])
    din = _km.conv_forward(out_bp, w.permute(1, 0, 2).to(out_bp.dtype), nbr_t, torch.zeros_like(features))
    dw = _km.conv_weight_grad(features, out_bp, nbr)  # [K, Cin, Cout]
    return din, dw.permute(2, 0, 1).reshape(shape).to(filters.dtype)


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
